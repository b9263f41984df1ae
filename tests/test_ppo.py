import json
import math

import pytest
import torch

from minirlhf.algorithms.ppo import AdaptiveKLController, PPOConfig, make_prompts, policy_loss, train, value_loss
from minirlhf.config import load_config
from minirlhf.data.vocab import Vocab
from minirlhf.models.lstm import LSTMConfig, LSTMLanguageModel
from minirlhf.models.policy import LSTMPolicy


@pytest.fixture
def tensors():
    torch.manual_seed(0)
    B, T = 3, 5
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.float32)
    return torch.randn(B, T) * 0.3, torch.randn(B, T) * 0.3, torch.randn(B, T), mask


def test_policy_loss_matches_naive_loop(tensors):
    logp, old, adv, mask = tensors
    loss, stats = policy_loss(logp, old, adv, mask, clip_eps=0.2)
    terms, clipped, kls = [], 0, []
    for b in range(3):
        for t in range(5):
            if mask[b, t]:
                r = math.exp(logp[b, t].item() - old[b, t].item())
                a = adv[b, t].item()
                terms.append(-min(r * a, min(max(r, 0.8), 1.2) * a))
                clipped += -min(max(r, 0.8), 1.2) * a > -r * a
                kls.append(0.5 * (logp[b, t].item() - old[b, t].item()) ** 2)
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    assert stats["policy/clipfrac"] == pytest.approx(clipped / len(terms))
    assert stats["policy/approx_kl"] == pytest.approx(sum(kls) / len(kls), rel=1e-5)


def test_value_loss_matches_naive_loop(tensors):
    values, old, returns, mask = tensors
    loss = value_loss(values, old, returns, mask, clip_value=0.2)
    terms = []
    for b in range(3):
        for t in range(5):
            if mask[b, t]:
                v, o, r = values[b, t].item(), old[b, t].item(), returns[b, t].item()
                vc = o + min(max(v - o, -0.2), 0.2)
                terms.append(0.5 * max((v - r) ** 2, (vc - r) ** 2))
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_adaptive_kl_controller():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    ctl.update(12.0, 100)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    ctl.update(5.4, 100)  # error -0.1
    assert ctl.value == pytest.approx(0.1 * 1.02 * (1 - 0.1 * 0.1))
    fixed = AdaptiveKLController(0.1, 6.0, 1000, adaptive=False)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.1


def test_lstm_policy_scores_the_tokens_it_sampled():
    torch.manual_seed(0)
    v = Vocab.build(["the movie was good", "the film was bad", "i love it"] * 2, min_freq=1)
    lm = LSTMLanguageModel(LSTMConfig(emb_dim=16, hidden_dim=16), len(v)).eval()
    policy = LSTMPolicy(lm, v).eval()
    rollout = policy.sample(["the movie", "i", "the film was"], 6, torch.Generator().manual_seed(0))
    logprobs, values, entropy = policy(rollout)
    for b in range(3):
        n = int(rollout.response_mask[b].sum())
        ids = rollout.prompt_ids[b] + rollout.response_ids[b, :n].tolist()
        logits = lm(torch.tensor([ids]))[0][0]
        logits[:, [v.pad_id, v.bos_id]] = float("-inf")
        p = len(rollout.prompt_ids[b])
        naive = [logits[p - 1 + t].log_softmax(-1)[ids[p + t]].item() for t in range(n)]
        assert logprobs[b, :n].tolist() == pytest.approx(naive, abs=1e-5)
        assert (logprobs[b, n:] == 0).all() and (entropy[b, n:] == 0).all()
    assert torch.isfinite(logprobs).all() and values.shape == logprobs.shape


def test_prompts_are_the_first_words():
    assert make_prompts(["I love it so much", "i love it", "Great!"], 2) == ["i love", "great!"]


def _ppo(tiny_generator, tiny_classifier, out, *extra):
    cfg = load_config(PPOConfig, overrides=[f"--policy={tiny_generator}", f"--reward={tiny_classifier}",
                                            f"--out={out}", "--device=cpu", "--data.max_train=400",
                                            "--data.max_eval=100", *extra])
    return train(cfg)


def test_two_ppo_steps_change_the_policy_with_finite_losses(tiny_generator, tiny_classifier, tmp_path):
    from minirlhf.algorithms.generator import load_generator

    run = _ppo(tiny_generator, tiny_classifier, tmp_path / "ppo", "--steps=2", "--batch_size=8", "--minibatch_size=4")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for name in ("reward/mean", "reward/std", "objective/kl", "objective/kl_coef", "objective/entropy",
                 "policy/approx_kl", "policy/clipfrac", "policy/ratio_max", "value/explained_var", "value/loss",
                 "time/rollout_s", "time/update_s"):
        assert name in rows[-1], name
    assert all(math.isfinite(r["value/loss"]) and math.isfinite(r["policy/loss"]) for r in rows)
    before, _ = load_generator(tiny_generator)
    after, _ = load_generator(run)
    assert not torch.equal(before.lstm.weight_hh_l0, after.lstm.weight_hh_l0)
    for name in ("config.yaml", "reward.png", "kl.png", "results.json", "value_head.safetensors"):
        assert (run / name).is_file(), name


@pytest.mark.slow
def test_ppo_raises_the_reward_of_the_lstm(tiny_generator, learned_classifier, tmp_path):
    """Learning test: 25 PPO steps raise the held-out reward over the reference's."""
    run = _ppo(tiny_generator, learned_classifier, tmp_path / "ppo", "--steps=25", "--batch_size=32", "--lr=1e-3")
    results = json.loads((run / "results.json").read_text())["after"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first = sum(r["reward/mean"] for r in rows[:5]) / 5
    last = sum(r["reward/mean"] for r in rows[-5:]) / 5
    assert last > first + 0.3, (first, last)
    assert results["reward_policy"] > results["reward_reference"] and results["win_rate"] > 0.6, results
