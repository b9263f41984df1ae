"""ops.py against naive Python loops."""

import math

import pytest
import torch

from minirlhf.ops import entropy_from_logits, gae, kl_estimate, masked_mean, masked_var, masked_whiten, token_rewards


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
