"""GRPO (Shao et al., 2024, DeepSeekMath): no critic; several responses per prompt, each one's advantage its reward
standardised within its group. The KL penalty against the reference (k3 estimator) goes into the loss instead of
the reward. The loop and the clipped objective are shared (rl.py, rl_core.py).

Losses average over all tokens of the minibatch (as DAPO does) rather than per response first, so long and short
responses weigh the same per token.
"""

from __future__ import annotations

from dataclasses import dataclass

from minirlhf.algorithms.rl_core import Algorithm, Batch, GroupConfig, RLConfig, k3_in_loss
from minirlhf.ops import group_whiten


@dataclass
class GRPOConfig(GroupConfig, RLConfig):
    kl_coef: float = 0.04
    """beta: weight of the k3 KL term in the loss"""

    algorithm = "grpo"
    checks = {**RLConfig.checks, **GroupConfig.checks}


def advantages(cfg, rollout, scores, kl, kl_coef: float) -> Batch:
    """Group-standardised scores (B,) broadcast over each response's tokens -> (B, T)."""
    mask = rollout.response_mask
    return Batch(rollout, kl.ref_logprobs, group_whiten(scores, cfg.group_size).unsqueeze(1) * mask)


GRPO = Algorithm("grpo", GRPOConfig, "GRPO: group-standardised rewards, no critic", advantages, grouped=True,
                 loss_terms=k3_in_loss)
