"""What every RL algorithm is made of, and the one interface through which the loop (rl.py) uses them.

An `Algorithm` decides: how a batch of scores becomes per-token advantages (and returns, for a critic), whether it
learns a critic, the extra terms of its loss (GRPO's KL), how losses are normalised over tokens, how many samples a
prompt gets, and the checks its config needs. Each algorithm is one file (ppo.py, grpo.py, rloo.py, dr_grpo.py)
that builds an `Algorithm` from the pieces here; registry.py lists them. The loop imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Literal

import torch

from minirlhf.config import DataConfig, OptimizerConfig, TrainingRunConfig, setting
from minirlhf.data.prompts import PromptConfig
from minirlhf.envs.base import EnvConfig
from minirlhf.models.load import PolicyOptions
from minirlhf.models.policy import Rollout
from minirlhf.models.rewards import RewardConfig
from minirlhf.ops import kl_estimate, masked_mean, masked_var, response_kl


@dataclass
class RLOptimizerConfig(OptimizerConfig):
    lr: float | None = None
    """Adam learning rate (constant: RL has no warm-up or decay); None: by policy kind, DEFAULT_LR"""


DEFAULT_LR = {("lstm", False): 3e-4, ("lstm", True): 5e-4, ("lstm", "a2c"): 1e-3,
              ("causal_lm", False): 3e-5, ("causal_lm", True): 3e-5}
"""(policy kind, grouped algorithm) or (policy kind, algorithm name) -> learning rate: a small LSTM trained from
scratch moves fast and safely at 3e-4 (5e-4 with a group baseline; 1e-3 for A2C, which takes one gradient step per
rollout where PPO takes ppo_epochs x batch_size / minibatch_size, 16 by default); a pretrained LM at the LSTM's rate
left its reference by 27 nats in 6 GRPO steps (SmolLM2), and 3e-5 is what the SmolLM2 benchmarks measured
(benchmarks/sentiment_rlhf.py), for every algorithm."""


FROZEN_FRACTION = 1 / 3
"""The share of a causal LM's blocks (the lowest, with the embeddings) an RL run freezes when its config sets no
`policy_options.freeze_layers`: in the sweep of benchmarks/sentiment_rlhf.py (SmolLM2, GRPO, 2 seeds; 0, 5, 10, 15 of
30 blocks) 10 reached the target soonest by its slower seed; none was the slowest (docs/scaling.md)."""


def default_lr(kind: str, algo: Algorithm) -> float:
    """The learning rate of an RL run that sets none: the algorithm's own for this policy kind, else its kind's."""
    return DEFAULT_LR.get((kind, algo.name), DEFAULT_LR[kind, algo.grouped])


@dataclass
class RLConfig(TrainingRunConfig):
    policy: str = setting("", fixed_on_resume=True)
    """the starting policy: an LSTM generator run, an RL run, a causal LM folder or hub name, or `smollm2`
    (SmolLM2-135M-Instruct, offline)"""
    policy_options: PolicyOptions = setting(default_factory=PolicyOptions, fixed_on_resume=True)
    """how a causal LM policy is set up"""
    ref_policy: str = setting("", fixed_on_resume=True)
    """the reference the KL is measured against, if not the starting policy (`loop` keeps its first policy)"""
    reward: RewardConfig = setting(default_factory=RewardConfig, fixed_on_resume=True)
    """the reward: a weighted sum of named terms (`--reward RUN` sets reward.classifier)"""
    data: DataConfig = setting(default_factory=DataConfig, fixed_on_resume=True)
    """the corpus whose texts' first words are the prompts (unless prompts.file is set)"""
    prompts: PromptConfig = setting(default_factory=PromptConfig, fixed_on_resume=True)
    """where the prompts come from (with an environment: the openings of its episodes)"""
    env: EnvConfig = field(default_factory=EnvConfig)
    """multi-turn episodes: the environment that answers each assistant turn and scores it (`--env NAME`; default
    none: single replies scored by `reward`)"""
    train: RLOptimizerConfig = field(default_factory=RLOptimizerConfig)
    """the optimiser (Adam: no weight decay, a constant learning rate)"""
    steps: int = setting(60, ge=1)
    """iterations of rollout, then update"""
    batch_size: int = setting(64, ge=1, fixed_on_resume=True)
    """responses sampled per iteration"""
    response_len: int = setting(16, ge=1)
    """tokens per response (per assistant turn in an episode) at most"""
    ppo_epochs: int = setting(4, ge=1)
    """passes over each batch of rollouts"""
    minibatch_size: int = setting(16, ge=1)
    """responses per gradient step"""
    clip_eps: float = setting(0.2, gt=0)
    """clip range of the probability ratio"""
    kl_coef: float = setting(0.1, ge=0)
    """(initial) coefficient of the KL penalty against the reference; where the penalty goes is the algorithm's"""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """per-token KL estimator in the penalty: k1 (log-ratio) or k3 (always >= 0)"""
    adaptive_kl: bool = True
    """adapt kl_coef towards kl_target (Ziegler et al., 2019); false keeps it fixed"""
    kl_target: float = setting(6.0, gt=0)
    """target KL per response, in nats, of the adaptive controller"""
    kl_horizon: int = setting(10000, ge=1)
    """horizon of the adaptive controller, in responses"""
    target_kl: float = setting(0.1, gt=0)
    """stop a step's epochs early once the approximate KL to the rollout policy exceeds 1.5 x this"""
    sample_every: int = setting(10, ge=1)
    """add a table of sample responses to samples.md at the start and every this many steps"""
    save_every: int = 20
    eval_every: int = setting(0, ge=0)
    """log `eval/reward`, the mean reward on the held-out prompts, before training and every this many steps,
    with `time/train_s`, the training time so far: wall time from the first step's start to this step's end, the
    held-out evaluations left out (0: evaluate at the end only)"""

    algorithm: ClassVar[str] = ""


@dataclass
class GroupConfig:
    """What the group-baseline algorithms (GRPO, RLOO, Dr. GRPO) add: several samples per prompt."""

    group_size: int = setting(4, ge=2, fixed_on_resume=True)
    """responses sampled per prompt; batch_size must be a multiple of it"""
    ppo_epochs: int = 1
    """passes over each batch of rollouts"""
    adaptive_kl: bool = False
    """adapt kl_coef towards kl_target (off: a fixed coefficient)"""


@dataclass
class Batch:
    """One iteration's experience: what the update reads, all (B, T) but `rollout`."""

    rollout: Rollout
    ref_logprobs: torch.Tensor
    advantages: torch.Tensor
    old_values: torch.Tensor | None = None
    returns: torch.Tensor | None = None  # set by algorithms that learn a critic

    def select(self, idx: list[int]) -> "Batch":
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return Batch(self.rollout.select(idx), self.ref_logprobs[idx], self.advantages[idx],
                     pick(self.old_values), pick(self.returns))


@dataclass
class KLTerms:
    ref_logprobs: torch.Tensor  # (B, T)
    penalty: torch.Tensor  # (B, T) the configured estimator, 0 on padding
    k1: torch.Tensor  # (B,) summed log-ratio per response: the unbiased KL that is logged and controlled


def kl_terms(cfg, logprobs, ref_logprobs, mask) -> KLTerms:
    penalty = kl_estimate(logprobs, ref_logprobs, cfg.kl_estimator) * mask
    return KLTerms(ref_logprobs, penalty, response_kl(logprobs, ref_logprobs, mask))


def token_count(mask: torch.Tensor, cfg) -> torch.Tensor:
    """The default loss normaliser: the minibatch's real tokens, so a loss is the mean over its tokens (as DAPO),
    and long and short responses weigh the same per token."""
    return mask.sum().clamp(min=1)


@dataclass(frozen=True)
class Algorithm:
    """What an RL algorithm decides; stages/rl.py runs the loop around it."""

    config: type
    """its config dataclass, an RLConfig whose `algorithm` is the name the registry and the CLI know it by"""
    title: str
    """how reports and model cards name it ("Dr. GRPO")"""
    summary: str
    """one line for `minirlhf --help`"""
    advantages: Callable[..., Batch]
    """(cfg, rollout, scores (B,), KLTerms, kl_coef) -> Batch with advantages (B, T) (and returns, for a critic)"""
    critic: bool = False
    """learns a value model (a head on the policy or a separate copy); the clipped value loss is then added"""
    grouped: bool = False
    """samples `group_size` responses per prompt (its config is a GroupConfig)"""
    loss_terms: Callable[..., tuple[torch.Tensor, dict]] | None = None
    """(cfg, logprobs, minibatch Batch, kl_coef, denominator) -> an extra loss term and its stats"""
    normaliser: Callable[[torch.Tensor, object], torch.Tensor] = token_count
    """(response_mask of a whole minibatch (B, T), cfg) -> what the token sums of every loss are divided by"""
    check: Callable[[object], None] | None = None
    """config checks beyond the ranges of its fields; raise UserError"""

    @property
    def name(self) -> str:
        return self.config.algorithm

    def group_size(self, cfg) -> int:
        return cfg.group_size if self.grouped else 1


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps: float,
                denominator: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate objective (Schulman et al., 2017, eq. 7), negated. All inputs (B, T).

    L = -E[min(r A, clip(r, 1 - eps, 1 + eps) A)], r = exp(logprobs - old_logprobs): summed over real tokens and
    divided by `denominator` (default: their number, a token mean).
    """
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask) if denominator is None else \
        (torch.maximum(unclipped, clipped) * mask).sum() / denominator
    with torch.no_grad():
        stats = {"policy/approx_kl": masked_mean(0.5 * log_ratio ** 2, mask).item(),
                 "policy/clipfrac": masked_mean((clipped > unclipped).float(), mask).item(),
                 "policy/ratio_max": (ratio * mask).max().item()}
    return loss, stats


def value_loss(values, old_values, returns, mask, clip_value: float,
               denominator: torch.Tensor | None = None) -> torch.Tensor:
    """Clipped value loss: 0.5 E[max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)]. All (B, T)."""
    clipped = old_values + (values - old_values).clamp(-clip_value, clip_value)
    worst = torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * (masked_mean(worst, mask) if denominator is None else (worst * mask).sum() / denominator)


def explained_variance(values, returns, mask) -> float:
    """1 - Var[R - V] / Var[R] over real tokens: 1 is a perfect critic, 0 no better than a constant."""
    var = masked_var(returns, mask)
    return (1 - masked_var(returns - values, mask) / var).item() if var > 0 else float("nan")


def k3_in_loss(cfg, logprobs, mb: Batch, kl_coef: float, denominator) -> tuple[torch.Tensor, dict]:
    """The KL penalty in the loss rather than the reward (GRPO; Shao et al., 2024, eq. 3): k3 per token."""
    mask = mb.rollout.response_mask
    kl = (kl_estimate(logprobs, mb.ref_logprobs, "k3") * mask).sum() / denominator
    return kl_coef * kl, {"policy/kl_loss": kl.item()}


class AdaptiveKLController:
    """Ziegler et al. (2019), sec. 2.2: kl_coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon."""

    def __init__(self, kl_coef: float, target: float, horizon: int, adaptive: bool = True):
        self.value, self.target, self.horizon, self.adaptive = kl_coef, target, horizon, adaptive

    def update(self, kl: float, n_responses: int) -> None:
        if self.adaptive:
            error = max(-0.2, min(0.2, kl / self.target - 1))
            self.value *= 1 + error * n_responses / self.horizon
