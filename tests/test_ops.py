"""ops.py against naive Python loops."""

import itertools
import math

import pytest
import torch

from minirlhf.ops import (beirami_kl, entropy_from_logits, gae, kl_estimate, masked_mean, masked_var, masked_whiten,
                          order_weights, token_rewards)


@pytest.fixture
def batch():
    torch.manual_seed(0)
    B, T = 4, 7
    lengths = [7, 3, 1, 5]
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths], dtype=torch.float32)
    return torch.randn(B, T), torch.randn(B, T), mask, lengths


def test_masked_mean_var_whiten(batch):
    x, _, mask, lengths = batch
    vals = [x[b, t].item() for b, n in enumerate(lengths) for t in range(n)]
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    assert masked_mean(x, mask).item() == pytest.approx(mean, rel=1e-5)
    assert masked_var(x, mask).item() == pytest.approx(var, rel=1e-5)
    w = masked_whiten(x, mask)
    for b, n in enumerate(lengths):
        for t in range(7):
            expected = (x[b, t].item() - mean) / math.sqrt(var + 1e-8) if t < n else 0.0
            assert w[b, t].item() == pytest.approx(expected, abs=1e-5)
    assert masked_mean(masked_whiten(x, mask, shift_mean=False), mask).item() == pytest.approx(mean, abs=1e-5)
    rows = masked_mean(x, mask, dim=1)
    assert rows[1].item() == pytest.approx(sum(x[1, :3].tolist()) / 3, rel=1e-5)


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 1.0), (0.99, 0.0)])
def test_gae_matches_naive_loop(batch, gamma, lam):
    rewards, values, mask, lengths = batch
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        for t in range(7):
            if t >= n:
                assert adv[b, t] == 0 and ret[b, t] == 0
                continue
            expected = 0.0
            for k in range(t, n):  # A_t = sum_k (gamma lam)^(k-t) delta_k
                v_next = values[b, k + 1].item() if k + 1 < n else 0.0
                delta = rewards[b, k].item() + gamma * v_next - values[b, k].item()
                expected += (gamma * lam) ** (k - t) * delta
            assert adv[b, t].item() == pytest.approx(expected, abs=1e-5)
            assert ret[b, t].item() == pytest.approx(expected + values[b, t].item(), abs=1e-5)


def test_kl_estimators():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -1.0, -0.5])
    for i in range(3):
        lr = ref[i].item() - logp[i].item()
        assert kl_estimate(logp, ref, "k1")[i].item() == pytest.approx(-lr)
        assert kl_estimate(logp, ref, "k2")[i].item() == pytest.approx(0.5 * lr * lr)
        assert kl_estimate(logp, ref, "k3")[i].item() == pytest.approx(math.exp(lr) - 1 - lr)
    assert (kl_estimate(logp, ref, "k3") >= 0).all()
    with pytest.raises(ValueError):
        kl_estimate(logp, ref, "k9")


def test_k1_and_k3_are_unbiased_estimates_of_the_true_kl():
    torch.manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.3, 0.5])
    true_kl = (p * (p / q).log()).sum().item()
    idx = torch.multinomial(p, 200000, replacement=True)
    for kind in ("k1", "k3"):
        est = kl_estimate(p.log()[idx], q.log()[idx], kind).mean().item()
        assert est == pytest.approx(true_kl, abs=0.01)


def test_token_rewards_put_the_score_on_the_last_real_token(batch):
    _, kl, mask, lengths = batch
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
    r = token_rewards(scores, kl, mask, kl_coef=0.1)
    for b, n in enumerate(lengths):
        for t in range(7):
            expected = (-0.1 * kl[b, t].item() if t < n else 0.0) + (scores[b].item() if t == n - 1 else 0.0)
            assert r[b, t].item() == pytest.approx(expected, abs=1e-6)


def test_entropy_from_logits():
    logits = torch.tensor([[0.0, 0.0], [10.0, -10.0]])
    h = entropy_from_logits(logits)
    assert h[0].item() == pytest.approx(math.log(2))
    assert h[1].item() == pytest.approx(0.0, abs=1e-6)
    masked = entropy_from_logits(torch.tensor([[0.0, 0.0, float("-inf")]]))
    assert masked[0].item() == pytest.approx(math.log(2))


def test_group_whiten_matches_naive_loop():
    from minirlhf.ops import group_whiten

    torch.manual_seed(0)
    scores = torch.randn(12)
    out = group_whiten(scores, 4)
    for g in range(3):
        vals = scores[4 * g: 4 * g + 4].tolist()
        mean = sum(vals) / 4
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / 3)
        for i in range(4):
            assert out[4 * g + i].item() == pytest.approx((vals[i] - mean) / (std + 1e-4), rel=1e-5)


def test_leave_one_out_matches_naive_loop():
    from minirlhf.ops import leave_one_out

    torch.manual_seed(0)
    scores = torch.randn(9)
    out = leave_one_out(scores, 3)
    for i in range(9):
        g = i // 3
        others = [scores[j].item() for j in range(3 * g, 3 * g + 3) if j != i]
        assert out[i].item() == pytest.approx(scores[i].item() - sum(others) / 2, abs=1e-6)
    with pytest.raises(ValueError):
        leave_one_out(scores, 1)


@pytest.mark.parametrize("m,n", [(6, 1), (6, 3), (7, 7), (9, 4)])
def test_order_weights_are_how_often_each_rank_is_the_best_of_an_n_subset(m, n):
    wins = [0] * m
    subsets = list(itertools.combinations(range(m), n))
    for subset in subsets:
        wins[max(subset)] += 1  # ranks ascending: the subset's best is its highest rank
    expected = torch.tensor([w / len(subsets) for w in wins], dtype=torch.float64)
    assert torch.allclose(order_weights(m, n), expected, atol=1e-12)


def bon_kl_exact(eps: float, n: int, atoms: int = 200_000) -> float:
    """KL(best-of-n || reference) of a reference with one top-reward atom of mass eps and `atoms` equal atoms
    below it: pi_n(y_i) = F_i^n - F_(i-1)^n over outcomes in reward order."""
    probs = torch.cat([torch.full((atoms,), (1 - eps) / atoms, dtype=torch.float64),
                       torch.tensor([eps], dtype=torch.float64)])
    cdf = probs.cumsum(0)
    bon = cdf ** n - torch.cat([torch.zeros(1, dtype=torch.float64), cdf[:-1]]) ** n
    keep = bon > 0
    return (bon[keep] * (bon[keep] / probs[keep]).log()).sum().item()


@pytest.mark.parametrize("eps,n", [(1e-9, 4), (0.01, 16), (0.2, 8), (0.6, 64)])
def test_beirami_kl_is_the_exact_kl_of_best_of_n_over_one_top_atom_and_a_continuum(eps, n):
    got = beirami_kl(torch.tensor([math.log(eps)]), n).item()
    assert got == pytest.approx(bon_kl_exact(eps, n), abs=2e-3)
    assert got <= math.log(n) - (n - 1) / n + 1e-9  # the usual formula bounds it
    assert beirami_kl(torch.tensor([-80.0]), n).item() == pytest.approx(math.log(n) - (n - 1) / n)


def test_win_rate_is_wins_plus_half_the_ties_over_all_for_rewards_and_for_judgements_alike():
    """One formula for the policy-vs-reference win rate: evaluation's (rewards compared) and the feedback page's
    (people's judgements, 1 / 0.5 / 0) go through ops.win_rate; checked against a plain count."""
    from minirlhf.feedback.figures import win_rate as judged
    from minirlhf.ops import win_outcomes, win_rate

    g = torch.Generator().manual_seed(0)
    policy, reference = torch.randint(0, 3, (50,), generator=g).float(), torch.randint(0, 3, (50,), generator=g).float()
    wins = sum(1.0 if p > r else 0.5 if p == r else 0.0 for p, r in zip(policy.tolist(), reference.tolist()))
    assert win_rate(win_outcomes(policy, reference)) == pytest.approx(wins / 50)
    scores = win_outcomes(policy, reference).tolist()
    assert judged(scores)["win_rate"] == pytest.approx(wins / 50)
    assert win_rate([]) is None and judged([])["win_rate"] is None


def test_token_and_response_kl_match_a_loop_over_real_tokens_and_ignore_what_padding_holds(batch):
    from minirlhf.ops import response_kl, token_kl

    logprobs, ref_logprobs, mask, lengths = batch
    ref_logprobs = ref_logprobs.masked_fill(mask == 0, float("-inf"))  # padding may hold anything
    per_token = token_kl(logprobs, ref_logprobs, mask)
    for b, n in enumerate(lengths):
        for t in range(mask.size(1)):
            want = logprobs[b, t].item() - ref_logprobs[b, t].item() if t < n else 0.0
            assert per_token[b, t].item() == pytest.approx(want, abs=1e-6)
        assert response_kl(logprobs, ref_logprobs, mask)[b].item() == pytest.approx(
            sum(logprobs[b, t].item() - ref_logprobs[b, t].item() for t in range(n)), abs=1e-5)
