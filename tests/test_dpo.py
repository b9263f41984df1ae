"""DPO: the losses against naive loops, teacher-forced log-probs against sampled ones (LSTM and SmolLM2), two-step
runs, the command line, two processes against one, and a learning test on tweets."""

import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from minirlhf.stages.dpo import DPOConfig, dpo_loss, train
from minirlhf.config import DataConfig, load_config
from minirlhf.data.sentiment import load_splits
from minirlhf.data.vocab import Vocab
from minirlhf.models.lstm import LSTMConfig, LSTMLanguageModel
from minirlhf.models.load import load_policy
from minirlhf.models.policy import LSTMPolicy

STATS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "logps/chosen",
         "logps/rejected", "logps/margin")


def logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


@pytest.fixture
def logps():
    torch.manual_seed(0)
    return [torch.randn(6) * 5 - 20 for _ in range(4)]  # policy chosen, policy rejected, ref chosen, ref rejected


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_sigmoid_loss_matches_naive_loop(logps, smoothing):
    losses, chosen_rewards, rejected_rewards = dpo_loss(*logps, beta=0.3, loss_type="sigmoid",
                                                        label_smoothing=smoothing)
    for b in range(6):
        pc, pr, rc, rr = (t[b].item() for t in logps)
        h = (pc - pr) - (rc - rr)
        naive = -(1 - smoothing) * logsigmoid(0.3 * h) - smoothing * logsigmoid(-0.3 * h)
        assert losses[b].item() == pytest.approx(naive, rel=1e-5)
        assert chosen_rewards[b].item() == pytest.approx(0.3 * (pc - rc), rel=1e-5)
        assert rejected_rewards[b].item() == pytest.approx(0.3 * (pr - rr), rel=1e-5)


def test_ipo_loss_matches_naive_loop(logps):
    losses, _, _ = dpo_loss(*logps, beta=0.5, loss_type="ipo")
    for b in range(6):
        pc, pr, rc, rr = (t[b].item() for t in logps)
        assert losses[b].item() == pytest.approx(((pc - pr) - (rc - rr) - 1 / (2 * 0.5)) ** 2, rel=1e-5)
    with pytest.raises(ValueError, match="sigmoid or ipo"):
        dpo_loss(*logps, beta=0.5, loss_type="hinge")


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_gradient_raises_chosen_and_lowers_rejected(loss_type):
    chosen, rejected = torch.tensor([-10.0, -30.0], requires_grad=True), torch.tensor([-12.0, -5.0], requires_grad=True)
    ref = torch.tensor([-11.0, -20.0])
    losses, _, _ = dpo_loss(chosen, rejected, ref, ref, beta=0.1, loss_type=loss_type)
    losses.sum().backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()  # gradient descent raises chosen, lowers rejected
    assert torch.allclose(chosen.grad, -rejected.grad)


def test_at_the_reference_the_loss_is_log_2_and_rewards_are_zero(logps):
    losses, chosen_rewards, rejected_rewards = dpo_loss(logps[2], logps[3], logps[2], logps[3], beta=0.1)
    assert torch.allclose(losses, torch.full((6,), math.log(2)))
    assert (chosen_rewards == 0).all() and (rejected_rewards == 0).all()


def test_each_epoch_visits_every_step_batch_once_and_a_resumed_plan_repeats_the_order():
    from types import SimpleNamespace

    from minirlhf.stages.dpo import plan

    cfg = SimpleNamespace(seed=3, train=SimpleNamespace(batch_size=5, epochs=3, steps=0))
    batches, schedule = plan(cfg, 37)
    assert sorted(i for b in batches for i in b) == list(range(37)) and {len(b) for b in batches} == {4, 5}
    order = [schedule.at(step)[1][0] for step in range(1, schedule.steps + 1)]
    assert schedule.steps == 3 * len(batches) and order[:len(batches)] != order[len(batches): 2 * len(batches)]
    for epoch in range(3):
        assert sorted(order[epoch * len(batches): (epoch + 1) * len(batches)]) == list(range(len(batches)))
    _, resumed = plan(cfg, 37)  # a resumed run makes its plan anew and starts mid-way
    assert [resumed.at(step)[1][0] for step in range(12, schedule.steps + 1)] == order[11:]


def test_lstm_teacher_forced_logprobs_equal_the_sampled_ones():
    torch.manual_seed(0)
    v = Vocab.build(["the movie was good", "the film was bad", "i love it"] * 2, min_freq=1)
    policy = LSTMPolicy(LSTMLanguageModel(LSTMConfig(emb_dim=16, hidden_dim=16), len(v)).eval(), v, value_head=False)
    prompts = ["the movie", "i", "the film was", "i love", "the"]
    rollout = policy.sample(prompts, 6, torch.Generator().manual_seed(0))
    forced = policy.teacher_forced(prompts, rollout.texts, 50, 6)  # a response cut at 6 tokens has no <eos> either
    with torch.no_grad():
        logprobs = policy(forced, entropy=False)[0]
    whole = [b for b in range(len(prompts)) if v.unk_id not in rollout.response_ids[b]]  # <unk> decodes to nothing
    assert len(whole) >= 3 and any(rollout.ended[whole])
    for b in whole:  # the decoded words encode back to the sampled ids, <eos> included where it was sampled
        n = int(rollout.response_mask[b].sum())
        assert forced.ended[b] == rollout.ended[b]
        assert forced.response_ids[b, :n].tolist() == rollout.response_ids[b, :n].tolist()
        assert forced.response_mask[b].sum() == n
        assert logprobs[b, :n].tolist() == pytest.approx(rollout.logprobs[b, :n].tolist(), abs=1e-5)
    cut = policy.teacher_forced(["i love it the movie was good"], ["the film was bad"], 3, 2)
    assert cut.prompt_ids[0].tolist() == [v.bos_id, v.stoi["was"], v.stoi["good"]]  # <bos> and the prompt's end
    assert cut.response_ids[0].tolist() == [v.stoi["the"], v.stoi["film"]] and not cut.ended[0]


@pytest.fixture(scope="module")
def smol():
    return load_policy("smollm2", "cpu", value_head=False)


def test_smollm2_teacher_forced_logprobs_equal_the_sampled_ones(smol):
    prompts = ["Answer with one word: is the sky blue?", "Say hello.", "Name a fruit."]
    rollout = smol.sample(prompts, 6, torch.Generator().manual_seed(0))
    forced = smol.teacher_forced(prompts, rollout.texts, 512, 6)
    with torch.no_grad():
        logprobs = smol(forced, entropy=False)[0]
    same = 0
    for b in range(3):
        n = int(rollout.response_mask[b].sum())
        if forced.response_ids[b, :n].tolist() == rollout.response_ids[b, :n].tolist():  # the text re-encodes alike
            same += 1
            assert torch.allclose(logprobs[b, :n], rollout.logprobs[b, :n], atol=2e-4)
    assert same >= 2
    cut = smol.teacher_forced(["hi"], ["Hello there, how can I help you today?"], 4, 3)
    assert cut.prompt_ids[0].tolist() == smol.encode("hi")[-4:] and cut.response_ids.shape == (1, 3)
    assert not cut.ended[0]
    whole = smol.teacher_forced(["hi"], [" Hello! "], 512, 64)
    assert whole.response_ids[0].tolist() == smol.tokenizer("Hello!")["input_ids"] + [smol.eos_id] and whole.ended[0]


def write_tweet_pairs(path, n: int, seed: int = 0):
    """Pairs of real tweets: a positive one chosen over a negative one, after a two-word prompt."""
    texts = load_splits(DataConfig()).train
    pos, neg = [t for t, y in texts if y == 1], [t for t, y in texts if y == 0]
    rng = random.Random(seed)
    rows = [{"prompt": " ".join(rng.choice(texts)[0].split()[:2]) or "so", "chosen": rng.choice(pos),
             "rejected": rng.choice(neg)} for _ in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _dpo(policy, pairs, out, *extra):
    return train(load_config(DPOConfig, overrides=[f"--policy={policy}", f"--preferences={pairs}", f"--out={out}",
                                                   "--device=cpu", *extra]))


def test_two_steps_on_the_lstm_change_the_policy(tiny_generator, tmp_path):
    pairs = write_tweet_pairs(tmp_path / "pairs.jsonl", 24)
    run = _dpo(tiny_generator, pairs, tmp_path / "run", "--train.steps=2", "--train.batch_size=4", "--train.micro_batch_size=2",
               "--train.lr=1e-2", "--max_response_tokens=16", "--samples=2")
    rows = _rows(run)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[0]["eval/rewards/accuracy"] == 0.0 and rows[0]["eval/loss"] == pytest.approx(math.log(2))
    for key in STATS:
        assert math.isfinite(rows[1][key]) and math.isfinite(rows[2]["eval/" + key])
    assert rows[1]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # the first step starts at the reference
    assert rows[2]["eval/rewards/margin"] != 0.0
    before = load_file(str(tiny_generator / "model.safetensors"))
    after = load_file(str(run / "checkpoint" / "policy" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for name in ("config.yaml", "loss.png", "rewards.png", "logps.png", "report.md", "checkpoint/state.json"):
        assert (run / name).is_file(), name
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 2 and results["before"]["rewards/accuracy"] == 0.0 and len(results["samples"]) == 2
    assert load_policy(str(run), "cpu", value_head=False).kind == "lstm"


def test_two_steps_on_smollm2_with_frozen_layers(smol, tmp_path):
    pairs = write_tweet_pairs(tmp_path / "pairs.jsonl", 8)
    run = _dpo("smollm2", pairs, tmp_path / "run", "--train.steps=2", "--train.batch_size=2", "--train.micro_batch_size=2",
               "--policy_options.freeze_layers=28", "--max_prompt_tokens=24", "--max_response_tokens=12",
               "--max_eval=2", "--train.lr=1e-4", "--samples=1")
    rows = _rows(run)
    assert len(rows) == 3 and all(math.isfinite(rows[-1][k]) for k in STATS)
    assert rows[1]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert rows[2]["eval/rewards/margin"] != 0.0
    policy = load_policy(str(run), "cpu", value_head=False)  # a DPO run is a policy for the next stage
    start = dict(smol.model.named_parameters())
    changed = [k for k, p in policy.model.named_parameters() if not torch.equal(p, start[k])]
    assert changed and all(".layers.28." in k or ".layers.29." in k or k == "model.norm.weight" for k in changed)


def test_cli_runs_dpo_and_generate_loads_the_result(cli, tiny_generator, tmp_path):
    pairs = write_tweet_pairs(tmp_path / "pairs.jsonl", 16)
    done = cli("dpo", "--policy", str(tiny_generator), "--preferences", str(pairs), "--train.steps=2", "--train.batch_size=4",
               "--loss_type=ipo", "--max_response_tokens=8", "--samples=0", "--out", "run")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "implicit-reward accuracy" in done.stdout and (tmp_path / "run" / "rewards.png").is_file()
    assert "loss_type: ipo" in (tmp_path / "run" / "config.yaml").read_text()
    generated = cli("generate", "run", "--prompt", "i love", "-n", "2", "--max-new-tokens", "5")
    assert generated.returncode == 0 and len(generated.stdout.strip().splitlines()) == 2


@pytest.mark.parametrize("content, args, message", [
    ('{"prompt": "hi", "chosen": "a"}\n', [], "missing field 'rejected'"),
    ("not json\n", [], "not valid JSON"),
    (None, [], "does not exist"),
    ('{"prompt": "hi", "chosen": "a", "rejected": "b"}\n' * 2, [], "too few"),
    ('{"prompt": "hi", "chosen": "a", "rejected": "b"}\n', ["--eval_file=pairs.jsonl", "--loss_type=ipo",
                                                            "--label_smoothing=0.1"], "label_smoothing"),
    ('{"prompt": "hi", "chosen": "a", "rejected": "b"}\n', ["--beta=0"], "beta must be > 0"),
])
def test_bad_input_is_one_line_and_exit_2(content, args, message, cli, tiny_generator, tmp_path):
    if content is not None:
        (tmp_path / "pairs.jsonl").write_text(content)
    bad = cli("dpo", "--policy", str(tiny_generator), "--preferences", "pairs.jsonl", *args)
    assert bad.returncode == 2 and message in bad.stderr, bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


def test_missing_policy_or_preferences_is_one_line(cli, tiny_generator):
    for args, message in ((["--preferences", "pairs.jsonl"], "--policy"), (["--policy", str(tiny_generator)],
                                                                           "--preferences FILE.jsonl")):
        bad = cli("dpo", *args)
        assert bad.returncode == 2 and message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_two_processes_train_as_one(tiny_generator, tmp_path):
    pairs = write_tweet_pairs(tmp_path / "pairs.jsonl", 24)
    args = ["dpo", "--policy", str(tiny_generator), "--preferences", str(pairs), "--train.steps=3", "--train.batch_size=5",
            "--train.micro_batch_size=2", "--train.lr=1e-2", "--max_response_tokens=12", "--samples=0", "--eval_every=1",
            "--device=cpu"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",  # the same arithmetic in both runs
           "MINIRLHF_STRICT_DEVICES": "1"}  # collectives and float64 checked as a GPU or a Mac would (strict.py)
    single = run_cli(*args, "--out", str(tmp_path / "one"), cwd=tmp_path, env=env)
    assert single.returncode == 0, single.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "minirlhf", *args, "--out", str(tmp_path / "two")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es)" in two.stdout
    one_rows, two_rows = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert len(two_rows) == 4 and [r["dist/param_spread"] for r in two_rows[1:]] == [0.0] * 3, two_rows
    for a, b in zip(one_rows, two_rows):
        for key in [k for k in a if not k.startswith("time/")]:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    a = load_file(str(tmp_path / "one" / "checkpoint" / "policy" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "checkpoint" / "policy" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5, {k: (a[k] - b[k]).abs().max().item() for k in a}


@pytest.mark.slow
def test_dpo_learns_to_prefer_positive_tweets(tiny_generator, tmp_path):
    """Chosen: positive tweets; rejected: negative ones. On held-out pairs (other prompts, other tweets) the
    implicit reward must rank the positive tweet higher more often than chance, and the policy's own
    log-prob margin must grow."""
    pairs = write_tweet_pairs(tmp_path / "pairs.jsonl", 400, seed=1)
    run = _dpo(tiny_generator, pairs, tmp_path / "run", "--train.epochs=3", "--train.batch_size=16", "--train.micro_batch_size=16",
               "--train.lr=3e-3", "--max_response_tokens=40", "--eval_fraction=0.2", "--eval_every=0", "--samples=0")
    results = json.loads((run / "results.json").read_text())
    before, after = results["before"], results["after"]
    assert results["pairs_eval"] >= 60
    assert after["rewards/accuracy"] > 0.6, after
    assert after["logps/margin"] > before["logps/margin"] + 1.0, (before, after)
    assert after["loss"] < math.log(2)
