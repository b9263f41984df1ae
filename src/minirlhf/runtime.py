"""Where and how a run executes: the process-wide settings made once at the entry point, device choice,
seeding, memory, the cache folder. The precision of its passes is precision.py's."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import random
import resource
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from minirlhf import UserError


def configure_process() -> None:
    """Process-wide settings, made once by the entry point (the CLI, or a test session), never by a library call:
    transformers' per-load progress bars and expected warnings off; the Hugging Face hub put in offline mode when
    it does not answer, so loading a hub name uses the local cache or fails at once instead of retrying for half
    a minute."""
    from transformers.utils import logging  # heavy: imported only by the entry point that calls this

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # `datasets` bars on every hf: load
    if not hub_reachable():
        from huggingface_hub import constants

        os.environ["HF_HUB_OFFLINE"] = "1"
        constants.HF_HUB_OFFLINE = True


_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim; a no-op elsewhere). Batches of varying
    lengths leave holes in glibc's heap that it keeps: on IMDB reviews the resident memory would grow by a GB, and
    an RL step's growing KV caches and episodes of varying length creep up the same way."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def cache_root() -> Path:
    """Where minirlhf keeps what it makes once per machine (converted models, the precision probe):
    $MINIRLHF_CACHE, else ~/.cache/minirlhf."""
    return Path(os.environ.get("MINIRLHF_CACHE") or Path.home() / ".cache" / "minirlhf")


def pick_device(preference: str = "auto") -> tuple[torch.device, str]:
    """Return the device to use and a sentence saying why."""
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if preference == "auto":
        if cuda:
            return torch.device("cuda"), f"CUDA is available ({torch.cuda.get_device_name(0)})"
        if mps:
            return torch.device("mps"), "Apple MPS is available and CUDA is not"
        return torch.device("cpu"), "neither CUDA nor Apple MPS is available"
    if preference == "cuda" and not cuda:
        raise UserError("--device cuda was asked for but torch sees no CUDA GPU; use --device auto or cpu")
    if preference == "mps" and not mps:
        raise UserError("--device mps was asked for but Apple MPS is not available; use --device auto or cpu")
    return torch.device(preference), f"--device {preference} was asked for"


def seed_everything(seed: int) -> None:
    """Make a run repeatable on CPU: Python, NumPy and torch generators all start from `seed`."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Every random stream a run draws from, as tensors (for safetensors) and JSON: torch's on the CPU and on each
    CUDA GPU or MPS, NumPy's and Python's, so that a resumed run draws what the uninterrupted one drew."""
    import numpy as np

    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors |= {f"rng.cuda.{i}": t for i, t in enumerate(torch.cuda.get_rng_state_all())}
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        tensors["rng.mps"] = torch.mps.get_rng_state()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss_next = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)], "python": [version, list(internal), gauss_next]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """The inverse of `rng_state` (a checkpoint from before it saved NumPy's and Python's streams restores torch's)."""
    import numpy as np

    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])
    if "rng.mps" in tensors and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        torch.mps.set_rng_state(tensors["rng.mps"])
    if "rng.numpy" in tensors and "numpy" in meta:
        kind, pos, has_gauss, gauss = meta["numpy"]
        np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "python" in meta:
        version, internal, gauss_next = meta["python"]
        random.setstate((version, tuple(internal), gauss_next))


def peak_memory_mb() -> float:
    """Peak resident memory of this process (and finished children) in MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 / 1024 if os.uname().sysname != "Darwin" else 1 / 2**20  # KiB on Linux, bytes on macOS
    return own * scale


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers (False at once when HF_HUB_OFFLINE is set)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def accelerator_peak_mb(device: torch.device | None = None) -> float | None:
    """Peak memory the accelerator held for this process, in MiB: CUDA's max_memory_allocated, MPS's driver
    memory (MPS keeps no peak: its current figure); None on the CPU."""
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device is not None and device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**20
    return None


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: an FSDP shard (a DTensor) counts what the process holds, not the whole."""
    return t.to_local() if hasattr(t, "to_local") else t


def memory_report(modules: list, optimizer=None) -> dict[str, float]:
    """Where the memory goes, in MiB: parameters (a tensor shared by several models counted once), their
    gradients (trainable parameters only), the optimizer's state, the process's peak resident memory, and the
    accelerator's peak where the modules live on one."""
    tensors, trained = {}, set()  # by storage: a tensor shared by several models counts once
    for module in modules:
        for p in module.parameters() if module is not None else []:
            local = _local(p)
            tensors[local.data_ptr()] = local
            if p.requires_grad:
                trained.add(local.data_ptr())
    size = lambda ts: sum(t.numel() * t.element_size() for t in ts) / 2**20  # noqa: E731
    state = [_local(v) for s in (optimizer.state.values() if optimizer is not None else []) for v in s.values()
             if hasattr(v, "numel") and v.dim() > 0]
    report = {"memory/params_mb": round(size(tensors.values()), 1),
              "memory/grads_mb": round(size(t for k, t in tensors.items() if k in trained), 1),
              "memory/optimizer_mb": round(size(state), 1), "memory/peak_rss_mb": round(peak_memory_mb(), 1)}
    devices = {p.device for p in tensors.values() if p.device.type != "cpu"}
    accelerator = accelerator_peak_mb(next(iter(devices))) if devices else None
    if accelerator is not None:
        report["memory/accelerator_peak_mb"] = round(accelerator, 1)
    return report
