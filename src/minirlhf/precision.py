"""The arithmetic of a run's forward passes (`--dtype`), chosen by measuring, never by assumption.

The same bf16 matmul runs about twice as fast as fp32 on a CPU with AVX-512 BF16 and a hundred times slower on one
with AVX2 only, where oneDNN has no bf16 LSTM at all. So `auto` runs a short probe on this machine: a transformer
MLP's forward and backward, an LSTM's, and a decode step's matmuls (a few rows against many weights, without
gradients) in fp32 and under bf16 autocast; and the decode step again with its weights kept in bf16 and in int8
(`frozen_linear`: the forms of frozen layers, and how sampling in a bf16 run holds its weights, cast once a call).
bf16 is taken where the MLP ran at least BF16_MARGIN times faster; inside a bf16 run an op the probe found missing
or slower in bf16 (the LSTM where it has no kernel; sampling where bf16 weights decode slower) runs in fp32
(`keep_fp32`). The result is cached per machine (CPU model and flags, torch version, device, oneDNN/ATen limits) in
cache_root()/precision.json, so only a machine's first run pays the second or so it takes.

Weights and optimizer state stay fp32 whatever the setting; fp16 adds gradient scaling and needs a GPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import time
import warnings
from dataclasses import dataclass, field

import torch

from minirlhf import ConfigError
from minirlhf.checkpoint import atomic_write_text
from minirlhf.runtime import cache_root

BF16_MARGIN = 1.25
"""bf16 must run the probe's MLP this many times faster than fp32 to be chosen: it also changes the results"""
PROBE_OPS = ("mlp", "lstm", "decode", "frozen_bf16", "frozen_int8")
FORMS = ("fp32", "bf16", "int8")
"""the forms a frozen linear layer's weights can run in (`frozen_linear`); the probe's `frozen_*` ops time them"""
FORM_MARGIN = 1.25
"""a cheaper form of frozen weights must run the probe's decode step this many times faster to be chosen"""


@dataclass
class Precision:
    """The arithmetic of a run's forward passes (`--dtype`): autocast to `dtype` on `device` (None: plain fp32), and
    the gradient scaler fp16 needs (a disabled one passes everything through). `fp32_ops` run in fp32 inside a
    bf16 run (`keep_fp32`); `why` says how the choice was made."""

    name: str
    device_type: str
    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler = field(default=None)
    fp32_ops: frozenset = frozenset()
    why: str = ""

    def __post_init__(self):
        if self.scaler is None:
            self.scaler = torch.amp.GradScaler(self.device_type, enabled=self.name == "fp16")

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        # no cast cache: a run holds one autocast context for all its steps, and a cached low-precision copy of a
        # weight would outlive the optimizer step that changed the weight (every forward would use step 1's)
        return torch.autocast(self.device_type, dtype=self.dtype, cache_enabled=False)


_precision = Precision("fp32", "cpu")


def precision() -> Precision:
    return _precision


def keep_fp32(op: str):
    """A block in which `op` (one of PROBE_OPS) runs in fp32 when the run is bf16 and the probe found `op` missing or
    slower in bf16; the caller hands it fp32 inputs. Elsewhere a no-op."""
    p = _precision
    if p.dtype is None or op not in p.fp32_ops:
        return contextlib.nullcontext()
    return torch.autocast(p.device_type, enabled=False)


def set_precision(device: torch.device, name: str = "auto", agree=None) -> Precision:
    """The run's precision from `--dtype`: auto measures (`measured`); bf16 and fp16 are taken as asked, bf16 with
    its slow or missing ops in fp32. `agree(flag)` makes every process of a torchrun take the same choice (each
    measured on its own). The optimizer steps read it through `precision()`."""
    global _precision
    if name == "fp16" and device.type == "cpu":
        raise ConfigError("--dtype fp16 needs a GPU (CPU autocast has no fp16 scaling); use auto, fp32 or bf16")
    if name == "fp32":
        _precision = Precision("fp32", device.type, why="--dtype fp32")
        return _precision
    probe = measured(device) if name in ("auto", "bf16") else {}
    speedup = probe.get("mlp")
    if name == "auto":
        bf16 = speedup is not None and speedup >= BF16_MARGIN
        name = "bf16" if (agree(bf16) if agree is not None else bf16) else "fp32"
        why = f"auto: bf16 ran the probe {_ratio(speedup)} on this machine"
    else:
        why = f"--dtype {name}" + (f" (bf16 ran the probe {_ratio(speedup)} here; --dtype auto would take "
                                   f"{'bf16' if (speedup or 0) >= BF16_MARGIN else 'fp32'})" if probe else "")
    # sampling casts its weights to bf16 once a call (models/frozen_form.cast_once): the frozen_bf16 timing is its own
    timing = {"lstm": probe.get("lstm"), "decode": probe.get("frozen_bf16")}
    slow = frozenset(op for op, x in timing.items() if name == "bf16" and (x or 0) < 1.0)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    _precision = Precision(name, device.type, dtype, fp32_ops=slow, why=why)
    return _precision


def _ratio(speedup: float | None) -> str:
    if speedup is None:
        return "not at all (no bf16 kernel)"
    return f"{speedup:.2f}x as fast as fp32"


# ---------------------------------------------------------------------------- the probe


def measured(device: torch.device) -> dict:
    """{op: bf16's speed as a multiple of fp32's (None: no bf16 kernel)} for this machine, from the cache or, the
    first time, from `probe` (then cached). A cache that cannot be read or written is measured around."""
    forced = _forced()
    if all(op in forced for op in PROBE_OPS):
        return forced
    key = fingerprint(device)
    path = cache_root() / "precision.json"
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cached = {}
    entry = cached.get(key) if isinstance(cached, dict) else None
    if isinstance(entry, dict) and all(op in entry for op in PROBE_OPS):
        return entry | forced
    result = probe(device)
    try:
        atomic_write_text(path, json.dumps({**(cached if isinstance(cached, dict) else {}), key: result}, indent=1))
    except OSError:
        pass  # a read-only home: measured again next time
    return result | forced


def _forced() -> dict:
    """$MINIRLHF_DTYPE_PROBE: probe results to take instead of measuring, e.g. {"mlp": 0.03, "lstm": null} (what an
    AVX2-only CPU measures); ops it leaves out are measured. For tests, and to pin a machine's choice."""
    text = os.environ.get("MINIRLHF_DTYPE_PROBE", "")
    try:
        forced = json.loads(text) if text else {}
        if not isinstance(forced, dict) or not set(forced) <= set(PROBE_OPS) or \
                any(v is not None and not isinstance(v, (int, float)) for v in forced.values()):
            raise ValueError("not an object of speed-ups")
    except ValueError as e:
        raise ConfigError(f"MINIRLHF_DTYPE_PROBE={text!r} is not a probe result ({e}); give JSON such as "
                          '{"mlp": 2.0, "lstm": null} or unset it') from e
    return forced


def fingerprint(device: torch.device) -> str:
    """What the probe's result depends on: the CPU (model and instruction-set flags), the accelerator, torch, and
    the variables that cap oneDNN's and ATen's instruction sets."""
    parts = [platform.machine(), _cpu(), torch.__version__, torch.backends.cpu.get_cpu_capability(), device.type,
             *(f"{k}={os.environ.get(k, '')}" for k in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"))]
    if device.type == "cuda":
        parts.append(torch.cuda.get_device_name(device))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _cpu() -> str:
    """The CPU's model name and flags (Linux), else what the platform says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def probe(device: torch.device) -> dict:
    """bf16's speed as a multiple of fp32's, per op, timed here: an MLP block's forward and backward (256 tokens,
    512 -> 1024 -> 512, as in a small transformer), a 2-layer LSTM's (16 x 20 tokens, 256 -> 448), and a decode step
    (16 rows through 12 layers of 1024 x 1024 weights, 48 MB, more than a CPU's caches hold, without gradients)
    under autocast; and that decode step with its weights kept in bf16 and in int8 (`frozen_linear`) instead."""
    torch.manual_seed(0)  # the probe's inputs; the run seeds its own generators after
    mlp = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 512)).to(device)
    lstm = torch.nn.LSTM(256, 448, 2, batch_first=True).to(device)
    stack = torch.nn.Sequential(*(torch.nn.Linear(1024, 1024) for _ in range(12))).to(device)
    x_mlp, x_lstm, x_step = (torch.randn(256, 512, device=device), torch.randn(16, 20, 256, device=device),
                             torch.randn(16, 1024, device=device))
    ops = {"mlp": lambda: mlp(x_mlp).sum().backward(), "lstm": lambda: lstm(x_lstm)[0].sum().backward(),
           "decode": lambda: _no_grad(stack, x_step)}
    for fn in ops.values():  # a process's first passes also grow its heap and start its threads
        fn()
    speeds = {name: _speedup(fn, device) for name, fn in ops.items()}
    return speeds | {f"frozen_{form}": _form_speedup(stack, x_step, form) for form in FORMS[1:]}


def _form_speedup(stack: torch.nn.Sequential, x: torch.Tensor, form: str) -> float | None:
    """fp32 time / `form`'s time of the decode step with every weight in `form`, the best of five each, interleaved;
    None where this machine has no kernel for it (int8 off the CPU)."""
    try:
        forwards = [frozen_linear(layer, form) for layer in stack]
        _no_grad(lambda h: _chain(forwards, h), x)
    except (RuntimeError, NotImplementedError):
        return None
    fp32, cheap = [], []
    for _ in range(5):
        fp32.append(_seconds(lambda: _no_grad(lambda h: _chain(stack, h), x), x.device))
        cheap.append(_seconds(lambda: _no_grad(lambda h: _chain(forwards, h), x), x.device))
    return round(min(fp32) / min(cheap), 3)


# ---------------------------------------------------------------------------- frozen weights in a cheaper form


class _Int8Linear(torch.autograd.Function):
    """y = x W^T + b by the dynamic int8 kernel (activations quantised per call); the gradient to x is the fp32
    weight's, straight through the rounding, so a frozen int8 layer can sit below trainable ones."""

    @staticmethod
    def forward(ctx, x, weight, packed, reduce_range):
        ctx.save_for_backward(weight)
        return torch.ops.quantized.linear_dynamic(x.float(), packed, reduce_range).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad @ weight.to(grad.dtype), None, None, None


def frozen_linear(linear: torch.nn.Linear, form: str):
    """A forward for a linear layer that does not train while it is used, with its weights in `form`: fp32 (its own),
    bf16 (a bf16 copy; the input cast to bf16 and the output back, or kept bf16 under autocast, which then computes
    exactly what autocast's own cast of the weight at every call would), or int8 (per-output-channel weights and per-call activations,
    fbgemm's or oneDNN's dynamic kernel; CPU only). The layer's own fp32 weights are left as they are: they are
    what a checkpoint saves."""
    weight, bias = linear.weight.detach(), None if linear.bias is None else linear.bias.detach()
    if form == "fp32":
        return linear.forward
    if form == "bf16":
        w16, b16 = weight.bfloat16(), None if bias is None else bias.bfloat16()

        def bf16(x: torch.Tensor) -> torch.Tensor:  # under bf16 autocast: autocast's own arithmetic, bf16 out
            y = torch.nn.functional.linear(x.bfloat16(), w16, b16)
            return y if torch.is_autocast_enabled(x.device.type) else y.to(x.dtype)
        return bf16
    if form != "int8":
        raise ConfigError(f"unknown form {form!r} for frozen weights; use one of {', '.join(FORMS)}")
    if weight.device.type != "cpu":
        raise NotImplementedError("int8 frozen weights run on the CPU only")
    scale = (weight.float().abs().amax(1).clamp(min=1e-8) / 127).double()  # (out,) per output channel
    with warnings.catch_warnings():  # torch marks its quantised tensors deprecated (torchao's successor)
        warnings.simplefilter("ignore")
        q = torch.quantize_per_channel(weight.float(), scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
        packed = torch.ops.quantized.linear_prepack(q, None if bias is None else bias.float())
    reduce_range = torch.backends.quantized.engine in ("fbgemm", "x86")  # 7-bit activations: no overflow on AVX2
    return lambda x: _Int8Linear.apply(x, weight, packed, reduce_range)


def _chain(layers, x: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        x = layer(x)
    return x


def _no_grad(module, x) -> None:
    with torch.no_grad():
        for _ in range(4):  # a few steps of it, as decoding makes
            module(x)


def _seconds(fn, device: torch.device) -> float:
    """Wall seconds of one call of `fn`, its kernels finished (an accelerator returns before they are)."""
    t = time.perf_counter()
    fn()
    if device.type in ("cuda", "mps"):
        getattr(torch, device.type).synchronize()
    return time.perf_counter() - t


def _speedup(fn, device: torch.device) -> float | None:
    """fp32 time / bf16 time of `fn`, the best of five each, interleaved, after warm-up passes; None when bf16 fails.
    A first bf16 pass over 4x slower than fp32's ends it at once (on an AVX2 CPU a bf16 pass takes half a second)."""
    def timed(dtype) -> float:
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None,
                            cache_enabled=False):
            return _seconds(fn, device)
    first = timed(None)
    try:
        slow = timed(torch.bfloat16) > 4 * first
    except RuntimeError:  # no bf16 kernel for an op (oneDNN's LSTM without AVX-512 BF16)
        return None
    fp32, bf16 = [timed(None)], [timed(torch.bfloat16)]  # the first passes of a shape also pick and build kernels
    for _ in range(0 if slow else 5):
        fp32.append(timed(None))
        bf16.append(timed(torch.bfloat16))
    return round(min(fp32) / min(bf16), 3)
