"""Atomic writes: a checkpoint or store is either the old file or the new one, never half of each.

Weights go to safetensors, everything else to JSON or YAML; nothing is ever pickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from minirlhf import RunError, sharding


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_json(obj, path: Path) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def load_json(path: Path):
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise RunError(f"{path} is missing; point at a complete run directory") from e
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise RunError(f"{path} is corrupt ({str(e)[:120]}); re-run the stage that wrote it") from e


class NotFinite(RunError):
    """Weights with a NaN or an infinity, refused before they could replace what was saved before."""


def check_finite(tensors, where: Path) -> None:
    """Raise NotFinite naming the first floating-point tensor of (name, tensor) pairs that holds a NaN or an inf."""
    for name, t in tensors:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise NotFinite(f"{name} in {where} is not finite, so it was not saved and what was saved before stays; "
                            "lower --train.lr and resume from the last checkpoint (--resume)")


def save_weights(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """Save tensors as safetensors, atomically; only finite ones: a NaN anywhere leaves the previous file in place
    (NotFinite). A tensor that shares its storage with another, or is a view into a bigger one, is copied, so tied
    weights are stored per name; the others are written as they are (a checkpoint's optimizer state is as big as
    the model: a copy of all of it was the save's peak memory)."""
    tensors, seen = {}, set()
    for k, v in state_dict.items():
        t = v.detach().to("cpu").contiguous()
        storage = t.untyped_storage()
        shared = storage.data_ptr() in seen or t.storage_offset() != 0 or storage.nbytes() != t.nbytes
        seen.add(storage.data_ptr())
        tensors[k] = t.clone() if shared else t
    check_finite(tensors.items(), path)
    atomic_write_bytes(path, save(tensors, metadata={k: str(v) for k, v in (metadata or {}).items()}))


def check_finite_files(folder: Path) -> None:
    """Every .safetensors file directly in `folder` (written by another library, such as transformers'
    `save_pretrained`) read back a tensor at a time and checked finite."""
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as weights:
            check_finite(((k, weights.get_tensor(k)) for k in weights.keys()), f)


def load_weights(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path} is missing; point at a complete run directory")
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises several error types for a damaged file
        raise RunError(f"{path} is not a readable safetensors file ({e}); re-run the stage that wrote it") from e


def old_copy(path: Path) -> Path:
    """Where `atomic_dir` keeps the previous folder while it swaps in the new one."""
    return path.with_name(f".{path.name}.old")


def discard(path: Path) -> None:
    """Delete a folder, renamed first to a temporary name (`.NAME.*.tmp`): a crash mid-delete leaves what a resume
    clears (`RunDir.clear_leftovers`), never half a folder under its own name."""
    path = Path(path)
    if not path.exists():
        return
    doomed = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.replace(path, doomed)  # onto the empty folder just made: atomic
    shutil.rmtree(doomed, ignore_errors=True)


def recover_dir(path: Path) -> None:
    """Undo a crash between `atomic_dir`'s two renames: the previous folder, complete, goes back in place."""
    path = Path(path)
    if not path.exists() and old_copy(path).is_dir():
        try:
            old_copy(path).rename(path)
        except FileNotFoundError:  # another process (torchrun) put it back first
            pass


@contextmanager
def atomic_dir(path: Path, keep_old_as: Path | None = None):
    """Yield a temporary directory; on success it replaces `path` as a whole, and the previous folder is deleted or,
    with `keep_old_as`, renamed to it.

    For writers that fill a folder (transformers' `save_pretrained`): readers see the old folder or the new one,
    never a mix, and never a new one with weights that are not finite (`check_finite_files`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        check_finite_files(tmp)  # sub-folders were written, checked and synced by atomic_dir themselves
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if path.exists():
            old = old_copy(path)
            discard(old)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None and keep_old_as is not None:
            discard(keep_old_as)  # the same step saved again (a run resumed before it)
            os.replace(old, keep_old_as)
        elif old is not None:
            discard(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state split into tensors (for safetensors, keyed `PARAM_INDEX.NAME`) and JSON; whole tensors
    where it trains FSDP's shards (inside `sharding.gathered`)."""
    sd = sharding.full_optimizer_state(optimizer)
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, v in state.items():
            (tensors if torch.is_tensor(v) else scalars)[f"{idx}.{name}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict,
                         where: Path) -> None:
    """The inverse of `optimizer_state`; a checkpoint of another model or optimizer is a one-line error."""
    state: dict[int, dict] = {}
    for key, v in [*tensors.items(), *meta.get("scalars", {}).items()]:
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    params = [p for group in optimizer.param_groups for p in group["params"]]
    misfit = [i for i, st in state.items() if i >= len(params) or any(
        torch.is_tensor(v) and v.dim() > 0 and v.shape != params[i].shape for v in st.values())]
    try:
        if misfit:
            raise ValueError(f"parameter {misfit[0]} has another shape or does not exist")
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise RunError(f"the optimizer state in {where} does not fit this model ({str(e).splitlines()[0][:120]}); "
                       "resume with the config the run was started with") from e
