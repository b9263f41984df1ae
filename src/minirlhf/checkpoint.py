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
from safetensors.torch import load_file

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


@contextmanager
def _atomic_file(path: Path):
    """An open temporary file beside `path`; when the block ends without error it is fsynced and renamed over
    `path` (with the permissions the umask gives a new file), else removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync it, then rename it over `path`."""
    with _atomic_file(path) as f:
        f.write(data)


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
    """Raise NotFinite naming the first floating-point tensor of (name, tensor) pairs that holds a NaN or an inf.
    A million values at a time: isfinite makes temporaries as big as what it checks."""
    for name, t in tensors:
        if t.is_floating_point() and not all(torch.isfinite(c).all() for c in t.reshape(-1).split(1 << 20)):
            raise NotFinite(f"{name} in {where} is not finite, so it was not saved and what was saved before stays; "
                            "lower --train.lr and resume from the last checkpoint (--resume)")


def save_weights(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """Save tensors as safetensors, atomically; only finite ones: a NaN anywhere leaves the previous file in place
    (NotFinite). A tensor that shares its storage with another, or is a view into a bigger one, is copied, so tied
    weights are stored per name; the others are written from their own memory, a tensor at a time (building the
    file in memory first, as safetensors' `save` does, made a checkpoint's save the run's peak: +0.5 GB for
    SmolLM2's weights)."""
    tensors, seen = {}, set()
    for k, v in state_dict.items():
        t = v.detach().to("cpu").contiguous()
        storage = t.untyped_storage()
        shared = storage.data_ptr() in seen or t.storage_offset() != 0 or storage.nbytes() != t.nbytes
        seen.add(storage.data_ptr())
        tensors[k] = t.clone() if shared else t
    check_finite(tensors.items(), path)
    with _atomic_file(path) as f:
        _write_safetensors(f, tensors, {k: str(v) for k, v in (metadata or {}).items()})


_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


def _write_safetensors(f, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """The safetensors layout (github.com/huggingface/safetensors, "Format"): an 8-byte little-endian header size, a
    JSON header naming each tensor's dtype, shape and byte range, padded with spaces to 8 bytes, then the bytes
    (little-endian, as every machine torch runs on here)."""
    header, offset = ({"__metadata__": metadata} if metadata else {}), 0
    order = sorted(tensors, key=lambda k: -tensors[k].element_size())  # each tensor aligned to its element size
    for k in order:
        t = tensors[k]
        if t.dtype not in _DTYPES:
            raise TypeError(f"{k}: {t.dtype} tensors are not saved; convert to one of {sorted(map(str, _DTYPES))}")
        header[k] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    f.write(len(text).to_bytes(8, "little"))
    f.write(text)
    for t in (tensors[k] for k in order):
        if t.numel():
            f.write(t.reshape(-1).view(torch.uint8).numpy())  # the tensor's own memory, not a copy


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
