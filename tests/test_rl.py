"""The RL stages on the LSTM policy: losses against naive loops, two-step updates of every algorithm,
checkpoints and failures, and a learning test."""

import json
import math

import pytest
import torch
import yaml

from minirlhf import UserError
from minirlhf.rl import registry
from minirlhf.rl.grpo import GRPOConfig
from minirlhf.rl.ppo import A2CConfig, PPOConfig, value_loss
from minirlhf.stages.rl import AdaptiveKLController, _positions_read, _shuffled, policy_loss, train
from minirlhf.rl.core import DEFAULT_LR, default_lr
from minirlhf.rl.rloo import RLOOConfig
from minirlhf.config import load_config
from minirlhf.data.vocab import Vocab
from minirlhf.models.lstm import LSTMConfig, LSTMLanguageModel
from minirlhf.models.load import load_policy
from minirlhf.models.policy import LSTMPolicy

METRICS = ("reward/mean", "reward/std", "objective/kl", "objective/kl_coef", "objective/entropy", "policy/approx_kl",
           "policy/clipfrac", "policy/ratio_max", "time/rollout_s", "time/update_s")


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
    assert rollout.prompt_mask.tolist()[1] == [0, 0, 1, 1]  # left-padded: <bos> i
    logprobs, values, entropy = policy(rollout)
    assert torch.allclose(logprobs, rollout.logprobs)
    for b in range(3):
        n = int(rollout.response_mask[b].sum())
        prompt = rollout.prompt_ids[b][rollout.prompt_mask[b] == 1].tolist()
        ids = prompt + rollout.response_ids[b, :n].tolist()
        logits = lm(torch.tensor([ids]))[0][0]
        logits[:, [v.pad_id, v.bos_id]] = float("-inf")
        p = len(prompt)
        naive = [logits[p - 1 + t].log_softmax(-1)[ids[p + t]].item() for t in range(n)]
        assert logprobs[b, :n].tolist() == pytest.approx(naive, abs=1e-5)
        assert (logprobs[b, n:] == 0).all() and (entropy[b, n:] == 0).all()
        assert bool(rollout.ended[b]) == (rollout.response_ids[b, n - 1].item() == v.eos_id)
    assert torch.isfinite(logprobs).all() and values.shape == logprobs.shape


def _run(cls, tiny_generator, tiny_classifier, out, *extra):
    cfg = load_config(cls, overrides=[f"--policy={tiny_generator}", f"--reward.classifier={tiny_classifier}",
                                      f"--out={out}", "--device=cpu", "--data.max_train=400", "--data.max_eval=100",
                                      "--prompts.max_eval=16", *extra])
    return train(cfg)


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("cls, extra, critic", [
    (PPOConfig, [], True),
    (PPOConfig, ["--critic=separate"], True),
    (A2CConfig, ["--minibatch_size=8"], True),
    (GRPOConfig, ["--group_size=4"], False),
    (RLOOConfig, ["--group_size=2"], False),
])
def test_two_steps_change_the_policy_with_finite_losses(cls, extra, critic, tiny_generator, tiny_classifier, tmp_path):
    from minirlhf.stages.generator import load_generator

    run = _run(cls, tiny_generator, tiny_classifier, tmp_path / "run", "--steps=2", "--batch_size=8",
               "--minibatch_size=4", *extra)
    rows = _rows(run)
    assert len(rows) == 2
    for name in METRICS + (("value/loss", "value/explained_var") if critic else ("policy/kl_loss",) * (cls is GRPOConfig)):
        assert name in rows[-1], name
    assert all(math.isfinite(r["policy/loss"]) and math.isfinite(r.get("value/loss", 0.0)) for r in rows)
    before, _ = load_generator(tiny_generator)
    after, _ = load_generator(run / "checkpoint" / "policy")
    assert not torch.equal(before.lstm.weight_hh_l0, after.lstm.weight_hh_l0)
    for name in ("config.yaml", "reward.png", "kl.png", "results.json", "report.md", "samples.md",
                 "checkpoint/state.json", "checkpoint/trainer_state.safetensors"):
        assert (run / name).is_file(), name
    ckpt = run / "checkpoint"
    assert (ckpt / "policy" / "value_head.safetensors").is_file() == (critic and "--critic=separate" not in extra)
    assert (ckpt / "value_model").is_dir() == ("--critic=separate" in extra)
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 2 and state["algorithm"] == cls.algorithm
    lstm_lr = {"ppo": 3e-4, "a2c": 1e-3, "grpo": 5e-4, "rloo": 5e-4}[cls.algorithm]  # none set: by policy kind
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["lr"] == lstm_lr
    assert rows[-1]["memory/optimizer_mb"] > 0 and rows[-1]["memory/grads_mb"] > 0


def test_a2c_takes_the_learning_rate_of_its_policy_kind():
    """A2C kept a fixed 1e-3, which made SmolLM2 train at 33x the causal-LM rate. Its LSTM rate stays 1e-3 (one
    gradient step per rollout, where PPO takes 16 at 3e-4); a causal LM gets the causal-LM rate like every algorithm."""
    assert A2CConfig().train.lr is None
    a2c = registry.get("a2c")
    assert default_lr("causal_lm", a2c) == DEFAULT_LR["causal_lm", False] == 3e-5
    assert all(default_lr("causal_lm", algo) == 3e-5 for algo in registry.ALGORITHMS.values())
    assert default_lr("lstm", a2c) == 1e-3 and default_lr("lstm", registry.get("ppo")) == 3e-4


def test_group_algorithms_sample_each_prompt_group_size_times(tiny_generator, tiny_classifier, tmp_path):
    run = _run(GRPOConfig, tiny_generator, tiny_classifier, tmp_path / "run", "--steps=1", "--batch_size=8",
               "--group_size=4", "--sample_every=1")
    rows = (run / "samples.md").read_text().split("## step 1")[1].splitlines()[4:10]  # the table's first six rows
    prompts = [row.split("|")[1].strip() for row in rows]
    assert prompts[:4] == [prompts[0]] * 4 and prompts[4] == prompts[5] != prompts[0], rows
    with pytest.raises(UserError, match="multiple of group_size"):
        _run(GRPOConfig, tiny_generator, tiny_classifier, tmp_path / "bad", "--batch_size=6", "--group_size=4")
    with pytest.raises(UserError, match="one gradient step per rollout"):
        _run(A2CConfig, tiny_generator, tiny_classifier, tmp_path / "bad2", "--batch_size=8", "--minibatch_size=4")


def test_a_non_finite_reward_stops_the_run_and_keeps_the_last_checkpoint(tiny_generator, tiny_classifier, tmp_path,
                                                                         monkeypatch):
    (tmp_path / "flaky_reward.py").write_text(
        "calls = []\n"
        "def reward(prompts, responses):\n"
        "    calls.append(1)\n"
        "    return [float('nan') if len(calls) == 3 else 0.0 for _ in responses]\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="reward term 'function' gave a non-finite value"):
        _run(PPOConfig, tiny_generator, tiny_classifier, tmp_path / "run", "--steps=5", "--batch_size=4",
             "--minibatch_size=4", "--save_every=1", "--reward.function=flaky_reward:reward")
    assert json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["step"] == 2
    policy = load_policy(str(tmp_path / "run"), "cpu")
    assert all(torch.isfinite(p).all() for p in policy.parameters())
    assert len(_rows(tmp_path / "run")) == 2


@pytest.mark.slow
def test_ppo_raises_the_reward_of_the_lstm(tiny_generator, learned_classifier, tmp_path):
    """Learning test: 25 PPO steps raise the held-out reward over the reference's."""
    run = _run(PPOConfig, tiny_generator, learned_classifier, tmp_path / "ppo", "--steps=25", "--batch_size=32",
               "--train.lr=1e-3", "--prompts.max_eval=64")
    results = json.loads((run / "results.json").read_text())
    rows = _rows(run)
    first = sum(r["reward/mean"] for r in rows[:5]) / 5
    last = sum(r["reward/mean"] for r in rows[-5:]) / 5
    assert last > first + 0.3, (first, last)
    assert results["reward_policy"] > results["reward_reference"] and results["win_rate"] > 0.6, results


@pytest.mark.slow
def test_grpo_raises_the_reward_of_the_lstm(tiny_generator, learned_classifier, tmp_path):
    """Learning test for the critic-free path: group baselines alone raise the reward."""
    run = _run(GRPOConfig, tiny_generator, learned_classifier, tmp_path / "grpo", "--steps=25", "--batch_size=32",
               "--train.lr=1e-3", "--ppo_epochs=4", "--minibatch_size=16", "--prompts.max_eval=64")
    rows = _rows(run)
    first = sum(r["reward/mean"] for r in rows[:5]) / 5
    last = sum(r["reward/mean"] for r in rows[-5:]) / 5
    assert last > first + 0.3, (first, last)


def test_minibatches_keep_whole_groups_when_they_can():
    import random

    order = _shuffled(16, 4, 8, random.Random(0))
    assert sorted(order) == list(range(16)) and order != list(range(16))
    for mb in (order[:8], order[8:]):  # each minibatch is two whole groups
        assert sorted({r // 4 for r in mb}) == sorted(r // 4 for r in mb[::4]) and len({r // 4 for r in mb}) == 2
    loose = _shuffled(16, 4, 6, random.Random(0))  # 6 rows cannot hold whole groups of 4: rows shuffle freely
    assert sorted(loose) == list(range(16))
    rows = list(range(8))
    random.Random(1).shuffle(rows)
    assert _shuffled(8, 1, 4, random.Random(1)) == rows  # PPO's minibatches are as they always were


def test_update_tokens_count_a_shared_prompt_once():
    from types import SimpleNamespace

    rollout = SimpleNamespace(prompt_ids=torch.tensor([[0, 5, 6], [7, 8, 9], [0, 5, 6]]),
                              prompt_mask=torch.tensor([[0, 1, 1], [1, 1, 1], [0, 1, 1]]), response_mask=torch.ones(3, 4))
    assert _positions_read(rollout, [0, 1, 2]) == 2 + 3 + 12 and _positions_read(rollout, [0, 1]) == 2 + 3 + 8


def test_train_time_is_wall_time_between_steps_without_the_held_out_evaluations(tiny_generator, tiny_classifier,
                                                                               tmp_path):
    """`time/train_s` is timed as the benchmarks time TRL's trainer: wall time from the first step's start to each
    step's end, the held-out evaluations (here 400 prompts, slower than a step of 8) left out."""
    run = _run(PPOConfig, tiny_generator, tiny_classifier, tmp_path / "run", "--steps=3", "--batch_size=8",
               "--minibatch_size=4", "--eval_every=1", "--data.max_eval=400", "--prompts.max_eval=400")
    rows = _rows(run)
    timed = [r["time/train_s"] for r in rows if "eval/reward" in r]
    phases = sum(r["time/rollout_s"] + r["time/update_s"] for r in rows if r["step"] > 0)
    assert len(timed) == 4 and timed[0] == 0.0 and timed == sorted(timed)
    assert phases <= timed[-1] <= phases + 1.0, (timed, phases)
