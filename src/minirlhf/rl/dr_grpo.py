"""Dr. GRPO, "GRPO done right" (Liu et al., 2025, "Understanding R1-Zero-Like Training: A Critical Perspective").

GRPO divides each advantage by its group's reward std, which weighs prompts that are too easy or too hard more, and
its usual loss averages each response's tokens, which makes long wrong answers cheap. Dr. GRPO removes both biases:
the advantage is the reward minus the group's mean (no std), and every loss is a sum over tokens divided by a
constant, the minibatch's responses x `response_len`, not by the tokens it happens to hold. The KL term against the
reference stays in the loss, as in GRPO (k3); the paper drops it (kl_coef=0) for rule-based rewards.

This file is the whole algorithm: its config, its advantage, its normaliser, and its `Algorithm`, which
registry.py lists. Nothing else changed to add it: not the loop (rl.py), the CLI, evaluate or feedback.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minirlhf.rl.core import Algorithm, Batch, GroupConfig, RLConfig, k3_in_loss
from minirlhf.ops import per_token, returns_to_go, turn_index


@dataclass
class DrGRPOConfig(GroupConfig, RLConfig):
    kl_coef: float = 0.04
    """weight of the k3 KL term in the loss (0 drops it, as the paper does for rule-based rewards)"""

    algorithm = "dr_grpo"


def group_center(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each score minus the mean of its group (Liu et al., 2025, eq. 2 without GRPO's division by the std).
    scores (B,) or (B, K) in groups of `group_size` consecutive samples of one prompt -> same."""
    groups = scores.reshape(-1, group_size, *scores.shape[1:])  # (B / G, G) or (B / G, G, K)
    return (groups - groups.mean(1, keepdim=True)).reshape(scores.shape)


def advantages(cfg, rollout, scores, kl, kl_coef: float) -> Batch:
    """Each score (B, K) minus its group's mean (per turn, as returns-to-go), broadcast over its tokens -> (B, T)."""
    mask = rollout.response_mask
    turns = turn_index(mask, rollout.turn_ids)
    return Batch(rollout, kl.ref_logprobs, per_token(group_center(returns_to_go(scores), cfg.group_size), turns) * mask)


def constant_normaliser(mask: torch.Tensor, cfg) -> torch.Tensor:
    """Responses x the longest a response may be: the same for every minibatch of that many responses, so no
    response's tokens count for more because it is short."""
    return torch.tensor(float(mask.size(0) * cfg.response_len), device=mask.device)


DR_GRPO = Algorithm(DrGRPOConfig, "Dr. GRPO", "Dr. GRPO: group-mean baseline, no std, token sums over a constant",
                    advantages, grouped=True, loss_terms=k3_in_loss, normaliser=constant_normaliser)
