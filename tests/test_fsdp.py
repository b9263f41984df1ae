"""`--strategy fsdp`: two processes shard the policy with FSDP2 (gloo, on the CPU) and train as one process does."""

import json
import math
import os
import re
import subprocess
import sys

import torch
from safetensors.torch import load_file

from conftest import run_cli
from minirlhf.models.load import load_policy

STRICT = {"MINIRLHF_STRICT_DEVICES": "1"}  # collectives and float64 checked as a GPU or a Mac would (strict.py)
TOLERANCE = 1e-5
"""largest weight difference allowed after two steps. The reduce-scatter adds the processes' gradients in another
order than one process does, so they differ by float32 rounding (~1e-7 relative); Adam divides each gradient by its
own running size, which blows that up for gradients near 0. Measured: 5e-8 here (PPO), 4e-6 with GRPO; one step at
the LSTM's lr of 3e-4 moves a weight by up to 3e-4, so 1e-5 is 3% of a step."""


def _torchrun(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **STRICT}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "minirlhf", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_sharded_processes_train_save_and_resume_as_one(tiny_generator, tiny_classifier, tmp_path):
    args = ["ppo", "--policy", str(tiny_generator), "--reward", str(tiny_classifier), "--batch_size=8",
            "--minibatch_size=4", "--response_len=8", "--prompts.max_eval=8", "--device=cpu", "--seed=3",
            "--save_every=1"]
    one = run_cli(*args, "--steps=2", "--out", str(tmp_path / "one"), cwd=tmp_path, env=STRICT)
    assert one.returncode == 0, one.stderr[-2000:]
    first = _torchrun(*args, "--strategy=fsdp", "--steps=1", "--out", str(tmp_path / "two"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = _torchrun("ppo", "--resume", str(tmp_path / "two"), "--steps=2", cwd=tmp_path)  # the shards' Adam
    assert resumed.returncode == 0, resumed.stderr[-3000:]  # state comes back from the whole tensors saved at step 1
    assert "2 process(es)" in first.stdout and "resuming after step 1" in resumed.stdout

    for out in (first.stdout, resumed.stdout):  # each process held a shard, not a copy (DDP would print no line)
        m = re.search(r"the processes hold \[(\d+), (\d+)\] of its (\d+) sharded values", out)
        assert m, out[-2000:]
        held, total = [int(m[1]), int(m[2])], int(m[3])
        assert all(0 < h < total for h in held) and sum(held) == total, out

    rows_one, rows_two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert len(rows_two) == 2 and all(math.isfinite(r["policy/loss"]) for r in rows_two)
    for a, b in zip(rows_one, rows_two, strict=True):
        for key in ("reward/mean", "objective/kl", "policy/approx_kl", "policy/loss", "policy/grad_norm"):
            assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-6), (key, a[key], b[key])

    files = ("policy/model.safetensors", "policy/value_head.safetensors", "trainer_state.safetensors")
    for name in files:  # whole tensors, of the shapes one process saves
        a, b = (load_file(str(tmp_path / run / "checkpoint" / name)) for run in ("one", "two"))
        assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a), name
        diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a if not k.startswith("rng."))
        assert diff < TOLERANCE, (name, diff)
    saved = load_policy(str(tmp_path / "two"), "cpu")  # the final policy loads as any run's does
    want = load_file(str(tmp_path / "two" / "checkpoint" / files[0]))
    assert all(torch.equal(v, want[k]) for k, v in saved.lm.state_dict().items())
