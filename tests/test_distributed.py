"""Two real processes under torchrun, where one of them fails or one of them works for both: a failure anywhere
reaches every process, which all stop with the same line long before the collective timeout; the reward classifier
that an RL run trains first (`reward.train_missing`) is trained once, by the first process, as a world of one."""

import json
import os
import re
import subprocess
import sys
import time

STRICT = {"MINIRLHF_STRICT_DEVICES": "1"}

FLAKY = '''
import os
import time
CALLS = 0
if os.environ.get("RANK") == "1" and os.environ.get("FAIL_AT") == "import":
    raise ImportError("this module fails on process 1 only")


def reward(prompts, responses):
    global CALLS
    CALLS += 1
    if os.environ.get("RANK") == "1" and os.environ.get("FAIL_AT") == "step2" and CALLS >= 2:
        return [float("nan")] * len(responses)
    if os.environ.get("RANK") == "1" and os.environ.get("FAIL_AT") == "hang" and CALLS >= 2:
        time.sleep(600)
    return [len(r) / 10 for r in responses]
'''


def torchrun(args: list[str], cwd, env: dict | None = None, timeout: int = 600) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **STRICT, **(env or {})}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "minirlhf", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - t0


def _ppo(gen, *extra) -> list[str]:
    return ["ppo", "--policy", str(gen), "--batch_size=8", "--minibatch_size=4", "--response_len=6",
            "--prompts.max_eval=4", "--data.max_train=200", "--data.max_eval=100", "--device=cpu", "--seed=3", *extra]


def test_a_failure_on_one_process_stops_both_with_the_same_line_at_once(tiny_generator, tmp_path):
    (tmp_path / "flaky.py").write_text(FLAKY)
    args = _ppo(tiny_generator, "--reward.classifier_weight=0", "--reward.function=flaky:reward", "--steps=3",
                "--dist_timeout_s=120")
    for fail_at, says in (("import", "cannot load reward function"), ("step2", "gave a non-finite value")):
        proc, seconds = torchrun([*args, "--out", f"run-{fail_at}"], tmp_path, {"FAIL_AT": fail_at})
        # each process writes its line whole, but the two share torchrun's stream with the progress bar
        errors = re.findall(r"minirlhf: error: [^\n]*", proc.stderr)
        assert proc.returncode != 0 and len(errors) == 2 and errors[0] == errors[1], proc.stderr[-3000:]
        assert says in errors[0] and errors[0].endswith("(process 1 of 2)"), errors
        assert "minirlhf/" not in "".join(re.findall(r'File "[^"]*"', proc.stderr)), proc.stderr[-3000:]  # torchrun's own
        assert seconds < 90, f"{seconds:.0f} s: the processes waited for a collective instead of agreeing"
    rows = [json.loads(line) for line in (tmp_path / "run-step2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]  # step 1 ran on both; step 2 stopped both


def test_a_process_that_hangs_stops_the_others_after_the_timeout(tiny_generator, tmp_path):
    (tmp_path / "flaky.py").write_text(FLAKY)
    args = _ppo(tiny_generator, "--reward.classifier_weight=0", "--reward.function=flaky:reward", "--steps=3",
                "--dist_timeout_s=10", "--out", "run")
    proc, seconds = torchrun(args, tmp_path, {"FAIL_AT": "hang"})
    errors = re.findall(r"minirlhf: error: [^\n]*", proc.stderr)
    assert proc.returncode != 0 and errors, proc.stderr[-3000:]
    assert "did not answer within --dist_timeout_s" in errors[0], errors
    assert seconds < 90, f"{seconds:.0f} s for a 10 s timeout"


def test_the_reward_classifier_is_trained_first_once_under_torchrun(tiny_generator, tmp_path):
    proc, _ = torchrun(_ppo(tiny_generator, "--reward.classifier=clf", "--reward.train_missing=true", "--steps=1",
                            "--out", "run"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("does not exist yet: training it first") == 1, proc.stdout[-3000:]
    assert json.loads((tmp_path / "clf" / "run.json").read_text())["stage"] == "classifier"
    assert (tmp_path / "clf" / "model" / "config.json").is_file()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["dist/param_spread"] == 0.0 and "reward/classifier" in rows[0]


def test_two_processes_resume_alike_from_a_fallback_checkpoint_with_a_changed_setting(tiny_generator, tmp_path):
    """Both processes resume from the same checkpoint (the first sets the damaged last one aside before the other
    reads) and both apply the learning rate given on resume: their weights stay identical."""
    args = _ppo(tiny_generator, "--reward.classifier_weight=0", "--reward.length_weight=1", "--save_every=1")
    first, _ = torchrun([*args, "--steps=2", "--out", "run"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    state = tmp_path / "run" / "checkpoint" / "trainer_state.safetensors"
    state.write_bytes(state.read_bytes()[:64])
    again, _ = torchrun(["ppo", "--resume", "run", "--steps=3", "--train.lr=1e-3"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from checkpoint-1/ instead (step 1)" in again.stdout and "train.lr 0.0003 -> 0.001" in again.stdout
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["dist/param_spread"] == 0.0 for r in rows)
