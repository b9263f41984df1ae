"""RunDir: a run says what it is, every reader finds a checkpoint that a crash left between atomic_dir's two
renames, and a run of the wrong kind is a one-line error."""

import json

import pytest

from minirlhf import RunError
from minirlhf.rundir import RunDir, newest


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
    assert newest(tmp_path, "rl").path == run.path and newest(tmp_path, "dpo") is None


def test_the_wrong_kind_of_run_is_a_one_line_error(tmp_path):
    RunDir.create(tmp_path / "clf", "classifier")
    with pytest.raises(RunError, match="is a classifier run, not an RL run; make one with `minirlhf ppo`"):
        RunDir.open(tmp_path / "clf", "rl", command="ppo")
    with pytest.raises(RunError, match="no run.json"):
        RunDir.open(tmp_path / "nothing", "rl")
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunError, match="is a file"):
        RunDir.create(tmp_path / "file", "rl")
