"""RLOO (Ahmadian et al., 2024, "Back to Basics"): no critic; several responses per prompt, each one's baseline the
mean reward of the others. The KL penalty is subtracted from the reward per response, as in PPO; the loop and the
clipped objective are shared (rl.py, rl_core.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from minirlhf.algorithms.rl_core import Algorithm, Batch, GroupConfig, RLConfig
from minirlhf.ops import leave_one_out, masked_whiten


@dataclass
class RLOOConfig(GroupConfig, RLConfig):
    kl_coef: float = 0.05
    """coefficient of the per-response KL penalty in the reward"""

    algorithm = "rloo"
    checks = {**RLConfig.checks, **GroupConfig.checks}


def advantages(cfg, rollout, scores, kl, kl_coef: float) -> Batch:
    """Leave-one-out advantages of the KL-penalised rewards (B,), broadcast over tokens and whitened -> (B, T)."""
    mask = rollout.response_mask
    rewards = scores - kl_coef * (kl.penalty * mask).sum(1)  # (B,)
    adv = masked_whiten(leave_one_out(rewards, cfg.group_size).unsqueeze(1) * mask, mask)
    return Batch(rollout, kl.ref_logprobs, adv)


RLOO = Algorithm("rloo", RLOOConfig, "RLOO: leave-one-out baselines, no critic", advantages, grouped=True)
