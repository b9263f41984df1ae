"""Stages run one after another: `minirlhf demo` (data, reward classifier, LSTM generator, PPO, evaluation and
report, on the offline default), and the reward classifier an RL run trains first when asked to
(`reward.train_missing`): a reward itself never trains anything."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from minirlhf import distributed
from minirlhf.stages.classifier import ClassifierConfig, ClassifierModelConfig, ClassifierTrainConfig
from minirlhf.stages.generator import GeneratorConfig
from minirlhf.rl.ppo import PPOConfig
from minirlhf.rl.core import RLOptimizerConfig
from minirlhf.checkpoint import load_json
from minirlhf.config import DataConfig, RunConfig, setting
from minirlhf.data.prompts import PromptConfig
from minirlhf.models import rewards
from minirlhf.models.rewards import RewardConfig
from minirlhf.registry import STAGES
from minirlhf.rundir import RunDir
from minirlhf.runtime import peak_memory_mb, pick_device


def demo_ppo() -> PPOConfig:
    """PPO settings under which the LSTM gains on the classifier without collapsing. With kl_coef 0.1 (adaptive, but
    its 10,000-response horizon barely moves it in 30 steps) it learned to answer "thank you!" to every prompt: win
    rate 0.98, KL 9 nats, distinct-2 0.90 -> 0.22. A fixed 0.5 and a learning rate of 2e-4 win 0.88-0.89 on three
    seeds at 2.6-3.3 nats, keeping 70-85% of the reference's distinct-2 and over half its response length, with no
    health check firing; kl_target is the KL it should stay under (the health checks read it)."""
    return PPOConfig(steps=30, kl_coef=0.5, adaptive_kl=False, kl_target=3.0, train=RLOptimizerConfig(lr=2e-4),
                     prompts=PromptConfig(max_eval=128))


def demo_classifier() -> ClassifierConfig:
    return ClassifierConfig(data=DataConfig(max_train=6000, max_eval=1000),
                            model=ClassifierModelConfig(freeze_layers=4, max_length=64),
                            train=ClassifierTrainConfig(epochs=2))


def load_classifier(cfg: RewardConfig, device, data: DataConfig | None = None):
    """The reward classifier `cfg.classifier`, trained first with the demo's quick settings when it does not exist
    and `cfg.train_missing` is set, so that a fresh checkout can run RLHF."""
    path = Path(cfg.classifier) if cfg.classifier else None
    if path is not None and cfg.train_missing and not path.exists():
        print(f"reward classifier {path} does not exist yet: training it first (once; it is reused afterwards)")
        clf = demo_classifier()
        if data is not None:  # the run's data, at most as much as the quick settings take
            fewer = lambda mine, quick: quick if mine is None else min(mine, quick)  # noqa: E731
            clf = dataclasses.replace(clf, data=dataclasses.replace(
                data, max_train=fewer(data.max_train, clf.data.max_train), max_eval=fewer(data.max_eval, clf.data.max_eval)))
        tmp = path.with_name(f".{path.name}.training")  # renamed into place only when complete
        shutil.rmtree(tmp, ignore_errors=True)
        STAGES["classifier"].load_train()(dataclasses.replace(clf, out=str(tmp), device=str(device)))
        os.replace(tmp, path)
    return rewards.load_classifier(cfg, device)


def train_missing_reward(cfg) -> None:
    """Before an RL run: its reward classifier, if it is to be trained first. Under torchrun the first process trains
    it as a world of one while the others wait (up to --dist_timeout_s), then all of them go on, or stop together."""
    if getattr(getattr(cfg, "env", None), "name", ""):
        return  # episodes are scored by their environment
    if cfg.reward.train_missing and cfg.reward.classifier and not Path(cfg.reward.classifier).exists():
        distributed.init(cfg.device, cfg.strategy, cfg.dist_timeout_s)  # a GPU machine told --device cpu: gloo
        with distributed.main_first():
            if distributed.is_main() and not Path(cfg.reward.classifier).exists():
                with distributed.alone():
                    load_classifier(cfg.reward, pick_device(cfg.device)[0], cfg.data)


@dataclass
class DemoConfig(RunConfig):
    data: str = setting("tweets", fixed_on_resume=True)
    """corpus for every stage (name, folder or file; see --data)"""
    classifier: ClassifierConfig = setting(default_factory=demo_classifier, fixed_on_resume=True)
    """stage 1, with quicker defaults than train-classifier's"""
    generator: GeneratorConfig = setting(default_factory=GeneratorConfig, fixed_on_resume=True)
    """stage 3, as train-generator's defaults"""
    ppo: PPOConfig = setting(default_factory=demo_ppo, fixed_on_resume=True)
    """RLHF on the generator against the classifier, with settings that keep it healthy (policy and reward are
    filled in by the demo)"""


def _stage(cfg, demo: DemoConfig, out: Path):
    """A stage's config, with the demo's data and its run settings (device, seed, precision, dashboards)."""
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source=demo.data), out=str(out),
                               device=demo.device, seed=demo.seed, dtype=demo.dtype, report_to=demo.report_to)


def run_demo(cfg: DemoConfig, overwrite: bool = False, resume: str | None = None) -> Path:
    """The demo: three stages of the registry, one after another, each a run in its own folder. `resume` (the demo's
    folder) goes on where it stopped: finished stages are kept, the one cut short continues from its checkpoint."""
    t0 = time.time()
    run_dir = RunDir.open(resume, "demo", command="demo") if resume else RunDir.create(
        cfg.out, "demo", overwrite=overwrite, config=cfg)
    print(f"== 1/3 reward classifier -> {run_dir / 'classifier'}")
    clf_dir = part("classifier", _stage(cfg.classifier, cfg, run_dir / "classifier"), resume is not None)
    print(f"== 2/3 LSTM generator -> {run_dir / 'generator'}")
    gen_dir = part("generator", _stage(cfg.generator, cfg, run_dir / "generator"), resume is not None)
    print(f"== 3/3 PPO: the generator learns to write what the classifier scores as positive -> {run_dir / 'ppo'}")
    ppo_cfg = _stage(cfg.ppo, cfg, run_dir / "ppo")
    ppo_cfg = dataclasses.replace(ppo_cfg, policy=str(gen_dir), reward=dataclasses.replace(ppo_cfg.reward,
                                                                                           classifier=str(clf_dir)))
    ppo_dir = part("rl", ppo_cfg, resume is not None)
    _summary(load_json(ppo_dir / "results.json"))
    print(f"\ndemo finished in {time.time() - t0:.0f}s, peak memory {peak_memory_mb():.0f} MB")
    print(f"run directory: {run_dir}")
    print(f"  plots:   {clf_dir / 'accuracy.png'}, {gen_dir / 'perplexity.png'}, {ppo_dir / 'reward.png'}, "
          f"{ppo_dir / 'kl.png'}")
    print(f"  samples: {gen_dir / 'samples.md'}, {ppo_dir / 'samples.md'}")
    print(f"  report:  {ppo_dir / 'report.md'}")
    return run_dir.path


def part(stage: str, cfg, resuming: bool) -> Path:
    """One stage of a composite run, in `cfg.out`: trained; or, `resuming`, kept when it finished, continued from its
    checkpoint when it has one, else started anew (what a kill before its first checkpoint left is moved aside)."""
    train = STAGES[stage].load_train()
    run = RunDir.find(cfg.out) if resuming else None
    if run is None:
        return train(cfg)
    if run.results.is_file():
        print(f"   finished before: {run}")
        return run.path
    if run.checkpoint_step() > 0 or run.earlier_checkpoints():
        return train(cfg, str(run.path))
    return train(cfg, None, True)


def _summary(after: dict) -> None:
    print("\nheld-out prompts, after PPO (reward = the classifier's positive logit):")
    print(f"  reference {after['reward_reference']:+.2f}  policy {after['reward_policy']:+.2f}  "
          f"win rate {after['win_rate']:.2f}  KL {after['kl']:.2f} nats per response")
    print(f"  distinct-2 reference {after['reference']['distinct_2']:.2f}, policy {after['policy']['distinct_2']:.2f}; "
          f"perplexity under the reference: reference {after['reference']['ref_perplexity']:.1f}, "
          f"policy {after['policy']['ref_perplexity']:.1f}")
    for row in after["samples"][:6]:
        print(f"  {row['prompt']!r}: reference {row['reference']!r} ({row['reference_reward']:+.1f}) | "
              f"policy {row['policy']!r} ({row['policy_reward']:+.1f})")
    print("\n" + explain(after))


COLLAPSE = 0.5
"""a policy whose distinct-2 is below this share of the reference's has collapsed onto a few answers"""


def explain(after: dict) -> str:
    """What the closing figures mean for the user, with the measured numbers; collapse and health checks called out."""
    policy, reference = after["policy"]["distinct_2"], after["reference"]["distinct_2"]
    lines = [f"What these mean: the policy's response scored higher than the reference's on {after['win_rate']:.0%} of "
             f"the prompts. KL {after['kl']:.1f} nats per response is how far the policy moved from where it started "
             f"(the generator before PPO): 0 is no change, and at {after['kl']:.1f} nats a typical response of the "
             f"policy is about {math.exp(after['kl']):,.0f} times likelier under it than under the starting generator.",
             f"Distinct-2 {policy:.2f} (reference {reference:.2f}) is the variety of the responses, the share of "
             "their word pairs that are distinct: a policy that says one thing to every prompt scores near 0."]
    if policy >= COLLAPSE * reference:
        lines[-1] += f" The policy keeps {policy / max(reference, 1e-9):.0%} of the reference's variety: no collapse."
    else:
        lines.append(f"COLLAPSE: the policy's distinct-2 is under {COLLAPSE:g} x the reference's, so it wins by giving "
                     "nearly the same answer to every prompt (see the samples); raise --ppo.kl_coef or lower "
                     "--ppo.train.lr.")
    health = after.get("health")
    if health:
        lines.append("Health checks that fired during training: " + "; ".join(
            f"{h['guard']} at step {h['step']}" for h in health) + " (details in report.md).")
    elif health is not None:
        lines.append("No health check fired during training.")
    return "\n".join(textwrap.fill(line, 116, subsequent_indent="  ") for line in lines)
