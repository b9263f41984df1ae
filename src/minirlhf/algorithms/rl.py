"""The loop that PPO, A2C, GRPO and RLOO share: sample responses, score them, compare them with the
frozen reference, estimate advantages, and improve the policy with the clipped surrogate objective.

The algorithms differ only in their advantages (and GRPO in where its KL penalty goes); those pieces
live in ppo.py, grpo.py and rloo.py, and `_advantages` below picks one by the config's `algorithm`.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from minirlhf import UserError
from minirlhf.checkpoint import atomic_write_text, save_json
from minirlhf.config import DataConfig, RunConfig, save_config
from minirlhf.data.prompts import PromptConfig, load_prompts
from minirlhf.metrics import MetricsWriter
from minirlhf.models.policy import Rollout, load_policy
from minirlhf.ops import kl_estimate, masked_mean
from minirlhf.rewards import Reward, RewardConfig
from minirlhf.runtime import make_run_dir, peak_memory_mb, pick_device, seed_everything
from minirlhf.training import optimizer_step, progress


@dataclass
class PolicyOptions:
    chat_template: bool = True
    """put each prompt to an instruct model as a user turn of its chat template (causal LMs that have one)"""
    freeze_layers: int = 0
    """freeze the embeddings (and a tied LM head) and this many lowest transformer layers (causal LMs)"""

    checks = {"freeze_layers": ">= 0"}


@dataclass
class RLConfig(RunConfig):
    policy: str = ""
    """the starting policy: an LSTM generator run, an RL run, a causal LM folder or hub name, or `smollm2`
    (SmolLM2-135M-Instruct, offline)"""
    policy_options: PolicyOptions = field(default_factory=PolicyOptions)
    """how a causal LM policy is set up"""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """the reward: a weighted sum of named terms (`--reward RUN` sets reward.classifier)"""
    data: DataConfig = field(default_factory=DataConfig)
    """the corpus whose texts' first words are the prompts (unless prompts.file is set)"""
    prompts: PromptConfig = field(default_factory=PromptConfig)
    """where the prompts come from"""
    steps: int = 60
    """iterations of rollout, then update"""
    batch_size: int = 64
    """responses sampled per iteration"""
    response_len: int = 16
    """tokens per response at most"""
    ppo_epochs: int = 4
    """passes over each batch of rollouts"""
    minibatch_size: int = 16
    """responses per gradient step"""
    lr: float = 3e-4
    """Adam learning rate"""
    clip_eps: float = 0.2
    """clip range of the probability ratio"""
    kl_coef: float = 0.1
    """(initial) coefficient of the KL penalty against the reference"""
    kl_estimator: str = "k1"
    """per-token KL estimator in the penalty: k1 (log-ratio) or k3 (always >= 0)"""
    adaptive_kl: bool = True
    """adapt kl_coef towards kl_target (Ziegler et al., 2019); false keeps it fixed"""
    kl_target: float = 6.0
    """target KL per response, in nats, of the adaptive controller"""
    kl_horizon: int = 10000
    """horizon of the adaptive controller, in responses"""
    target_kl: float = 0.1
    """stop a step's epochs early once the approximate KL to the rollout policy exceeds 1.5 x this"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this"""
    sample_every: int = 10
    """add a table of sample responses to samples.md at the start and every this many steps"""
    save_every: int = 20
    """checkpoint the policy every this many steps (and at the end)"""

    algorithm: ClassVar[str] = ""
    checks = {**RunConfig.checks, "steps": ">= 1", "batch_size": ">= 1", "response_len": ">= 1", "ppo_epochs": ">= 1",
              "minibatch_size": ">= 1", "lr": "> 0", "clip_eps": "> 0", "kl_coef": ">= 0", "kl_estimator": "{k1,k3}",
              "kl_target": "> 0", "kl_horizon": ">= 1", "target_kl": "> 0", "max_grad_norm": "> 0",
              "sample_every": ">= 1", "save_every": ">= 1"}


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps: float) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate objective (Schulman et al., 2017, eq. 7), negated. All inputs (B, T).

    L = -E[min(r A, clip(r, 1 - eps, 1 + eps) A)], r = exp(logprobs - old_logprobs), averaged over tokens.
    """
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"policy/approx_kl": masked_mean(0.5 * log_ratio ** 2, mask).item(),
                 "policy/clipfrac": masked_mean((clipped > unclipped).float(), mask).item(),
                 "policy/ratio_max": (ratio * mask).max().item()}
    return loss, stats


class AdaptiveKLController:
    """Ziegler et al. (2019), sec. 2.2: kl_coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon."""

    def __init__(self, kl_coef: float, target: float, horizon: int, adaptive: bool = True):
        self.value, self.target, self.horizon, self.adaptive = kl_coef, target, horizon, adaptive

    def update(self, kl: float, n_responses: int) -> None:
        if self.adaptive:
            error = max(-0.2, min(0.2, kl / self.target - 1))
            self.value *= 1 + error * n_responses / self.horizon


@dataclass
class Batch:
    """One iteration's experience: what the update reads, all (B, T) but `rollout`."""

    rollout: Rollout
    ref_logprobs: torch.Tensor
    advantages: torch.Tensor
    old_values: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def select(self, idx: list[int]) -> "Batch":
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return Batch(self.rollout.select(idx), self.ref_logprobs[idx], self.advantages[idx],
                     pick(self.old_values), pick(self.returns))


def group_size(cfg) -> int:
    """Samples per prompt: 1 for PPO and A2C, `group_size` for the group-baseline algorithms."""
    return getattr(cfg, "group_size", 1)


def _advantages(cfg, rollout, scores, kl, kl_coef, value_model) -> Batch:
    """The algorithms' one real difference: how a score becomes a per-token advantage."""
    from minirlhf.algorithms import grpo, ppo, rloo

    mask = rollout.response_mask
    if cfg.algorithm == "grpo":
        return Batch(rollout, kl.ref_logprobs, grpo.advantages(scores, cfg.group_size, mask))
    if cfg.algorithm == "rloo":
        seq_kl = (kl.penalty * mask).sum(1)
        return Batch(rollout, kl.ref_logprobs, rloo.advantages(scores - kl_coef * seq_kl, cfg.group_size, mask))
    values = rollout.values if value_model is None else value_model(rollout)[1]
    advantages, returns = ppo.advantages(scores, kl.penalty, values, mask, kl_coef, cfg)
    return Batch(rollout, kl.ref_logprobs, advantages, values, returns)


def _update(cfg, policy, value_model, optimizer, batch: Batch, kl_coef: float, rng) -> dict:
    """Epochs over shuffled minibatches of the clipped objective (plus value loss, plus GRPO's KL term);
    stops early once the policy has moved too far from the one that sampled."""
    from minirlhf.algorithms.ppo import value_loss

    params = [p for group in optimizer.param_groups for p in group["params"]]
    stats: list[dict] = []
    for _ in range(cfg.ppo_epochs):
        order = list(range(len(batch.rollout.prompts)))
        rng.shuffle(order)
        for start in range(0, len(order), cfg.minibatch_size):
            mb = batch.select(order[start: start + cfg.minibatch_size])
            mask = mb.rollout.response_mask
            logprobs, values, _ = policy(mb.rollout)
            loss, s = policy_loss(logprobs, mb.rollout.logprobs, mb.advantages, mask, cfg.clip_eps)
            s["policy/loss"] = loss.item()
            if mb.returns is not None:
                values = values if value_model is None else value_model(mb.rollout)[1]
                vf = value_loss(values, mb.old_values, mb.returns, mask, cfg.clip_value)
                loss, s["value/loss"] = loss + cfg.vf_coef * vf, vf.item()
            if cfg.algorithm == "grpo":  # GRPO puts the KL penalty in the loss (Shao et al., 2024, eq. 3)
                kl = masked_mean(kl_estimate(logprobs, mb.ref_logprobs, "k3"), mask)
                loss, s["policy/kl_loss"] = loss + kl_coef * kl, kl.item()
            s["policy/grad_norm"] = optimizer_step(loss, params, optimizer, None, cfg.max_grad_norm)
            stats.append(s)
        if stats[-1]["policy/approx_kl"] > 1.5 * cfg.target_kl:
            break
    mean = {k: sum(d[k] for d in stats) / len(stats) for k in stats[0]}
    return mean | {"policy/ratio_max": max(d["policy/ratio_max"] for d in stats), "policy/updates": len(stats)}


@dataclass
class KLTerms:
    ref_logprobs: torch.Tensor  # (B, T)
    penalty: torch.Tensor  # (B, T) the configured estimator, 0 on padding
    k1: torch.Tensor  # (B,) summed log-ratio per response: the unbiased KL that is logged and controlled


def _kl(cfg, ref, rollout) -> KLTerms:
    with torch.inference_mode():
        ref_logprobs, _, _ = ref(rollout)
    ref_logprobs = ref_logprobs.clone()  # out of inference mode, so GRPO's loss can use it
    mask = rollout.response_mask
    penalty = kl_estimate(rollout.logprobs, ref_logprobs, cfg.kl_estimator) * mask
    return KLTerms(ref_logprobs, penalty, (kl_estimate(rollout.logprobs, ref_logprobs, "k1") * mask).sum(1))


def _prompt_batch(cfg, prompts: list[str], rng) -> list[str]:
    """batch_size / group_size distinct prompts, each repeated group_size times in a row."""
    g = group_size(cfg)
    picked = rng.sample(prompts, min(cfg.batch_size // g, len(prompts)))
    return [p for p in picked for _ in range(g)]


def _check(cfg) -> None:
    if not cfg.policy:
        raise UserError(f"{cfg.algorithm} needs --policy (a generator run, an RL run, a causal LM, or smollm2)")
    g = group_size(cfg)
    if cfg.batch_size % g or cfg.batch_size < g:
        raise UserError(f"batch_size={cfg.batch_size} must be a multiple of group_size={g}")
    if cfg.algorithm == "a2c" and (cfg.ppo_epochs != 1 or cfg.minibatch_size < cfg.batch_size):
        raise UserError("a2c makes one gradient step per rollout: keep ppo_epochs=1 and minibatch_size >= batch_size")


def setup(cfg, device):
    """(policy, reference, separate value model or None, reward, train prompts, held-out prompts)."""
    options = dict(chat_template=cfg.policy_options.chat_template, freeze_layers=cfg.policy_options.freeze_layers)
    critic = getattr(cfg, "critic", None)
    policy = load_policy(cfg.policy, device, value_head=critic == "head", **options)
    ref = policy.frozen_copy()
    value_model = load_policy(cfg.policy, device, value_head=True, **options) if critic == "separate" else None
    reward = Reward(cfg.reward, cfg.response_len, device, cfg.data)
    train_prompts, eval_prompts = load_prompts(cfg.prompts, cfg.data)
    return policy, ref, value_model, reward, train_prompts, eval_prompts


def _sample_table(step: int, rollout: Rollout, terms: dict, n: int = 6) -> str:
    from minirlhf.evaluate import md_cell

    rows = [f"\n## step {step}\n", "| prompt | response | reward |", "| --- | --- | --- |"]
    rows += [f"| {md_cell(p)} | {md_cell(r)} | {s:+.2f} |"
             for p, r, s in zip(rollout.prompts[:n], rollout.texts[:n], terms["total"][:n].tolist())]
    return "\n".join(rows) + "\n"


def save_checkpoint(run_dir: Path, cfg, step: int, policy, value_model, kl_ctl, reward) -> None:
    """Policy (and separate critic) folders, then the JSON state; each written atomically."""
    policy.save(run_dir / "policy")
    if value_model is not None:
        value_model.save(run_dir / "value_model")
    save_json({"algorithm": cfg.algorithm, "step": step, "kl_coef": kl_ctl.value, "policy_from": cfg.policy,
               "reward_moments": reward.moments.state() if reward.moments else None}, run_dir / "state.json")


def train(cfg: RLConfig) -> Path:
    """Rollout, score, KL against the reference, advantages, clipped updates; returns the run directory."""
    from minirlhf.evaluate import evaluate_policy, write_report

    _check(cfg)
    seed_everything(cfg.seed)
    device, why = pick_device(cfg.device)
    print(f"device: {device} ({why})")
    policy, ref, value_model, reward, train_prompts, eval_prompts = setup(cfg, device)  # bad input fails here
    run_dir = make_run_dir(cfg.out, cfg.algorithm)
    save_config(cfg, run_dir / "config.yaml")
    print(f"{cfg.algorithm}: policy {cfg.policy} ({policy.kind}), {len(train_prompts)} training prompts, "
          f"{len(eval_prompts)} held-out prompts")
    params = [p for m in (policy, value_model) if m is not None for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon, cfg.adaptive_kl)
    metrics = MetricsWriter(run_dir)
    rng = random.Random(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    samples = f"# Sample responses during {cfg.algorithm} training\n"
    bar = progress(range(1, cfg.steps + 1), desc=cfg.algorithm, unit="step")
    for step in bar:
        t0 = time.time()
        rollout = policy.sample(_prompt_batch(cfg, train_prompts, rng), cfg.response_len, gen)
        total, terms = reward(policy, rollout)
        scores = reward.normalized(total).to(device)
        kl = _kl(cfg, ref, rollout)
        with torch.no_grad():
            batch = _advantages(cfg, rollout, scores, kl, kl_ctl.value, value_model)
        t1 = time.time()
        stats = _update(cfg, policy, value_model, optimizer, batch, kl_ctl.value, rng)
        mask = rollout.response_mask
        row = {"reward/mean": total.mean().item(), "reward/std": total.std().item() if len(total) > 1 else 0.0,
               **{f"reward/{k}": v.mean().item() for k, v in terms.items() if k != "total"},
               "objective/kl": kl.k1.mean().item(), "objective/kl_coef": kl_ctl.value,
               "objective/entropy": masked_mean(rollout.entropy, mask).item(), **stats,
               "response/length": mask.sum(1).mean().item(), "response/ended": rollout.ended.float().mean().item(),
               "time/rollout_s": t1 - t0, "time/update_s": time.time() - t1}
        if batch.returns is not None:
            from minirlhf.algorithms.ppo import explained_variance

            row["value/explained_var"] = explained_variance(batch.old_values, batch.returns, mask)
        metrics.log(step, **row)
        bar.set_postfix(reward=f"{row['reward/mean']:.2f}", kl=f"{row['objective/kl']:.2f}", refresh=False)
        kl_ctl.update(row["objective/kl"], len(rollout.prompts))
        if step == 1 or step % cfg.sample_every == 0:
            samples += _sample_table(step, rollout, terms)
            atomic_write_text(run_dir / "samples.md", samples)
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_checkpoint(run_dir, cfg, step, policy, value_model, kl_ctl, reward)
    metrics.close()
    _plots(metrics, run_dir, cfg)
    results = evaluate_policy(policy, ref, reward, eval_prompts, cfg, seed=cfg.seed)
    results["peak_memory_mb"] = round(peak_memory_mb())
    save_json(results, run_dir / "results.json")
    write_report(run_dir, results, cfg)
    print(f"held-out reward: reference {results['reward_reference']:.3f} -> policy {results['reward_policy']:.3f}, "
          f"win rate {results['win_rate']:.2f}, KL {results['kl']:.2f} nats")
    return run_dir


def _plots(metrics: MetricsWriter, run_dir: Path, cfg) -> None:
    metrics.plot(run_dir / "reward.png", ["reward/mean"], "mean reward of the sampled responses")
    metrics.plot(run_dir / "kl.png", ["objective/kl"], "KL(policy || reference) per response, nats")
    metrics.plot(run_dir / "policy.png", ["policy/approx_kl", "policy/clipfrac", "objective/entropy"], "policy diagnostics")
    if cfg.algorithm in ("ppo", "a2c"):
        metrics.plot(run_dir / "value.png", ["value/loss", "value/explained_var"], "value head")
