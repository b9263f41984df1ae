"""Where and how a run executes: the process-wide settings made once at the entry point, device choice,
seeding, memory."""

from __future__ import annotations

import os
import random
import resource
import socket
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
    if not hub_reachable():
        from huggingface_hub import constants

        os.environ["HF_HUB_OFFLINE"] = "1"
        constants.HF_HUB_OFFLINE = True


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


def memory_report(modules: list, optimizer=None) -> dict[str, float]:
    """Where the memory goes, in MiB: parameters (a tensor shared by several models counted once), their
    gradients (trainable parameters only), the optimizer's state, and the process's peak resident memory."""
    tensors = {}
    for module in modules:
        for p in module.parameters() if module is not None else []:
            tensors[p.data_ptr()] = p
    size = lambda ts: sum(t.numel() * t.element_size() for t in ts) / 2**20  # noqa: E731
    state = [v for s in (optimizer.state.values() if optimizer is not None else []) for v in s.values()
             if hasattr(v, "numel") and v.dim() > 0]
    return {"memory/params_mb": round(size(tensors.values()), 1),
            "memory/grads_mb": round(size(p for p in tensors.values() if p.requires_grad), 1),
            "memory/optimizer_mb": round(size(state), 1), "memory/peak_rss_mb": round(peak_memory_mb(), 1)}
