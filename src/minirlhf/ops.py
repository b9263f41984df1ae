"""Pure tensor math shared by the RL stages. Every function is tested against a naive loop.

Shapes: B responses (or episodes), T response tokens (right-padded); `mask` (B, T) is 1 on the tokens that train,
0 elsewhere: padding, and in a multi-turn episode the user's tokens between the assistant's turns. K: turns.
"""

from __future__ import annotations

import math

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
    """Generalised advantage estimation (Schulman et al., 2016, eq. 16) over the positions where mask is 1.

    rewards, values, mask: (B, T). The masked positions of a row are its time steps, whatever lies between them:
    in an episode the user's tokens are holes in the mask, and GAE runs over the assistant's tokens only (the next
    value of an assistant turn's last token is the first token of the next assistant turn), so no reward, value or
    KL ever lands on a user token. delta_t = r_t + gamma V_next - V_t with V = 0 after the last masked position;
    A_t = delta_t + gamma lam A_next. Returns (advantages, returns = advantages + values), 0 off the mask.
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])  # (B,) the advantage of the next masked position
    next_value = torch.zeros_like(last)  # (B,) its value
    for t in reversed(range(rewards.size(1))):
        on = mask[:, t] > 0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = torch.where(on, delta + gamma * lam * last, last)
        next_value = torch.where(on, values[:, t], next_value)
        advantages[:, t] = last * mask[:, t]
    return advantages, (advantages + values) * mask


def turn_index(mask: torch.Tensor, turn_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The assistant turn (0, 1, ...) of every position (B, T), -1 off the mask; a single reply is turn 0."""
    index = torch.zeros_like(mask, dtype=torch.long) if turn_ids is None else turn_ids.long()
    return torch.where(mask > 0, index, torch.full_like(index, -1))


def turn_ends(turns: torch.Tensor, n_turns: int) -> torch.Tensor:
    """Index (B, K) of each turn's last position in turns (B, T) (from `turn_index`); -1 where a row has no turn k."""
    T = turns.size(1)
    pos = torch.arange(T, device=turns.device).expand_as(turns)  # (B, T)
    ends = torch.full((turns.size(0), n_turns), -1, dtype=torch.long, device=turns.device)  # (B, K)
    for k in range(n_turns):
        ends[:, k] = torch.where(turns == k, pos, torch.full_like(pos, -1)).max(1).values
    return ends


def place_turn_rewards(scores: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Each turn's score on that turn's last token: scores (B,) or (B, K), turns (B, T) from `turn_index` -> (B, T).
    A (B,) score is one turn's: a single reply's, or an episode's placed on its last turn."""
    scores = scores.unsqueeze(1) if scores.dim() == 1 else scores
    if scores.size(1) == 1:  # an episode's one score: its last turn, whichever that is
        turns = torch.where(turns >= 0, torch.zeros_like(turns), turns)
    ends = turn_ends(turns, scores.size(1))  # (B, K)
    placed = torch.zeros(turns.shape, dtype=scores.dtype, device=scores.device)  # (B, T)
    ok = ends >= 0
    return placed.scatter_add(1, ends.clamp(min=0), torch.where(ok, scores, torch.zeros_like(scores)))


def per_token(turn_values: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """turn_values (B,) or (B, K) spread over each turn's tokens: (B, T), 0 off the mask (turns from `turn_index`)."""
    turn_values = turn_values.unsqueeze(1) if turn_values.dim() == 1 else turn_values
    if turn_values.size(1) == 1:
        turns = torch.where(turns >= 0, torch.zeros_like(turns), turns)
    picked = turn_values.gather(1, turns.clamp(min=0))  # (B, T)
    return torch.where(turns >= 0, picked, torch.zeros_like(picked))


def turn_sums(x: torch.Tensor, turns: torch.Tensor, n_turns: int) -> torch.Tensor:
    """Sum of x (B, T) over each turn's tokens: (B, K) (turns from `turn_index`; positions off the mask add nothing)."""
    sums = torch.zeros(x.size(0), n_turns + 1, dtype=x.dtype, device=x.device)  # (B, K + 1): the last takes -1
    index = torch.where(turns >= 0, turns, torch.full_like(turns, n_turns))
    return sums.scatter_add(1, index, x)[:, :n_turns]


def returns_to_go(turn_rewards: torch.Tensor) -> torch.Tensor:
    """Undiscounted return from each turn on: (B, K) -> (B, K), G_k = r_k + r_{k+1} + ... (per-turn credit for
    critic-free algorithms: a turn is credited with what follows it, never with what came before)."""
    turn_rewards = turn_rewards.view(turn_rewards.size(0), -1)  # a score per response (B,) is one turn's
    return turn_rewards.flip(1).cumsum(1).flip(1)


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


def win_outcomes(policy_reward: torch.Tensor, reference_reward: torch.Tensor) -> torch.Tensor:
    """Each comparison's outcome for the policy: 1 a win, 0.5 a tie, 0 a loss. (N,), (N,) -> (N,)."""
    return (policy_reward > reference_reward).float() + 0.5 * (policy_reward == reference_reward).float()


def win_rate(outcomes) -> float | None:
    """The share of comparisons the policy won, a tie counting half: (#wins + 0.5 #ties) / N over outcomes of 1,
    0.5 and 0 (a tensor or a list: rewards compared by `win_outcomes`, or people's judgements); None for none."""
    outcomes = torch.as_tensor(outcomes, dtype=torch.float32)
    return outcomes.mean().item() if outcomes.numel() else None


def token_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The k1 estimate log pi(y_t) - log pi_ref(y_t) of each real token, 0 on padding, whatever its log-probs hold
    (`where`, not a product: 0 * inf is nan). logprobs, ref_logprobs, mask (B, T) -> (B, T)."""
    return torch.where(mask.bool(), kl_estimate(logprobs, ref_logprobs, "k1"), 0.0)


def response_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(policy || reference) of each response, nats: `token_kl` summed over its tokens. logprobs, ref_logprobs,
    mask (B, T) -> (B,). What RL logs as `objective/kl`, evaluation reports (an episode's per turn) and the
    benchmarks plot against."""
    return token_kl(logprobs, ref_logprobs, mask).sum(1)


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float,
                  turn_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token reward (Ziegler et al., 2019): -kl_coef * KL on every token, plus the sequence score on the last
    real token; in an episode each turn's score (B, K) on that turn's last assistant token (`place_turn_rewards`).
    scores (B,) or (B, K), kl and mask (B, T) -> (B, T)."""
    mask = mask.to(kl.dtype)
    return -kl_coef * kl * mask + place_turn_rewards(scores.to(kl.dtype), turn_index(mask, turn_ids))


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position: logits (..., V) -> (...).
    Tokens masked out with -inf logits count as probability 0 (not 0 * -inf = nan)."""
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp.masked_fill(logp.isinf(), 0)).sum(-1)


def group_whiten(scores: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantage (Shao et al., 2024, sec. 4.1.2): each score standardised within its group.
    scores (B,) or (B, K) (a column per turn) with groups of `group_size` consecutive samples of one prompt -> same.
    """
    groups = scores.reshape(-1, group_size, *scores.shape[1:])  # (B / G, G) or (B / G, G, K)
    std = groups.std(1, keepdim=True) if group_size > 1 else torch.ones_like(groups[:, :1])
    return ((groups - groups.mean(1, keepdim=True)) / (std + eps)).reshape(scores.shape)


def leave_one_out(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO's advantage (Kool et al., 2019; Ahmadian et al., 2024): each score minus the mean of the
    other samples of its prompt. scores (B,) or (B, K) in groups of `group_size` consecutive samples -> same."""
    if group_size < 2:
        raise ValueError("leave-one-out needs at least two samples per prompt")
    groups = scores.reshape(-1, group_size, *scores.shape[1:])  # (B / G, G) or (B / G, G, K)
    others = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).reshape(scores.shape)


# ------------------------------------------------------------------- best-of-n from a pool of samples
def order_weights(m: int, n: int) -> torch.Tensor:
    """(m,) the chance that the i-th lowest of m samples (by proxy) is the best of a uniform n-subset:
    C(i-1, n-1) / C(m, n); averaging by these is the unbiased best-of-n estimate from m >= n samples."""
    i = torch.arange(1, m + 1, dtype=torch.float64)
    log_w = (torch.lgamma(i) - torch.lgamma(i - n + 1).where(i >= n, torch.tensor(0.0, dtype=torch.float64))
             - math.lgamma(n)) - (math.lgamma(m + 1) - math.lgamma(n + 1) - math.lgamma(m - n + 1))
    return torch.where(i >= n, log_w.exp(), torch.zeros_like(i))


def beirami_kl(logprob: torch.Tensor, n: int) -> torch.Tensor:
    """Beirami et al. (2024, section 4)'s estimate of KL(best-of-n || reference) from the reference's probability
    eps of the chosen response: (1-eps)^n (log n + (n-1) log(1-eps) - (n-1)/n) + (1-(1-eps)^n) log((1-(1-eps)^n)/eps).
    It tends to the usual log n - (n-1)/n as eps -> 0 and to 0 as eps -> 1."""
    log_eps = logprob.double().clamp(max=-1e-12)
    log_rest = torch.log1p(-log_eps.exp())  # log(1 - eps), exact for tiny eps
    stay = (n * log_rest).exp()  # (1 - eps)^n
    moved = -torch.expm1(n * log_rest)  # 1 - (1 - eps)^n
    return stay * (math.log(n) + (n - 1) * log_rest - (n - 1) / n) + moved * (moved.log() - log_eps)
