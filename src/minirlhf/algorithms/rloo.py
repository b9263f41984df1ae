"""RLOO (Ahmadian et al., 2024, "Back to Basics"): no critic; several responses per prompt, each one's
baseline the mean reward of the others. The KL penalty is subtracted from the reward per response, as in
PPO; the loop and the clipped objective are shared (rl.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from minirlhf.algorithms.rl import RLConfig
from minirlhf.algorithms.rl import train as rl_train
from minirlhf.ops import leave_one_out, masked_whiten


@dataclass
class RLOOConfig(RLConfig):
    group_size: int = 4
    """responses sampled per prompt; batch_size must be a multiple of it"""
    kl_coef: float = 0.05
    """coefficient of the per-response KL penalty in the reward"""
    adaptive_kl: bool = False
    """adapt kl_coef towards kl_target"""
    ppo_epochs: int = 1
    """passes over each batch of rollouts"""
    lr: float = 5e-4
    """Adam learning rate"""

    algorithm = "rloo"
    checks = {**RLConfig.checks, "group_size": ">= 2"}


def advantages(rewards: torch.Tensor, group_size: int, mask: torch.Tensor) -> torch.Tensor:
    """Leave-one-out advantages of the KL-penalised rewards (B,), broadcast over tokens and whitened -> (B, T)."""
    return masked_whiten(leave_one_out(rewards, group_size).unsqueeze(1) * mask, mask)


def train(cfg: RLOOConfig) -> Path:
    return rl_train(cfg)
