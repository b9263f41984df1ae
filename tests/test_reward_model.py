"""Preference data, dialogue prompts, the Bradley–Terry loss and the reward-model stage."""

import json
import math

import pytest
import torch

from minirlhf import UserError
from minirlhf.stages.reward_model import RewardModelConfig, bradley_terry_loss, train
from minirlhf.config import load_config
from minirlhf.data.dialogue import dialogue_text, from_messages, is_dialogue, prompt_of, to_messages
from minirlhf.data.preferences import Pair, length_baseline, read_pairs, split_pairs
from minirlhf.models.reward_model import RewardModel

HH = "\n\nHuman: hi there\n\nAssistant: hello! how can I help?\n\nHuman: tell me a joke\n\nAssistant:"


def test_bradley_terry_loss_matches_the_formula():
    chosen, rejected = torch.tensor([2.0, -1.0, 0.5, 30.0]), torch.tensor([1.0, 1.0, 0.5, -30.0])
    naive = [math.log(1 + math.exp(-(c - r))) for c, r in zip(chosen.tolist(), rejected.tolist())]
    assert torch.allclose(bradley_terry_loss(chosen, rejected), torch.tensor(naive), atol=1e-6)


def test_hh_text_and_messages_round_trip():
    turns = to_messages(HH)
    assert [t["role"] for t in turns] == ["user", "assistant", "user"]
    assert turns[1]["content"] == "hello! how can I help?"
    assert from_messages(turns) == HH
    assert is_dialogue(HH) and not is_dialogue("the movie was")
    assert to_messages("the movie was") == [{"role": "user", "content": "the movie was"}]
    assert prompt_of({"messages": turns}, "x") == HH
    assert dialogue_text(HH, " Why did the chicken...").endswith("Assistant: Why did the chicken...")
    assert dialogue_text("great film", "yes") == "\n\nHuman: great film\n\nAssistant: yes"


@pytest.mark.parametrize("line, problem", [
    ('{"prompt": "p", "chosen": "a"}', "missing field 'rejected'"),
    ('{"prompt": "p", "chosen": 3, "rejected": "b"}', "'chosen' must be a string"),
    ('{"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}', "last message"),
    ("not json", "not valid JSON"),
])
def test_bad_preference_lines_name_file_line_and_problem(tmp_path, line, problem):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok", "chosen": "a", "rejected": "b"}\n' + line + "\n")
    with pytest.raises(UserError, match=rf"p\.jsonl:2: .*{problem}"):
        read_pairs(path)


def test_split_is_by_prompt_and_deterministic():
    pairs = [Pair(f"prompt {i % 20}", f"good {i}", f"bad {i}") for i in range(100)]
    train_a, eval_a = split_pairs(pairs, 0.2, seed=1)
    train_b, eval_b = split_pairs(pairs, 0.2, seed=1)
    assert (train_a, eval_a) == (train_b, eval_b)
    assert not {p.prompt for p in train_a} & {p.prompt for p in eval_a}
    assert len({p.prompt for p in eval_a}) == 4 and len(train_a) + len(eval_a) == 100
    assert length_baseline([Pair("p", "longer one", "short"), Pair("p", "x", "yy"), Pair("p", "a", "b")]) == 0.5


def sentiment_pairs(path, n: int) -> None:
    """Pairs of real tweets in which the positive one is preferred: a preference a reward model can learn."""
    from minirlhf.config import DataConfig
    from minirlhf.data.sentiment import load_splits

    splits = load_splits(DataConfig(max_train=4 * n, max_eval=10))
    pos = [t for t, y in splits.train if y == 1]
    neg = [t for t, y in splits.train if y == 0]
    with open(path, "w") as f:
        for i in range(min(n, len(pos), len(neg))):
            f.write(json.dumps({"prompt": f"Write a tweet about topic {i % 40}.", "chosen": pos[i], "rejected": neg[i]}) + "\n")


def _config(tmp_path, prefs, *extra):
    return load_config(RewardModelConfig, overrides=[
        f"--preferences={prefs}", f"--out={tmp_path / 'rm'}", "--device=cpu", "--model.max_length=48",
        "--train.batch_size=8", "--train.log_every=1", *extra])


def test_two_steps_change_the_upper_layers_and_reload_the_same(tmp_path):
    prefs = tmp_path / "prefs.jsonl"
    sentiment_pairs(prefs, 24)
    run = train(_config(tmp_path, prefs, "--train.epochs=1", "--max_train=16"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    results = json.loads((run / "results.json").read_text())
    assert results["train_pairs"] == 16 and 0 <= results["eval_accuracy"] <= 1
    assert (run / "loss.png").stat().st_size > 0 and (run / "accuracy.png").stat().st_size > 0
    assert "| accuracy (chosen scores higher) |" in (run / "report.md").read_text()

    from minirlhf.models.reward_model import load_scalar_model

    base, _ = load_scalar_model("minilm")
    rm = RewardModel.from_run(run)
    tuned, original = rm.model.base.state_dict(), base.base.state_dict()
    top = [k for k in tuned if ".layer.5." in k]
    low = [k for k in tuned if ".layer.0." in k]
    assert any(not torch.equal(tuned[k], original[k]) for k in top)  # trained
    assert all(torch.equal(tuned[k], original[k]) for k in low)  # frozen
    texts = [dialogue_text(p.prompt, p.chosen) for p in read_pairs(prefs)[:3]]
    assert torch.allclose(rm.score(texts), RewardModel.from_run(run).score(texts))


@pytest.mark.slow
def test_reward_model_learns_a_real_preference(tmp_path, cli):
    prefs = tmp_path / "prefs.jsonl"
    sentiment_pairs(prefs, 240)
    run = train(_config(tmp_path, prefs, "--train.epochs=2", "--eval_fraction=0.25", "--train.lr=2e-4"))
    results = json.loads((run / "results.json").read_text())
    assert results["eval_accuracy"] >= 0.65, results  # chance: 0.5
    assert results["eval_margin"] > 0.5
    out = cli("eval-reward-model", str(run), "--preferences", str(prefs), "--device", "cpu")
    assert out.returncode == 0, out.stderr
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["pairs"] == 240 and figures["accuracy"] >= 0.65 and 0 <= figures["length_baseline"] <= 1


def test_cli_errors_are_one_line(tmp_path, cli):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a"}\n')
    for args in (["train-reward-model", "--preferences", str(bad)], ["train-reward-model"],
                 ["eval-reward-model", str(tmp_path), "--preferences", str(bad)]):
        out = cli(*args)
        assert out.returncode == 2, (args, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_chat_policy_reads_a_dialogue_turn_by_turn():
    from minirlhf.models.load import load_policy

    policy = load_policy("smollm2", "cpu", value_head=False)
    ids = policy.encode(HH)
    want = policy.tokenizer.apply_chat_template(to_messages(HH), add_generation_prompt=True)
    want = want["input_ids"] if hasattr(want, "keys") else want
    assert ids == list(want)
    text = policy.tokenizer.decode(ids)
    assert text.count("<|im_start|>user") == 2 and text.count("<|im_start|>assistant") == 2


def test_causal_lm_reward_model_caches_its_frozen_layers_and_reloads(tmp_path, capsys):
    prefs = tmp_path / "prefs.jsonl"
    sentiment_pairs(prefs, 12)
    run = train(_config(tmp_path, prefs, "--model.name=smollm2", "--model.freeze_layers=28", "--model.max_length=24",
                        "--train.epochs=1", "--max_train=8", "--train.batch_size=4"))
    assert "cannot be run from its layer" not in capsys.readouterr().out  # the upper layers ran on the cached ones
    rm = RewardModel.from_run(run)
    assert rm.model.pooling == "last"
    texts = [dialogue_text(p.prompt, p.chosen) for p in read_pairs(prefs)[:4]]
    scores = rm.score(texts)
    assert scores.shape == (4,) and torch.isfinite(scores).all() and scores.std() > 0
    assert torch.allclose(rm.score(texts[:1]), scores[:1], atol=1e-4)  # padding in a batch changes nothing


def test_reply_pooling_reads_only_the_tokens_after_the_last_assistant_turn():
    from minirlhf.models.classifier import Truncator, pad_batch
    from minirlhf.models.reward_model import load_scalar_model

    model, tokenizer = load_scalar_model("minilm", "reply_mean")
    seqs = Truncator(tokenizer, 40, "tail")([dialogue_text(HH, "why did the chicken cross"), dialogue_text("plain", "yes")])
    ids, mask = pad_batch(seqs, tokenizer.pad_token_id)
    reply = model.reply_mask(ids, mask)
    words = [[tok for tok, r in zip(tokenizer.convert_ids_to_tokens(row), keep) if r] for row, keep in zip(ids, reply)]
    assert words == [["why", "did", "the", "chicken", "cross", "[SEP]"], ["yes", "[SEP]"]]
    cut = Truncator(tokenizer, 8, "tail")([dialogue_text(HH, "a reply far longer than the eight tokens kept")])
    ids, mask = pad_batch(cut, tokenizer.pad_token_id)
    assert model.reply_mask(ids, mask).sum() == mask.sum()  # the marker was cut away: every token counts
