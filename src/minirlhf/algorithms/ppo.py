"""PPO for RLHF (Ziegler et al., 2019; Stiennon et al., 2020): make a policy write what the reward
model prefers while a per-token KL penalty keeps it near the frozen reference.

What is PPO's own: the per-token reward (score on the last token, KL penalty on every token), GAE over
a learned value, the clipped value loss, and A2C as its one-epoch, one-minibatch case. The loop, the
clipped policy loss and the adaptive KL controller are shared with the other algorithms (rl.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from minirlhf.algorithms.rl import RLConfig
from minirlhf.algorithms.rl import train as rl_train
from minirlhf.ops import gae, masked_mean, masked_var, masked_whiten, token_rewards


@dataclass
class PPOConfig(RLConfig):
    critic: str = "head"
    """value estimates from a `head` on the policy's trunk, or from a `separate` copy of the starting model"""
    vf_coef: float = 0.5
    """weight of the value loss"""
    clip_value: float = 0.2
    """value-prediction clip range around the old values"""
    gamma: float = 1.0
    """discount"""
    gae_lambda: float = 0.95
    """GAE lambda"""

    algorithm = "ppo"
    checks = {**RLConfig.checks, "critic": "{head,separate}", "vf_coef": ">= 0", "clip_value": "> 0",
              "gamma": "[0, 1]", "gae_lambda": "[0, 1]"}


@dataclass
class A2CConfig(PPOConfig):
    """A2C (Mnih et al., 2016) is PPO with one gradient step per rollout: the probability ratio is then
    exactly 1, so the clipped objective is the plain policy gradient A * grad log pi."""

    ppo_epochs: int = 1
    """passes over each batch of rollouts (1 for A2C)"""
    minibatch_size: int = 64
    """responses per gradient step (at least batch_size for A2C: one step per rollout)"""
    lr: float = 1e-3
    """Adam learning rate"""

    algorithm = "a2c"
    checks = {**PPOConfig.checks, "ppo_epochs": "[1, 1]"}


def value_loss(values, old_values, returns, mask, clip_value: float) -> torch.Tensor:
    """Clipped value loss: 0.5 E[max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)]. All (B, T)."""
    clipped = old_values + (values - old_values).clamp(-clip_value, clip_value)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def advantages(scores, kl, values, mask, kl_coef: float, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards (score on the last token, -kl_coef * KL on each), then GAE; advantages whitened.
    scores (B,), kl, values, mask (B, T) -> advantages, returns (B, T)."""
    rewards = token_rewards(scores, kl, mask, kl_coef)
    adv, returns = gae(rewards, values, mask, cfg.gamma, cfg.gae_lambda)
    return masked_whiten(adv, mask), returns


def explained_variance(values, returns, mask) -> float:
    """1 - Var[R - V] / Var[R] over real tokens: 1 is a perfect critic, 0 no better than a constant."""
    var = masked_var(returns, mask)
    return (1 - masked_var(returns - values, mask) / var).item() if var > 0 else float("nan")


def train(cfg: PPOConfig) -> Path:
    """PPO (or A2C, with an A2CConfig); returns the run directory."""
    return rl_train(cfg)
