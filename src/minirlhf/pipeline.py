"""`minirlhf demo`: data, reward classifier, LSTM generator, PPO, evaluation and report, on the offline default."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

from minirlhf.algorithms.classifier import ClassifierConfig, ClassifierModelConfig, ClassifierTrainConfig
from minirlhf.algorithms.generator import GeneratorConfig
from minirlhf.algorithms.ppo import PPOConfig
from minirlhf.config import DataConfig, RunConfig, save_config
from minirlhf.data.prompts import PromptConfig
from minirlhf.runtime import make_run_dir, peak_memory_mb


def demo_classifier() -> ClassifierConfig:
    return ClassifierConfig(data=DataConfig(max_train=6000, max_eval=1000),
                            model=ClassifierModelConfig(freeze_layers=4, max_length=64),
                            train=ClassifierTrainConfig(epochs=2))


@dataclass
class DemoConfig(RunConfig):
    data: str = "tweets"
    """corpus for every stage (name, folder or file; see --data)"""
    classifier: ClassifierConfig = field(default_factory=demo_classifier)
    """stage 1, with quicker defaults than train-classifier's"""
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    """stage 3, as train-generator's defaults"""
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(steps=30, prompts=PromptConfig(max_eval=128)))
    """RLHF on the generator against the classifier (policy and reward are filled in by the demo)"""


def _stage(cfg, demo: DemoConfig, out: Path):
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source=demo.data),
                               out=str(out), device=demo.device, seed=demo.seed)


def run_demo(cfg: DemoConfig) -> Path:
    from minirlhf.algorithms import classifier, generator, ppo
    from minirlhf.checkpoint import load_json

    t0 = time.time()
    run_dir = make_run_dir(cfg.out, "demo")
    save_config(cfg, run_dir / "config.yaml")
    print(f"== 1/3 reward classifier -> {run_dir / 'classifier'}")
    clf_dir = classifier.train(_stage(cfg.classifier, cfg, run_dir / "classifier"))
    print(f"== 2/3 LSTM generator -> {run_dir / 'generator'}")
    gen_dir = generator.train(_stage(cfg.generator, cfg, run_dir / "generator"))
    print(f"== 3/3 PPO: the generator learns to write what the classifier scores as positive -> {run_dir / 'ppo'}")
    ppo_cfg = _stage(cfg.ppo, cfg, run_dir / "ppo")
    ppo_cfg = dataclasses.replace(ppo_cfg, policy=str(gen_dir), reward=dataclasses.replace(ppo_cfg.reward, classifier=str(clf_dir)))
    ppo_dir = ppo.train(ppo_cfg)

    after = load_json(ppo_dir / "results.json")
    print("\nheld-out prompts, after PPO (reward = the classifier's positive logit):")
    print(f"  reference {after['reward_reference']:+.2f}  policy {after['reward_policy']:+.2f}  "
          f"win rate {after['win_rate']:.2f}  KL {after['kl']:.2f} nats per response")
    print(f"  distinct-2 reference {after['reference']['distinct_2']:.2f}, policy {after['policy']['distinct_2']:.2f}; "
          f"perplexity under the reference: reference {after['reference']['ref_perplexity']:.1f}, "
          f"policy {after['policy']['ref_perplexity']:.1f}")
    for row in after["samples"][:6]:
        print(f"  {row['prompt']!r}: reference {row['reference']!r} ({row['reference_reward']:+.1f}) | "
              f"policy {row['policy']!r} ({row['policy_reward']:+.1f})")
    print(f"\ndemo finished in {time.time() - t0:.0f}s, peak memory {peak_memory_mb():.0f} MB")
    print(f"run directory: {run_dir}")
    print(f"  plots:   {clf_dir / 'accuracy.png'}, {gen_dir / 'perplexity.png'}, {ppo_dir / 'reward.png'}, {ppo_dir / 'kl.png'}")
    print(f"  samples: {gen_dir / 'samples.md'}, {ppo_dir / 'samples.md'}")
    print(f"  report:  {ppo_dir / 'report.md'}")
    return run_dir
