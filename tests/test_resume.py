"""Every stage that trains in steps survives SIGKILL: killed after its first checkpoint and resumed with --resume, it
ends with the metrics and weights of an uninterrupted run, bit for bit (the RL stage's own test is in test_scale.py).
The runs are real subprocesses of the CLI, killed at whatever point they had reached."""

import json
import os
import shutil
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
    assert not list(killed.glob(".*.tmp"))  # what a write cut short left is gone
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


HUGE = "def reward(prompts, responses):\n    return [1e38 * (1 + len(r) % 3) for r in responses]\n"
"""a user reward whose sums overflow float32: every update's gradients are non-finite"""


def test_updates_with_non_finite_gradients_are_skipped_and_never_saved(cli, tmp_path, tiny_generator):
    (tmp_path / "huge.py").write_text(HUGE)
    args = ["ppo", "--policy", str(tiny_generator), "--reward.classifier_weight=0", "--reward.function=huge:reward",
            "--steps=1", "--batch_size=8", "--minibatch_size=4", "--ppo_epochs=2", "--response_len=6",
            "--prompts.max_eval=4", "--data.max_train=200", "--data.max_eval=50", "--device=cpu"]
    warned = cli(*args, "--out", "warn")
    assert warned.returncode == 0, warned.stderr[-2000:]
    assert "that update was skipped, the weights are unchanged" in warned.stdout
    row = [json.loads(line) for line in (tmp_path / "warn" / "metrics.jsonl").read_text().splitlines()][-1]
    assert row["train/skipped_updates"] == 4  # 2 epochs of 2 minibatches
    saved = load_file(str(tmp_path / "warn" / "checkpoint" / "policy" / "model.safetensors"))
    start = load_file(str(tiny_generator / "model.safetensors"))
    assert all(torch.equal(saved[k], start[k]) for k in start)  # the checkpoint holds the start: nothing was applied
    strict = cli(*args, "--guards=strict", "--out", "strict")
    assert strict.returncode == 2 and "Traceback" not in strict.stderr, strict.stderr[-2000:]
    last = strict.stderr.strip().splitlines()[-1]  # after the progress bar's lines
    assert last.startswith("minirlhf: error: the gradients were not finite") and "--guards strict stopped" in last
    assert not (tmp_path / "strict" / "checkpoint").exists()


def test_a_resume_applies_and_records_the_settings_it_changes(cli, tmp_path, tiny_generator, monkeypatch):
    """--train.lr and --kl_coef given on resume were undone by the checkpoint's optimizer and KL state; now they take
    effect from the next step, are said, and recorded in resumes.jsonl beside the new config.yaml."""
    pairs = write_tweet_pairs(tmp_path / "pairs.jsonl", 48)
    dpo = ["dpo", "--policy", str(tiny_generator), "--preferences", str(pairs), "--train.batch_size=8",
           "--train.micro_batch_size=8", "--max_response_tokens=20", "--eval_every=0", "--samples=0", "--device=cpu"]
    assert cli(*dpo, "--train.steps=4", "--train.lr=1e-2", "--out", "dpo").returncode == 0
    resumed = cli("dpo", "--resume", "dpo", "--train.steps=6", "--train.lr=1e-4")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "settings changed on resume, applied from step 5: train.lr 0.01 -> 0.0001" in resumed.stdout
    rows = {r["step"]: r for r in map(json.loads, (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines())}
    assert rows[4]["lr"] > 1e-3 and 0 < rows[5]["lr"] <= 1e-4  # the new base rate, down the same schedule
    record = [json.loads(line) for line in (tmp_path / "dpo" / "resumes.jsonl").read_text().splitlines()]
    assert record == [{"after_step": 4, "changed": {"train.lr": [0.01, 0.0001], "train.steps": [4, 6]}}]

    from minirlhf.cli import main  # PPO in this process: the same command, without starting another

    monkeypatch.chdir(tmp_path)
    ppo = ["ppo", "--policy", str(tiny_generator), "--reward.classifier_weight=0", "--reward.length_weight=1",
           "--batch_size=4", "--minibatch_size=4", "--ppo_epochs=1", "--prompts.max_eval=4", "--data.max_train=200",
           "--data.max_eval=50", "--device=cpu", "--kl_coef=0.1"]
    assert main([*ppo, "--steps=2", "--out", "ppo"]) == 0
    assert main(["ppo", "--resume", "ppo", "--steps=3", "--kl_coef=0.5"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and rows[-1]["objective/kl_coef"] == 0.5


def test_an_unreadable_checkpoint_gives_way_to_the_one_before_it_and_none_to_the_start(cli, tmp_path, tiny_generator):
    """--keep_checkpoints 2 (the default) keeps the checkpoint before the last; when the last cannot be read, a resume
    takes the one before and ends where an uninterrupted run ends; with no checkpoint at all, it starts again."""
    pairs = write_tweet_pairs(tmp_path / "pairs.jsonl", 48)
    args = ["dpo", "--policy", str(tiny_generator), "--preferences", str(pairs), "--train.batch_size=8",
            "--train.micro_batch_size=8", "--max_response_tokens=20", "--eval_every=0", "--samples=0", "--save_every=2",
            "--device=cpu", "--seed=3"]
    for out in ("full", "cut"):
        assert cli(*args, "--train.steps=6", "--out", out).returncode == 0
    cut = tmp_path / "cut"
    assert sorted(p.name for p in cut.glob("checkpoint*")) == ["checkpoint", "checkpoint-4"]
    state = cut / "checkpoint" / "trainer_state.safetensors"
    state.write_bytes(state.read_bytes()[:64])  # the last checkpoint damaged
    resumed = cli("dpo", "--resume", "cut")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from checkpoint-4/ instead (step 4)" in resumed.stdout
    assert [p.name.startswith("checkpoint.damaged-") for p in cut.glob("checkpoint.damaged*")] == [True]
    _same(tmp_path / "full", cut, ["checkpoint/policy/model.safetensors"])

    # What a kill before the first checkpoint leaves (run.json, config.yaml, the rows logged so far, step 0's among
    # them, no checkpoint): the resume starts again from step 0 and logs each row once.
    for folder in cut.glob("checkpoint*"):
        shutil.rmtree(folder)
    (cut / "results.json").unlink()
    again = cli("dpo", "--resume", "cut")
    assert again.returncode == 0 and "resuming after step 0" in again.stdout, again.stderr[-2000:]
    _same(tmp_path / "full", cut, ["checkpoint/policy/model.safetensors"])


def test_a_disk_that_fills_during_a_save_leaves_the_last_checkpoint_usable(tmp_path, tiny_generator, monkeypatch):
    """RLIMIT_FSIZE makes every write past 100 KB fail as a full disk does: the run stops with one line (exit 1), its
    last checkpoint is whole, and resuming it on a roomier disk ends where an uninterrupted run ends. (The runs with
    room enough run in this process: the same command, without starting another.)"""
    import resource

    from minirlhf.cli import main

    monkeypatch.chdir(tmp_path)
    args = ["ppo", "--policy", str(tiny_generator), "--reward.classifier_weight=0", "--reward.length_weight=1",
            "--batch_size=4", "--minibatch_size=4", "--ppo_epochs=1", "--prompts.max_eval=4", "--data.max_train=200",
            "--data.max_eval=50", "--save_every=2", "--device=cpu", "--seed=3"]
    assert main([*args, "--steps=4", "--out", "full"]) == 0
    assert main([*args, "--steps=2", "--out", "cut"]) == 0
    limit = 100_000  # above metrics.jsonl and the config, below the policy's weights
    full = subprocess.run([sys.executable, "-m", "minirlhf", "ppo", "--resume", "cut", "--steps=4"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr[-2000:]
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith("minirlhf: error: File too large") and "free some space" in last, last
    assert _step_of(tmp_path / "cut") == 2 and not list((tmp_path / "cut").glob(".checkpoint*"))
    assert main(["ppo", "--resume", "cut", "--steps=4"]) == 0
    _same(tmp_path / "full", tmp_path / "cut", ["checkpoint/policy/model.safetensors"])


def test_a_run_killed_while_finishing_resumes_to_log_its_closing_rows_once(tmp_path, monkeypatch):
    """A classifier killed after its last checkpoint and its test rows, before results.json: the resume finishes it
    and the metrics hold each row once, as the uninterrupted run's do (the command run in this process)."""
    from minirlhf.cli import main

    monkeypatch.chdir(tmp_path)
    args = ["train-classifier", "--data.max_train=64", "--data.max_eval=32", "--train.epochs=1",
            "--train.batch_size=16", "--model.max_length=32", "--device=cpu", "--seed=3", "--out", "run"]
    assert main(args) == 0
    before = _rows(tmp_path / "run")
    assert any("test/accuracy" in r for r in before)
    (tmp_path / "run" / "results.json").unlink()  # what the kill left: every row written, no results
    assert main(["train-classifier", "--resume", "run"]) == 0
    assert _rows(tmp_path / "run") == before and (tmp_path / "run" / "results.json").is_file()
