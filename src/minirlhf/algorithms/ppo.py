"""PPO for RLHF (Ziegler et al., 2019; Stiennon et al., 2020): make a policy write what the reward
model prefers while a per-token KL penalty keeps it near the frozen reference.

This file holds the PPO-specific pieces: the clipped losses, the adaptive KL controller and `train`.
The shared math (GAE, whitening, KL estimators) is in ops.py.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minirlhf import UserError
from minirlhf.checkpoint import save_json, save_weights
from minirlhf.config import DataConfig, RunConfig, save_config
from minirlhf.data.sentiment import load_splits
from minirlhf.metrics import MetricsWriter
from minirlhf.ops import gae, kl_estimate, masked_mean, masked_var, masked_whiten, token_rewards
from minirlhf.runtime import make_run_dir, peak_memory_mb, pick_device, seed_everything
from minirlhf.training import optimizer_step, progress


@dataclass
class PPOConfig(RunConfig):
    policy: str = ""
    """run directory of a trained LSTM generator (`minirlhf train-generator`)"""
    reward: str = ""
    """run directory of a trained sentiment classifier; the reward is its positive logit"""
    data: DataConfig = field(default_factory=DataConfig)
    """where the prompts come from: the first words of the training texts"""
    prompt_words: int = 2
    """words of each text used as prompt"""
    steps: int = 60
    """PPO iterations (rollout, then update)"""
    batch_size: int = 64
    """responses sampled per iteration"""
    response_len: int = 16
    """tokens per response at most"""
    ppo_epochs: int = 4
    """passes over each batch of rollouts"""
    minibatch_size: int = 16
    """responses per gradient step"""
    lr: float = 3e-4
    """Adam learning rate of policy and value head"""
    clip_eps: float = 0.2
    """PPO ratio clip range"""
    vf_coef: float = 0.5
    """weight of the value loss"""
    clip_value: float = 0.2
    """value-prediction clip range around the old values"""
    gamma: float = 1.0
    """discount"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    kl_coef: float = 0.1
    """initial coefficient of the per-token KL penalty"""
    kl_estimator: str = "k1"
    """per-token KL estimator in the reward: k1 (log-ratio) or k3"""
    adaptive_kl: bool = True
    """adapt kl_coef towards kl_target (Ziegler et al.); false keeps it fixed"""
    kl_target: float = 6.0
    """target KL per response, in nats, of the adaptive controller"""
    kl_horizon: int = 10000
    """horizon of the adaptive controller, in responses"""
    target_kl: float = 0.1
    """stop a step's epochs early once the approximate KL to the rollout policy exceeds 1.5 x this"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this"""

    checks = {**RunConfig.checks, "prompt_words": ">= 1", "steps": ">= 1", "batch_size": ">= 1", "response_len": ">= 1",
              "ppo_epochs": ">= 1", "minibatch_size": ">= 1", "lr": "> 0", "clip_eps": "> 0", "vf_coef": ">= 0",
              "clip_value": "> 0", "gamma": "[0, 1]", "gae_lambda": "[0, 1]", "kl_coef": ">= 0",
              "kl_estimator": "{k1,k3}", "kl_target": "> 0", "kl_horizon": ">= 1", "target_kl": "> 0",
              "max_grad_norm": "> 0"}


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps: float) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate objective (Schulman et al., 2017, eq. 7), negated. All inputs (B, T).

    L = -E[min(r A, clip(r, 1 - eps, 1 + eps) A)], r = exp(logprobs - old_logprobs).
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


def value_loss(values, old_values, returns, mask, clip_value: float) -> torch.Tensor:
    """Clipped value loss: 0.5 E[max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)]. All (B, T)."""
    clipped = old_values + (values - old_values).clamp(-clip_value, clip_value)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


class AdaptiveKLController:
    """Ziegler et al. (2019), sec. 2.2: kl_coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon."""

    def __init__(self, kl_coef: float, target: float, horizon: int, adaptive: bool = True):
        self.value, self.target, self.horizon, self.adaptive = kl_coef, target, horizon, adaptive

    def update(self, kl: float, n_responses: int) -> None:
        if self.adaptive:
            error = max(-0.2, min(0.2, kl / self.target - 1))
            self.value *= 1 + error * n_responses / self.horizon


def make_prompts(texts: list[str], words: int) -> list[str]:
    """The first `words` words of each text (deduplicated, order kept)."""
    from minirlhf.data.vocab import detokenize, tokenize

    prompts = [detokenize(tokenize(t)[:words]) for t in texts]
    return list(dict.fromkeys(p for p in prompts if p))


def explained_variance(values, returns, mask) -> float:
    """1 - Var[R - V] / Var[R] over real tokens: 1 is a perfect critic, 0 no better than a constant."""
    var = masked_var(returns, mask)
    return (1 - masked_var(returns - values, mask) / var).item() if var > 0 else float("nan")


def _update(policy, optimizer, rollout, old_logprobs, old_values, advantages, returns, cfg, rng) -> dict:
    """PPO epochs over minibatches; stops early when the policy moves too far from the rollout policy."""
    mask = rollout.response_mask.to(old_logprobs.device)
    params = [p for p in policy.parameters() if p.requires_grad]
    stats: list[dict] = []
    for _ in range(cfg.ppo_epochs):
        order = list(range(len(rollout.prompts)))
        rng.shuffle(order)
        for start in range(0, len(order), cfg.minibatch_size):
            idx = order[start: start + cfg.minibatch_size]
            logprobs, values, entropy = policy(rollout.select(idx))
            pg, s = policy_loss(logprobs, old_logprobs[idx], advantages[idx], mask[idx], cfg.clip_eps)
            vf = value_loss(values, old_values[idx], returns[idx], mask[idx], cfg.clip_value)
            grad_norm = optimizer_step(pg + cfg.vf_coef * vf, params, optimizer, None, cfg.max_grad_norm)
            stats.append({**s, "value/loss": vf.item(), "policy/loss": pg.item(), "policy/grad_norm": grad_norm})
        if stats[-1]["policy/approx_kl"] > 1.5 * cfg.target_kl:
            break
    return {k: sum(d[k] for d in stats) / len(stats) for k in stats[0]} | {
        "policy/ratio_max": max(d["policy/ratio_max"] for d in stats)}


@torch.no_grad()
def compare_to_reference(policy, ref, scorer, prompts: list[str], cfg: PPOConfig, seed: int) -> dict:
    """Held-out prompts: mean reward of policy and reference, win rate, KL(policy || ref) per response."""
    gen = torch.Generator(device=next(policy.parameters()).device).manual_seed(seed)
    ours, theirs = policy.sample(prompts, cfg.response_len, gen), ref.sample(prompts, cfg.response_len, gen)
    r_ours = scorer([f"{p} {t}" for p, t in zip(prompts, ours.texts)])
    r_ref = scorer([f"{p} {t}" for p, t in zip(prompts, theirs.texts)])
    logprobs, _, _ = policy(ours)
    ref_logprobs, _, _ = ref(ours)
    kl = (kl_estimate(logprobs, ref_logprobs, "k1") * ours.response_mask.to(logprobs.device)).sum(1).mean().item()
    wins = (r_ours > r_ref).float().mean().item() + 0.5 * (r_ours == r_ref).float().mean().item()
    return {"reward_policy": r_ours.mean().item(), "reward_reference": r_ref.mean().item(), "win_rate": wins,
            "kl": kl, "samples": [{"prompt": p, "policy": a, "reference": b} for p, a, b in
                                  zip(prompts[:8], ours.texts[:8], theirs.texts[:8])]}


def train(cfg: PPOConfig) -> Path:
    """Rollout, score, KL-penalised rewards, GAE, clipped PPO updates; returns the run directory."""
    from minirlhf.algorithms.generator import load_generator, save_generator
    from minirlhf.models.classifier import SentimentClassifier
    from minirlhf.models.policy import LSTMPolicy

    if not cfg.policy or not cfg.reward:
        raise UserError("ppo needs --policy GENERATOR_RUN and --reward CLASSIFIER_RUN")
    run_dir = make_run_dir(cfg.out, "ppo")
    save_config(cfg, run_dir / "config.yaml")
    seed_everything(cfg.seed)
    device, why = pick_device(cfg.device)
    print(f"device: {device} ({why})")
    policy = LSTMPolicy(*load_generator(cfg.policy, device)).to(device)
    ref = policy.frozen_copy()
    policy.eval()  # dropout off: the ratio must compare the same function before and after an update
    classifier = SentimentClassifier.from_run(cfg.reward, device)
    scorer = lambda texts: classifier.score(texts)[1]  # noqa: E731  the positive logit is the reward
    splits = load_splits(cfg.data)
    train_prompts = make_prompts([t for t, _ in splits.train], cfg.prompt_words)
    eval_prompts = make_prompts([t for t, _ in splits.val], cfg.prompt_words)[:128]
    print(f"{len(train_prompts)} training prompts, {len(eval_prompts)} held-out prompts")

    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr)
    kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon, cfg.adaptive_kl)
    metrics = MetricsWriter(run_dir)
    rng = random.Random(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    before = compare_to_reference(policy, ref, scorer, eval_prompts, cfg, cfg.seed)
    for step in progress(range(1, cfg.steps + 1), desc="ppo", unit="step"):
        t0 = time.time()
        rollout = policy.sample(rng.sample(train_prompts, min(cfg.batch_size, len(train_prompts))), cfg.response_len, gen)
        with torch.no_grad():
            old_logprobs, old_values, entropy = policy(rollout)
            ref_logprobs, _, _ = ref(rollout)
            scores = scorer([f"{p} {t}" for p, t in zip(rollout.prompts, rollout.texts)]).to(device)
        mask = rollout.response_mask.to(device)
        kl = kl_estimate(old_logprobs, ref_logprobs, cfg.kl_estimator) * mask  # (B, T)
        rewards = token_rewards(scores, kl, mask, kl_ctl.value)
        advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.gae_lambda)
        advantages = masked_whiten(advantages, mask)
        t1 = time.time()
        stats = _update(policy, optimizer, rollout, old_logprobs, old_values, advantages, returns, cfg, rng)
        seq_kl = kl.sum(1).mean().item()
        metrics.log(step, **{"reward/mean": scores.mean().item(), "reward/std": scores.std().item(),
                             "objective/kl": seq_kl, "objective/kl_coef": kl_ctl.value,
                             "objective/entropy": masked_mean(entropy, mask).item(), **stats,
                             "value/explained_var": explained_variance(old_values, returns, mask),
                             "time/rollout_s": t1 - t0, "time/update_s": time.time() - t1})
        kl_ctl.update(seq_kl, len(rollout.prompts))
    after = compare_to_reference(policy, ref, scorer, eval_prompts, cfg, cfg.seed)

    save_generator(run_dir, policy.lm, policy.vocab, cfg.steps, {"ppo_from": str(cfg.policy)})
    save_weights(policy.value_head.state_dict(), run_dir / "value_head.safetensors")
    metrics.close()
    metrics.plot(run_dir / "reward.png", ["reward/mean"], "mean reward (positive logit)")
    metrics.plot(run_dir / "kl.png", ["objective/kl"], "KL(policy || reference) per response")
    results = {"before": before, "after": after, "peak_memory_mb": round(peak_memory_mb())}
    save_json(results, run_dir / "results.json")
    print(f"held-out reward: reference {after['reward_reference']:.3f} -> policy {after['reward_policy']:.3f}, "
          f"win rate {after['win_rate']:.2f}, KL {after['kl']:.2f} nats")
    return run_dir
