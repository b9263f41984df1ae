"""MINIRLHF_STRICT_DEVICES=1: fail at once, on a CPU, on the two kinds of device bug that otherwise show only on
a GPU or a Mac.

1. A collective handed a tensor its backend cannot take (a CPU tensor under NCCL, an MPS tensor under gloo). Every
   collective must go through distributed.py's helpers, which move the tensor to the backend's device and back; a
   collective called from anywhere else, or given a tensor off the backend's device, fails.
2. float64 on an accelerator: MPS has none. minirlhf's own code may make float64 only on the host and only by
   saying so: `t.to("cpu", torch.float64)`, or a factory given no device. `.double()`, `.to(torch.float64)` and a
   float64 factory given a device fail whatever the device, so a CPU run catches what a Mac would.

The runner installs it when the variable is set (the two-process tests set it); otherwise nothing here runs.
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

PACKAGE = os.path.dirname(os.path.abspath(__file__))
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list", "reduce",
               "reduce_scatter", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all", "gather", "scatter")
FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.full, torch.empty, torch.arange,
             torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like, torch.rand, torch.randn}
_local = threading.local()
_installed = False


class StrictDeviceError(RuntimeError):
    """A device bug found by the strict mode: a programming error, never bad user input."""


def enabled() -> bool:
    return os.environ.get("MINIRLHF_STRICT_DEVICES") == "1"


@contextmanager
def communicating(device: torch.device):
    """distributed.py's helpers call torch.distributed inside this block (and only there), with the tensors on
    `device`, their backend's."""
    previous, _local.device = getattr(_local, "device", None), device
    try:
        yield
    finally:
        _local.device = previous


def install() -> None:
    """Check every collective and every float64 made by minirlhf's code from now on (once per process)."""
    global _installed
    if _installed or not enabled():
        return
    for name in COLLECTIVES:
        setattr(dist, name, _checked(name, getattr(dist, name)))
    _Float64Check().__enter__()  # stays on for the life of the process
    _installed = True


def _tensors(values):
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from _tensors(v)


def _checked(name: str, collective):
    def call(*args, **kwargs):
        want = getattr(_local, "device", None)
        if want is None:
            raise StrictDeviceError(f"torch.distributed.{name} called outside minirlhf.distributed's helpers, which "
                                    "put its tensors on the backend's device; call one of those instead")
        for t in _tensors([*args, *kwargs.values()]):
            if t.device != want:
                raise StrictDeviceError(f"torch.distributed.{name} was handed a tensor on {t.device}; the "
                                        f"{dist.get_backend()} backend takes tensors on {want}")
        return collective(*args, **kwargs)
    return call


def _float64_problem(func, args, kwargs) -> str | None:
    """Why this call makes float64 where an accelerator could hold it (None when it does not)."""
    if func is torch.Tensor.double:
        return "`.double()` makes float64 on the tensor's device, which MPS lacks; use .to('cpu', torch.float64)"
    dtypes = [a for a in (*args, kwargs.get("dtype")) if isinstance(a, torch.dtype)]
    if torch.float64 not in dtypes:
        return None
    if func is torch.Tensor.to:
        devices = [a for a in (*args[1:], kwargs.get("device")) if isinstance(a, (str, torch.device))]
        if not devices or any(torch.device(d).type != "cpu" for d in devices):
            return "`.to(torch.float64)` off the host; name it: .to('cpu', torch.float64) (MPS has no float64)"
    elif func in FACTORIES and kwargs.get("device") is not None:
        return f"a float64 {func.__name__} on a given device; make it on the host (no device): MPS has no float64"
    return None


class _Float64Check(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        caller = sys._getframe(1).f_code.co_filename
        if caller.startswith(PACKAGE) and caller != __file__:
            problem = _float64_problem(func, args, kwargs)
            if problem:
                raise StrictDeviceError(f"{problem} ({caller}:{sys._getframe(1).f_lineno})")
        return func(*args, **kwargs)
