"""Every stage that trains in steps survives SIGKILL: killed after its first checkpoint and resumed with --resume, it
ends with the metrics and weights of an uninterrupted run, bit for bit (the RL stage's own test is in test_scale.py).
The runs are real subprocesses of the CLI, killed at whatever point they had reached."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from test_dpo import write_tweet_pairs
from test_reward_model import sentiment_pairs
from test_scale import _rows, _step_of  # metrics rows without the volatile keys; the checkpoint's step


def _weights(run, files):
    return {f: load_file(str(run / f)) for f in files}


def kill_and_resume(args: list[str], tmp_path, after: int, total: int, resume_finished: bool = False) -> tuple:
    """The run of `args` uninterrupted (tmp_path/full), and killed once its checkpoint reached step `after`, then
    resumed (tmp_path/killed): their directories, and the step at which the killed one had stopped. With
    `resume_finished`, also checks that resuming the finished run says so in one line (the shared runner's answer
    for every stage, so one stage's test is enough)."""
    full = run_cli(*args, "--out", str(tmp_path / "full"), cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-2000:]
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "minirlhf", *args, "--out", str(killed)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while _step_of(killed) < after and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL, "the run ended before it could be killed"
    stopped = _step_of(killed)
    assert after <= stopped < total, f"waited up to 300 s for a checkpoint at step {after}; killed at step {stopped}"
    resumed = run_cli(args[0], "--resume", str(killed), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming after step {stopped}" in resumed.stdout
    if resume_finished:
        again = run_cli(args[0], "--resume", str(killed), cwd=tmp_path)  # finished: nothing to do, one line
        assert again.returncode == 2 and "--steps=N" in again.stderr and "Traceback" not in again.stderr
    return tmp_path / "full", killed, stopped


def _same(a, b, files) -> None:
    assert _rows(a) == _rows(b)
    wa, wb = _weights(a, files), _weights(b, files)
    for f in files:
        assert wa[f].keys() == wb[f].keys() and all(torch.equal(wa[f][k], wb[f][k]) for k in wa[f]), f


def test_a_killed_dpo_run_resumes_to_the_result_of_an_uninterrupted_one(tiny_generator, tmp_path):
    pairs = write_tweet_pairs(tmp_path / "pairs.jsonl", 48)
    args = ["dpo", "--policy", str(tiny_generator), "--preferences", str(pairs), "--train.steps=40",
            "--train.batch_size=8", "--train.micro_batch_size=4", "--train.lr=1e-2", "--max_response_tokens=40",
            "--eval_every=10", "--save_every=4", "--samples=2", "--device=cpu", "--seed=3"]
    full, killed, _ = kill_and_resume(args, tmp_path, after=4, total=40)
    _same(full, killed, ["checkpoint/policy/model.safetensors"])
    a, b = (json.loads((r / "results.json").read_text()) for r in (full, killed))
    assert a["after"] == b["after"] and a["samples"] == b["samples"] and a["before"] == b["before"]


def test_a_killed_reward_model_run_resumes_to_the_result_of_an_uninterrupted_one(tmp_path):
    prefs = tmp_path / "prefs.jsonl"
    sentiment_pairs(prefs, 56)
    args = ["train-reward-model", "--preferences", str(prefs), "--model.max_length=32", "--train.batch_size=8",
            "--train.epochs=3", "--train.log_every=1", "--max_train=48", "--save_every=3", "--device=cpu", "--seed=3"]
    full, killed, _ = kill_and_resume(args, tmp_path, after=3, total=18)
    _same(full, killed, ["model/model.safetensors", "model/reward_head.safetensors"])
    a, b = (json.loads((r / "results.json").read_text()) for r in (full, killed))
    assert {k: v for k, v in a.items() if k.startswith("eval_")} == {k: v for k, v in b.items() if k.startswith("eval_")}


def test_a_killed_generator_run_resumes_to_the_result_of_an_uninterrupted_one(tmp_path):
    args = ["train-generator", "--data.max_train=1000", "--data.max_eval=100", "--train.epochs=2",
            "--train.batch_size=16", "--vocab.max_size=500", "--model.emb_dim=32", "--model.hidden_dim=32",
            "--save_every=10", "--device=cpu", "--seed=3"]
    full, killed, _ = kill_and_resume(args, tmp_path, after=10, total=126, resume_finished=True)
    _same(full, killed, ["model.safetensors"])
    assert (full / "samples.md").read_text() == (killed / "samples.md").read_text()


@pytest.mark.parametrize("command", ["dpo", "train-generator"])
def test_resuming_what_is_not_a_run_of_the_stage_is_one_line(command, tiny_generator, cli, tmp_path):
    missing = cli(command, "--resume", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "config.yaml" in missing.stderr and "Traceback" not in missing.stderr
    other = cli(command, "--resume", str(tiny_generator))
    assert other.returncode == 2 and len(other.stderr.strip().splitlines()) == 1, other.stderr
