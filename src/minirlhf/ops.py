"""Pure tensor math shared by the RL stages. Every function is tested against a naive loop.

Shapes: B responses, T response tokens (right-padded); `mask` (B, T) is 1 on real tokens, 0 on padding.
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the positions where mask is 1 (over all of them, or along `dim`)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over the masked positions (Bessel-corrected by default)."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask)
    return var * n / (n - 1) if unbiased and n > 1 else var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked positions; with shift_mean=False the mean is added back.
    Padding positions come out as 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    white = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return white * mask.to(x.dtype)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016, eq. 16) over right-padded responses.

    rewards, values, mask: (B, T). delta_t = r_t + gamma V_{t+1} - V_t with V = 0 after the last real
    token; A_t = delta_t + gamma lam A_{t+1}. Returns (advantages, returns = advantages + values), 0 on padding.
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    T = rewards.size(1)
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * mask


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probabilities.

    With log r = ref_logprobs - logprobs (Schulman, "Approximating KL divergence", 2020):
    k1 = -log r (unbiased, can be negative), k2 = (log r)^2 / 2, k3 = (r - 1) - log r (unbiased, >= 0).
    """
    log_ratio = ref_logprobs - logprobs
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio ** 2
    if kind == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; use k1, k2 or k3")


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token reward (Ziegler et al., 2019): -kl_coef * KL on every token, plus the sequence score
    on the last real token. scores (B,), kl and mask (B, T) -> (B, T)."""
    mask = mask.to(kl.dtype)
    rewards = -kl_coef * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)  # (B,) index of the last real token
    return rewards.scatter_add(1, last.unsqueeze(1), (scores * (mask.sum(1) > 0)).unsqueeze(1))


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position: logits (..., V) -> (...).
    Tokens masked out with -inf logits count as probability 0 (not 0 * -inf = nan)."""
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp.masked_fill(logp.isinf(), 0)).sum(-1)


def group_whiten(scores: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantage (Shao et al., 2024, sec. 4.1.2): each score standardised within its group.
    scores (B,) with groups of `group_size` consecutive samples of one prompt -> (B,)."""
    groups = scores.view(-1, group_size)  # (B / G, G)
    std = groups.std(1, keepdim=True) if group_size > 1 else torch.ones_like(groups[:, :1])
    return ((groups - groups.mean(1, keepdim=True)) / (std + eps)).view(-1)


def leave_one_out(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO's advantage (Kool et al., 2019; Ahmadian et al., 2024): each score minus the mean of the
    other samples of its prompt. scores (B,) in groups of `group_size` consecutive samples -> (B,)."""
    if group_size < 2:
        raise ValueError("leave-one-out needs at least two samples per prompt")
    groups = scores.view(-1, group_size)  # (B / G, G)
    others = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).view(-1)
