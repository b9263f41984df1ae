"""Devices without a GPU: the strict mode (strict.py) that makes a CPU run fail on what a GPU or a Mac would fail on,
the backend choice, mixed precision, gradient checkpointing and the memory report.

The two-process PPO, GRPO (test_scale.py) and DPO (test_dpo.py) tests run under MINIRLHF_STRICT_DEVICES=1; here the
reward model runs one under it too, and the strict mode itself is shown to catch each kind of bug."""

import json
import subprocess
import sys

import pytest
import torch

from minirlhf import ConfigError, distributed, strict
from minirlhf.precision import Precision, set_precision
from minirlhf.runtime import memory_report

STRICT = {"MINIRLHF_STRICT_DEVICES": "1"}


@pytest.mark.parametrize("call, caught", [
    (lambda x: x.double(), True),
    (lambda x: x.to(torch.float64), True),
    (lambda x: x.to(device=x.device, dtype=torch.float64), False),  # x is on the CPU here: an explicit host
    (lambda x: x.to("cpu", torch.float64), False),
    (lambda x: x.float(), False),
])
def test_the_float64_rule_names_the_host(call, caught):
    x = torch.ones(2)
    seen = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(strict._float64_problem(func, args, kwargs or {}))
            return func(*args, **(kwargs or {}))

    with Spy():
        call(x)
    assert any(seen) == caught, seen


def test_float64_factories_may_not_be_given_a_device():
    assert strict._float64_problem(torch.zeros, (3,), {"dtype": torch.float64, "device": torch.device("cpu")})
    assert strict._float64_problem(torch.zeros, (3,), {"dtype": torch.float64}) is None
    assert strict._float64_problem(torch.zeros, (3,), {"dtype": torch.float32, "device": "cpu"}) is None


PROBE = """
import os, torch, torch.distributed as dist
from minirlhf import distributed, strict
from minirlhf.stages.dpo import pair_sums
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
strict.install()
x = torch.ones(3)
assert distributed.all_sum(x).tolist() == [1.0, 1.0, 1.0] and x.tolist() == [1.0, 1.0, 1.0]
assert distributed.gather_rows(torch.ones(2, 3)).shape == (2, 3) and distributed.everywhere(True)
assert distributed.spread([torch.nn.Parameter(torch.ones(4))]) == 0.0
sums = pair_sums(*[torch.ones(2)] * 5)
assert sums.dtype == torch.float64 and sums.device.type == "cpu"
for name, bug in (("raw collective", lambda: dist.all_reduce(x)),
                  ("float64 on the device", lambda: distributed.all_sum(torch.ones(1).double()))):
    try:
        bug()
    except strict.StrictDeviceError as e:
        print("caught", name, "|", e)
dist.destroy_process_group()
"""


def test_strict_mode_passes_the_helpers_and_catches_each_bug(tmp_path):
    """A raw collective and a `.double()` in minirlhf's code fail; every helper of distributed.py passes."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    probe = tmp_path / "probe.py"
    # the probe stands in for minirlhf code: the float64 rule reads only the package's own files
    probe.write_text(PROBE.format(port=port).replace("strict.install()", f"strict.PACKAGE = {str(tmp_path)!r}\n"
                                                     "strict.install()"))
    out = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, **STRICT})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "caught raw collective | torch.distributed.all_reduce called outside" in out.stdout, out.stdout
    assert "caught float64 on the device | `.double()`" in out.stdout, out.stdout


def test_backend_follows_the_device_asked_for():
    assert distributed.backend_for("auto", cuda=True) == "nccl"
    assert distributed.backend_for("cuda", cuda=True) == "nccl"
    assert distributed.backend_for("cpu", cuda=True) == "gloo"  # --device=cpu on a GPU machine
    assert distributed.backend_for("mps", cuda=False) == "gloo"
    assert distributed.backend_for("auto", cuda=False) == "gloo"
    assert distributed.backend_device("gloo") == torch.device("cpu")


def test_two_reward_model_processes_step_as_one_under_the_strict_mode(tmp_path):
    """Each process scores its share of a step's pairs and the gradients are added up, so the weights stay the
    same on both (dropout draws differ from one process's, so the figures are close, not equal)."""
    from test_reward_model import sentiment_pairs

    prefs = tmp_path / "prefs.jsonl"
    sentiment_pairs(prefs, 24)
    args = ["train-reward-model", "--preferences", str(prefs), "--train.epochs=1", "--max_train=16",
            "--train.batch_size=8", "--train.log_every=1", "--device=cpu"]
    env = {**__import__("os").environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **STRICT}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "minirlhf", *args, "--out", str(tmp_path / "two")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/loss" in r]
    assert len(steps) == 2 and all(r["dist/param_spread"] == 0.0 for r in steps), steps
    assert all(0 < r["train/loss"] < 5 and 0 <= r["train/accuracy"] <= 1 for r in steps)
    assert json.loads((tmp_path / "two" / "results.json").read_text())["train_pairs"] == 16


AVX2 = {"mlp": 0.03, "lstm": None, "decode": 0.02, "frozen_bf16": 0.03, "frozen_int8": 1.5}  # an AVX2-only CPU:
# bf16 matmuls ~30x slower, no bf16 LSTM kernel
AVX512_BF16 = {"mlp": 2.0, "lstm": None, "decode": 0.8, "frozen_bf16": 0.9, "frozen_int8": 4.0}  # bf16 twice as fast,
# decoding slower (a CPU whose few-row bf16 matmuls lose)


@pytest.mark.parametrize("forced, auto", [(AVX2, "fp32"), (AVX512_BF16, "bf16"),
                                          ({"mlp": 1.1, "lstm": 1.0, "decode": 1.0, "frozen_bf16": 1.0,
                                            "frozen_int8": 1.0}, "fp32")])
def test_auto_takes_bf16_only_where_the_probe_measured_it_faster(forced, auto, monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("MINIRLHF_DTYPE_PROBE", json.dumps(forced))
    try:
        chosen = set_precision(cpu, "auto")
        assert chosen.name == auto and (chosen.dtype is None) == (auto == "fp32"), chosen
        assert chosen.why.startswith("auto: bf16 ran the probe")
        asked = set_precision(cpu, "bf16")  # as asked, its missing or slower ops in fp32
        timing = {"lstm": forced["lstm"], "decode": forced["frozen_bf16"]}  # sampling: weights cast once a call
        slow = {op for op, v in timing.items() if v is None or v < 1.0}
        assert asked.dtype == torch.bfloat16 and asked.fp32_ops == slow
        assert ("--dtype auto would take " + auto) in asked.why
        with asked.autocast():
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
        assert not asked.scaler.is_enabled()
    finally:
        set_precision(cpu, "fp32")  # the process-wide setting, back for the other tests


def test_a_bad_forced_probe_is_one_line(monkeypatch):
    monkeypatch.setenv("MINIRLHF_DTYPE_PROBE", '{"mlp": "fast"}')
    with pytest.raises(ConfigError, match="MINIRLHF_DTYPE_PROBE"):
        set_precision(torch.device("cpu"), "auto")


PROBE_TWICE = """
import json, time, torch
from minirlhf.precision import measured, set_precision
t0 = time.perf_counter(); first = measured(torch.device("cpu")); t1 = time.perf_counter()
again = measured(torch.device("cpu")); t2 = time.perf_counter()
p = set_precision(torch.device("cpu"), "auto")
print(json.dumps({"first": first, "again": again, "measure_s": t1 - t0, "cached_s": t2 - t1, "auto": p.name}))
"""


def test_the_probe_measures_once_per_machine_and_finds_what_an_avx2_cpu_lacks(tmp_path):
    """The real probe, unforced, in fresh processes: it measures, caches, and reads its cache the second time. Under
    oneDNN's and ATen's AVX2 limits (what an AVX2-only CPU runs) it is another machine: no bf16 LSTM, slow bf16."""
    import os
    import platform

    limits = ("MINIRLHF_DTYPE_PROBE", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
    env = {k: v for k, v in os.environ.items() if k not in limits} | {"MINIRLHF_CACHE": str(tmp_path)}
    runs = [("here", env)]
    if platform.machine() in ("x86_64", "AMD64"):
        runs.append(("avx2", env | {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}))
    seen = {}
    for name, e in runs:
        out = subprocess.run([sys.executable, "-c", PROBE_TWICE], capture_output=True, text=True, timeout=120, env=e)
        assert out.returncode == 0, out.stderr[-2000:]
        seen[name] = json.loads(out.stdout.strip().splitlines()[-1])
        r = seen[name]
        assert r["first"] == r["again"] and r["cached_s"] < r["measure_s"] / 10, r
        assert set(r["first"]) == {"mlp", "lstm", "decode", "frozen_bf16", "frozen_int8"} and r["first"]["mlp"] > 0, r
        assert r["auto"] == ("bf16" if r["first"]["mlp"] >= 1.25 else "fp32"), r
    cache = json.loads((tmp_path / "precision.json").read_text())
    assert len(cache) == len(runs)  # one entry per machine (here, and the AVX2-limited one)
    if "avx2" in seen:
        assert seen["avx2"]["first"]["lstm"] is None and seen["avx2"]["first"]["mlp"] < 0.5
        assert seen["avx2"]["first"]["frozen_bf16"] < 1.0  # so `frozen_form auto` never takes bf16 there
        assert seen["avx2"]["auto"] == "fp32"


@pytest.mark.parametrize("forced", [AVX2, AVX512_BF16])
def test_an_lstm_rl_step_runs_under_either_probe_result(forced, cli, tiny_generator, tiny_classifier, tmp_path):
    """`--dtype auto` on an AVX2-only CPU (fp32) and on an AVX-512 BF16 one (bf16, the LSTM in fp32): a PPO step
    either way, its losses finite; the first output line says what was chosen and why."""
    proc = cli("ppo", "--policy", str(tiny_generator), "--reward", str(tiny_classifier), "--steps=1", "--batch_size=8",
               "--minibatch_size=8", "--response_len=6", "--device=cpu", "--data.max_train=200", "--data.max_eval=50",
               "--prompts.max_eval=8", "--out=run", env={"MINIRLHF_DTYPE_PROBE": json.dumps(forced)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    name = "fp32" if forced is AVX2 else "bf16"
    assert f"{name} passes (auto: bf16 ran the probe" in proc.stdout, proc.stdout
    row = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert all(abs(row[k]) < float("inf") for k in ("policy/loss", "objective/kl", "value/loss")), row


def test_an_rl_step_runs_in_bf16_and_fp16_on_the_cpu_is_refused(tiny_generator, tiny_classifier, tmp_path):
    from minirlhf.rl.ppo import PPOConfig
    from minirlhf.stages.rl import train
    from minirlhf.config import load_config

    cfg = load_config(PPOConfig, overrides=[
        f"--policy={tiny_generator}", f"--reward.classifier={tiny_classifier}", "--steps=1", "--batch_size=8",
        "--minibatch_size=8", "--response_len=6", "--device=cpu", "--data.max_train=200", "--data.max_eval=50",
        "--prompts.max_eval=8", "--dtype=bf16", f"--out={tmp_path / 'bf16'}"])
    try:
        run = train(cfg)
    finally:
        set_precision(torch.device("cpu"), "fp32")  # the process-wide setting, back for the other tests
    row = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert all(abs(row[k]) < float("inf") for k in ("policy/loss", "objective/kl", "value/loss")), row
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        set_precision(torch.device("cpu"), "fp16")


def test_gradient_checkpointing_gives_the_same_logprobs_and_gradients():
    from minirlhf.models.causal_lm import CausalLMPolicy

    for freeze in (28, 0):  # the split trunk, and the whole model (the upper two blocks trained either way)
        policy = CausalLMPolicy.load("smollm2", value_head=False, freeze_layers=freeze, gradient_checkpointing=True)
        policy.requires_grad_(False)
        top = [p for block in policy.trunk.blocks[28:] for p in block.parameters()]
        for p in top:
            p.requires_grad_(True)
        rollout = policy.sample(["Say hello.", "Name a colour, please."], 5,
                                [torch.Generator().manual_seed(i) for i in range(2)])
        results = []
        for recompute in (False, True):
            policy.checkpointing = recompute
            for p in top:
                p.grad = None
            logprobs = policy(rollout, entropy=False)[0]
            logprobs.sum().backward()
            results.append((logprobs.detach(), [p.grad.clone() for p in top]))
        (lp_a, g_a), (lp_b, g_b) = results
        assert torch.allclose(lp_a, lp_b, atol=1e-4), (freeze, (lp_a - lp_b).abs().max())
        assert all(torch.allclose(a, b, atol=1e-4, rtol=1e-3) for a, b in zip(g_a, g_b)), freeze


def test_the_memory_report_names_no_accelerator_on_the_cpu():
    report = memory_report([torch.nn.Linear(512, 512)])  # 1 MiB
    assert report["memory/params_mb"] > 0 and "memory/accelerator_peak_mb" not in report


def test_one_autocast_context_over_many_steps_uses_each_step_s_weights():
    """The runner holds one autocast context for a whole run: a cached bf16 copy of a weight must not outlive the
    optimizer step that changed it (with torch's default cast cache, the second forward returns the first's)."""
    layer, x = torch.nn.Linear(8, 8), torch.randn(2, 8)
    with Precision("bf16", "cpu", torch.bfloat16).autocast():
        before = layer(x)
        with torch.no_grad():
            layer.weight.add_(1.0)  # what an optimizer step does
        after = layer(x)
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("decode", [0.5, 2.0])
def test_sampling_runs_in_fp32_inside_a_bf16_run_where_the_probe_found_decoding_slower(decode, monkeypatch):
    """A decode step on bf16 weights (cast once a sampling call) can run slower than fp32 on a CPU: where the probe
    measured that, a bf16 run samples in fp32 (the same tokens and log-probs as an fp32 run), else in bf16."""
    from minirlhf.models.load import load_policy

    cpu = torch.device("cpu")
    policy = load_policy("smollm2", cpu, value_head=False)
    monkeypatch.setenv("MINIRLHF_DTYPE_PROBE", json.dumps({"mlp": 2.0, "lstm": 1.0, "decode": 1.0, "frozen_bf16": decode,
                                                           "frozen_int8": 1.0}))
    try:
        runs = {}
        for name in ("fp32", "bf16"):
            chosen = set_precision(cpu, name)
            with chosen.autocast() if chosen.dtype is not None else torch.autocast("cpu", enabled=False):
                runs[name] = policy.sample(["Name a colour."], 6, torch.Generator().manual_seed(0)).logprobs
        assert torch.equal(runs["fp32"], runs["bf16"]) == (decode < 1.0)
    finally:
        set_precision(cpu, "fp32")


def test_onednn_keeps_a_bounded_kernel_cache_unless_the_user_set_one():
    """RL batches change shape every step; oneDNN's default cache of 1,024 kernels grew a run ~50 MB a step."""
    import os

    code = "import minirlhf, os; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    ours = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    theirs = subprocess.run([sys.executable, "-c", code], env=env | {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "7"},
                            capture_output=True, text=True, timeout=60)
    assert ours.stdout.strip() == "64" and theirs.stdout.strip() == "7", (ours.stderr, theirs.stderr)
