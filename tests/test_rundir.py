"""RunDir: a run says what it is, every reader finds a checkpoint that a crash left between atomic_dir's two
renames, and a run of the wrong kind is a one-line error."""

import json
from pathlib import Path

import pytest

from minirlhf import RunError
from minirlhf.rundir import RunDir, check_new


def test_a_run_records_its_kind_when_it_is_created(tmp_path):
    run = RunDir.create(tmp_path / "r", "rl", "grpo", "smollm2")
    info = json.loads(run.info_file.read_text())
    assert info["stage"] == "rl" and info["algorithm"] == "grpo" and info["base"] == "smollm2" and info["version"]
    assert RunDir.find(tmp_path / "r").algorithm == "grpo" and RunDir.find(tmp_path) is None
    with pytest.raises(ValueError):
        RunDir.create(tmp_path / "x", "no-such-stage")


def test_a_checkpoint_caught_between_the_two_renames_is_put_back_by_any_reader(tmp_path):
    run = RunDir.create(tmp_path / "r", "rl", "ppo")
    with run.write_checkpoint() as tmp:
        (tmp / "state.json").write_text('{"step": 3}')
        (tmp / "policy").mkdir()
    assert run.checkpoint_step() == 3 and run.policy() == run.saved("policy")
    run.checkpoint.rename(tmp_path / "r" / ".checkpoint.old")  # the crash: old moved aside, new not yet in place
    assert run.policy() is None
    found = RunDir.find(tmp_path / "r")
    assert found.checkpoint_step() == 3 and found.policy() is not None
    assert not (tmp_path / "r" / ".checkpoint.old").exists()


def test_the_wrong_kind_of_run_is_a_one_line_error(tmp_path):
    RunDir.create(tmp_path / "clf", "classifier")
    with pytest.raises(RunError, match="is a classifier run, not an RL run; make one with `minirlhf ppo`"):
        RunDir.open(tmp_path / "clf", "rl", command="ppo")
    with pytest.raises(RunError, match="no run.json"):
        RunDir.open(tmp_path / "nothing", "rl")
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunError, match="is a file"):
        RunDir.create(tmp_path / "file", "rl")


def _tree(path: Path) -> dict:
    """Every file under `path` with its bytes: what 'unchanged' means."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_run_is_never_written_over_and_overwrite_moves_it_aside(tmp_path):
    first = RunDir.create(tmp_path / "r", "rl", "ppo")
    (first / "metrics.jsonl").write_text('{"step": 1}\n')
    before = _tree(tmp_path / "r")
    with pytest.raises(RunError, match=r"already holds an RL run; continue it with --resume .* or pass --overwrite"):
        RunDir.create(tmp_path / "r", "rl", "ppo")
    assert _tree(tmp_path / "r") == before
    RunDir.create(tmp_path / "r", "dpo", overwrite=True)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("r.replaced-")]
    assert len(aside) == 1 and _tree(aside[0]) == before  # nothing deleted
    assert RunDir.find(tmp_path / "r").stage == "dpo" and not (tmp_path / "r" / "metrics.jsonl").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    for out, match in ((tmp_path / "mine", "not empty and holds no minirlhf run"), ("", "--out is empty")):
        with pytest.raises(RunError, match=match):
            check_new(out, overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine" and check_new(None) is False


def test_a_training_command_into_a_finished_run_exits_2_and_changes_no_byte(cli, tmp_path, tiny_generator, capsys,
                                                                            monkeypatch):
    from minirlhf.cli import main

    monkeypatch.chdir(tmp_path)
    args = ["ppo", "--policy", str(tiny_generator), "--reward.classifier_weight=0", "--reward.length_weight=1",
            "--steps=1", "--batch_size=4", "--minibatch_size=4", "--ppo_epochs=1", "--prompts.max_eval=4",
            "--data.max_train=200", "--data.max_eval=50", "--device=cpu", "--out", "run"]
    assert main(args) == 0  # in this process; the refusal below in a process of its own, as a user meets it
    before = _tree(tmp_path / "run")
    again = cli(*args)
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1, again.stderr
    assert "--resume run" in again.stderr and "--overwrite" in again.stderr and "Traceback" not in again.stderr
    assert _tree(tmp_path / "run") == before
    for argv, says in ((["loop", "--policy", str(tiny_generator), "--annotator", "simulate:x:f", "--out", "run"],
                        "already holds an RL run"),  # the loop, as every stage (in this process: these stop at once)
                       (["ppo", "--policy", str(tiny_generator), "--out="], "--out is empty"),
                       (["ppo", "--resume", "run", "--overwrite"], "give one of them")):
        assert main(argv) == 2 and says in capsys.readouterr().err
    assert _tree(tmp_path / "run") == before
    assert main([*args, "--overwrite"]) == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and _tree(aside[0]) == before and f"is now in {aside[0].name}" in capsys.readouterr().out
