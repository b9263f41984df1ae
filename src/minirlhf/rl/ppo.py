"""PPO for RLHF (Ziegler et al., 2019; Stiennon et al., 2020): make a policy write what the reward model prefers
while a per-token KL penalty keeps it near the frozen reference.

What is PPO's own: the per-token reward (score on the last token, KL penalty on every token), GAE over a learned
value, the clipped value loss, and A2C as its one-epoch, one-minibatch case. The loop, the clipped policy loss and
the adaptive KL controller are shared with the other algorithms (rl.py, rl_core.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from minirlhf.config import setting
from minirlhf import ConfigError
from minirlhf.rl.core import Algorithm, Batch, RLConfig, value_loss
from minirlhf.ops import gae, masked_whiten, token_rewards

__all__ = ["PPOConfig", "A2CConfig", "PPO", "A2C", "advantages", "value_loss"]  # the clipped value loss is PPO's


@dataclass
class PPOConfig(RLConfig):
    critic: Literal["head", "separate"] = "head"
    """value estimates from a `head` on the policy's trunk, or from a `separate` copy of the starting model"""
    vf_coef: float = setting(0.5, ge=0)
    """weight of the value loss"""
    clip_value: float = setting(0.2, gt=0)
    """value-prediction clip range around the old values"""
    gamma: float = setting(1.0, ge=0, le=1)
    """discount"""
    gae_lambda: float = setting(0.95, ge=0, le=1)
    """GAE lambda"""

    algorithm = "ppo"


@dataclass
class A2CConfig(PPOConfig):
    """A2C (Mnih et al., 2016) is PPO with one gradient step per rollout: the probability ratio is then
    exactly 1, so the clipped objective is the plain policy gradient A * grad log pi."""

    ppo_epochs: int = setting(1, ge=1, le=1)
    """passes over each batch of rollouts (1 for A2C)"""
    minibatch_size: int = 64
    """responses per gradient step (at least batch_size for A2C: one step per rollout)"""

    algorithm = "a2c"


def advantages(cfg, rollout, scores, kl, kl_coef: float) -> Batch:
    """Per-token rewards (each turn's score on its last token, -kl_coef * KL on each), then GAE over the assistant's
    tokens; advantages whitened. scores (B, K), kl.penalty and rollout.values (B, T) -> advantages, returns (B, T)."""
    mask = rollout.response_mask
    rewards = token_rewards(scores, kl.penalty, mask, kl_coef, rollout.turn_ids)
    adv, returns = gae(rewards, rollout.values, mask, cfg.gamma, cfg.gae_lambda)
    return Batch(rollout, kl.ref_logprobs, masked_whiten(adv, mask), rollout.values, returns)


def one_step_per_rollout(cfg) -> None:
    if cfg.ppo_epochs != 1 or cfg.minibatch_size < cfg.batch_size:
        raise ConfigError("a2c makes one gradient step per rollout: keep ppo_epochs=1 and minibatch_size >= batch_size")


PPO = Algorithm(PPOConfig, "PPO", "PPO with a value head, GAE and adaptive KL", advantages, critic=True)
A2C = Algorithm(A2CConfig, "A2C", "A2C: one unclipped policy-gradient step per rollout", advantages, critic=True,
                check=one_step_per_rollout)
