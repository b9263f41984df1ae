"""RLOO (Ahmadian et al., 2024, "Back to Basics"): no critic; several responses per prompt, each one's baseline the
mean reward of the others. The KL penalty is subtracted from the reward per response, as in PPO; the loop and the
clipped objective are shared (rl.py, rl_core.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from minirlhf.rl.core import Algorithm, Batch, GroupConfig, RLConfig
from minirlhf.ops import leave_one_out, masked_whiten, per_token, returns_to_go, turn_index, turn_sums


@dataclass
class RLOOConfig(GroupConfig, RLConfig):
    kl_coef: float = 0.05
    """coefficient of the per-response KL penalty in the reward"""

    algorithm = "rloo"


def advantages(cfg, rollout, scores, kl, kl_coef: float) -> Batch:
    """Leave-one-out advantages of the KL-penalised rewards (B, K) (each turn's KL taken from its own reward, then
    returns-to-go per turn), broadcast over tokens and whitened -> (B, T)."""
    mask = rollout.response_mask
    turns, scores = turn_index(mask, rollout.turn_ids), scores.view(len(scores), -1)  # (B, T), (B, K)
    rewards = scores - kl_coef * turn_sums(kl.penalty * mask, turns, scores.size(1))  # (B, K)
    adv = masked_whiten(per_token(leave_one_out(returns_to_go(rewards), cfg.group_size), turns) * mask, mask)
    return Batch(rollout, kl.ref_logprobs, adv)


RLOO = Algorithm(RLOOConfig, "RLOO", "RLOO: leave-one-out baselines, no critic", advantages, grouped=True)
