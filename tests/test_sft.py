"""SFT, a stage built on the shared runner: the masked loss against a naive loop, the data forms, two steps that
change the policy, the command, and a learning test."""

import json
import math

import pytest
import torch

from minirlhf import DataError
from minirlhf.stages.sft import SFTConfig, sft_loss, train
from minirlhf.config import load_config
from minirlhf.data.sentiment import load_splits
from minirlhf.config import DataConfig
from minirlhf.data.sft import Example, read_examples, split_examples


def test_the_loss_is_the_mean_nll_of_the_response_tokens_only():
    torch.manual_seed(0)
    logprobs = -torch.rand(3, 5) * 4
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float32)
    terms = [-logprobs[b, t].item() for b in range(3) for t in range(5) if mask[b, t]]
    assert sft_loss(logprobs, mask).item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)
    assert sft_loss(logprobs, mask, 20.0).item() == pytest.approx(sum(terms) / 20, rel=1e-6)


def test_every_data_form_reads_as_prompt_and_response(tmp_path):
    rows = [{"prompt": "hi", "response": "hello"}, {"text": "a whole tweet"},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"prompt": "p", "chosen": "good", "rejected": "bad"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = read_examples(tmp_path / "d.jsonl")
    assert got == [Example("hi", "hello"), Example("", "a whole tweet"), Example("\n\nHuman: q\n\nAssistant:", "a"),
                   Example("p", "good")]
    (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "user", "content": "q"}]}\n')
    with pytest.raises(DataError, match="bad.jsonl:1: \"messages\" must end with the assistant's turn"):
        read_examples(tmp_path / "bad.jsonl")
    train, held = split_examples([Example("", f"text {i}") for i in range(20)], 0.2)
    assert len(held) == 4 and not {e.response for e in train} & {e.response for e in held}


def _tweets(path, n: int):
    texts = [t for t, _ in load_splits(DataConfig(max_train=n, max_eval=10)).train]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_two_steps_change_the_policy_and_the_run_is_a_policy(tiny_generator, tmp_path, cli):
    from minirlhf.models.lstm import load_generator

    data = _tweets(tmp_path / "tweets.jsonl", 40)
    cfg = load_config(SFTConfig, overrides=[f"--policy={tiny_generator}", f"--data={data}", f"--out={tmp_path / 'run'}",
                                            "--device=cpu", "--train.batch_size=16", "--max_train=32",
                                            "--train.lr=1e-2", "--samples=2"])
    run = train(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and all(math.isfinite(r["loss"]) for r in rows[1:])
    before, _ = load_generator(tiny_generator)
    after, _ = load_generator(run / "checkpoint" / "policy")
    assert not torch.equal(before.lstm.weight_hh_l0, after.lstm.weight_hh_l0)
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 2 and len(results["samples"]) == 1 and (run / "report.md").is_file()  # one prompt: ""
    generated = cli("generate", str(run), "--prompt", "i", "-n", "2")  # an SFT run is a --policy
    assert generated.returncode == 0 and len(generated.stdout.strip().splitlines()) == 2, generated.stderr


def test_the_command_trains_on_hf_data_from_a_local_folder(cli, tiny_generator, tmp_path):
    """`sft --data hf:...` as the README writes it, offline: a folder read through `datasets`, not only a .jsonl."""
    (tmp_path / "chats").mkdir()
    rows = [{"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"i say {i}"}]}
            for i in range(10)]
    (tmp_path / "chats" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = cli("sft", "--policy", str(tiny_generator), "--data", "hf:./chats", "--out", "run", "--device=cpu",
               "--train.batch_size=8", "--samples=1")
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (results["examples_train"], results["examples_eval"], results["steps"]) == (9, 1, 2), results
    assert results["samples"][0]["prompt"].startswith("\n\nHuman: say"), results["samples"]


def test_missing_or_bad_data_is_one_line(cli, tiny_generator, tmp_path):
    none = cli("sft", "--policy", str(tiny_generator))
    assert none.returncode == 2 and "sft needs examples" in none.stderr and len(none.stderr.strip().splitlines()) == 1
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    bad = cli("sft", "--policy", str(tiny_generator), "--data", "bad.jsonl")
    assert bad.returncode == 2 and "bad.jsonl:1" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_sft_lowers_the_held_out_loss_of_the_lstm(tiny_generator, tmp_path):
    """Learning test: two passes over 600 tweets lower the held-out loss per token of the small LSTM."""
    data = _tweets(tmp_path / "tweets.jsonl", 700)
    cfg = load_config(SFTConfig, overrides=[f"--policy={tiny_generator}", f"--data={data}", f"--out={tmp_path / 'run'}",
                                            "--device=cpu", "--train.epochs=2", "--train.batch_size=16",
                                            "--train.micro_batch_size=16", "--train.lr=3e-3", "--eval_every=0",
                                            "--samples=0"])
    results = json.loads((train(cfg) / "results.json").read_text())
    assert results["after"]["eval/loss"] < results["before"]["eval/loss"] - 0.1, results
