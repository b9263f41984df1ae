"""GRPO (Shao et al., 2024, DeepSeekMath): no critic; several responses per prompt, each one's advantage
its reward standardised within its group. The KL penalty against the reference (k3 estimator) goes into
the loss instead of the reward. The loop and the clipped objective are shared (rl.py).

Losses average over all tokens of the minibatch (as DAPO does) rather than per response first, so long
and short responses weigh the same per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from minirlhf.algorithms.rl import RLConfig
from minirlhf.algorithms.rl import train as rl_train
from minirlhf.ops import group_whiten


@dataclass
class GRPOConfig(RLConfig):
    group_size: int = 4
    """responses sampled per prompt; batch_size must be a multiple of it"""
    kl_coef: float = 0.04
    """beta: weight of the k3 KL term in the loss"""
    adaptive_kl: bool = False
    """adapt kl_coef towards kl_target (off: GRPO's beta is fixed)"""
    ppo_epochs: int = 1
    """passes over each batch of rollouts"""
    lr: float = 5e-4
    """Adam learning rate"""

    algorithm = "grpo"
    checks = {**RLConfig.checks, "group_size": ">= 2"}


def advantages(scores: torch.Tensor, group_size: int, mask: torch.Tensor) -> torch.Tensor:
    """Group-standardised scores (B,) broadcast over each response's tokens -> (B, T)."""
    return group_whiten(scores, group_size).unsqueeze(1) * mask


def train(cfg: GRPOConfig) -> Path:
    return rl_train(cfg)
