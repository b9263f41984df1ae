"""GRPO (Shao et al., 2024, DeepSeekMath): no critic; several responses per prompt, each one's advantage its reward
standardised within its group. The KL penalty against the reference (k3 estimator) goes into the loss instead of
the reward. The loop and the clipped objective are shared (rl.py, rl_core.py).

Losses average over all tokens of the minibatch (as DAPO does) rather than per response first, so long and short
responses weigh the same per token.
"""

from __future__ import annotations

from dataclasses import dataclass

from minirlhf.rl.core import Algorithm, Batch, GroupConfig, RLConfig, k3_in_loss
from minirlhf.ops import group_whiten, per_token, returns_to_go, turn_index


@dataclass
class GRPOConfig(GroupConfig, RLConfig):
    kl_coef: float = 0.04
    """beta: weight of the k3 KL term in the loss"""

    algorithm = "grpo"


def advantages(cfg, rollout, scores, kl, kl_coef: float) -> Batch:
    """Group-standardised scores broadcast over each response's tokens -> (B, T). scores (B, K): in an episode with
    per-turn credit each turn's return-to-go is standardised against the same turn of the group's other episodes."""
    mask = rollout.response_mask
    turns = turn_index(mask, rollout.turn_ids)
    return Batch(rollout, kl.ref_logprobs, per_token(group_whiten(returns_to_go(scores), cfg.group_size), turns) * mask)


GRPO = Algorithm(GRPOConfig, "GRPO", "GRPO: group-standardised rewards, no critic", advantages, grouped=True,
                 loss_terms=k3_in_loss)
