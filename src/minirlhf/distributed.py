"""Multi-process training on PyTorch's own engine: `torchrun --nproc_per_node=K -m minirlhf ppo ...`.

Each process samples, scores and compares with the reference its own share of a step's responses; the
small per-response tensors are then gathered, so every process holds the whole batch and computes the
same advantages as one process would. In the update each process takes its share of every minibatch,
scales its token-mean loss so that DistributedDataParallel's gradient average equals the single-process
gradient, and all processes step identically. Rank 0 alone writes files. gloo on CPU and MPS, NCCL on CUDA
(gloo with `--device cpu`); the collectives here move their tensors to the backend's device and back.
Without torchrun (WORLD_SIZE unset) every function here is a no-op for a world of one.

`--strategy fsdp` shards the policy with PyTorch's FSDP2 instead of copying it whole (`wrap`; sharding.py).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import fields
from datetime import timedelta

import torch
import torch.distributed as dist

from minirlhf import UserError, sharding, strict

_strategy = "ddp"  # how `wrap` spreads a trained module: `--strategy`, set by `init`
_alone = False  # inside `alone()`: this process runs as a world of one, its process group left untouched


def _active() -> bool:
    return dist.is_initialized() and not _alone


def init(preference: str = "auto", strategy: str = "ddp", timeout_s: float = 1800.0) -> tuple[int, int]:
    """Join the process group torchrun describes in the environment; (rank, world size). NCCL on this process's
    GPU when CUDA is there and `preference` (the config's device) allows it; gloo otherwise (`--device cpu` on a
    CUDA machine, MPS, CPU). `strategy` (ddp or fsdp) is how `wrap` will spread the trained modules. A collective
    that waits `timeout_s` for another process fails (`--dist_timeout_s`) instead of hanging."""
    global _strategy
    if _alone:
        return 0, 1
    _strategy = strategy
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = backend_for(preference, torch.cuda.is_available())
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


@contextmanager
def alone():
    """This process as a world of one: what runs inside (a stage that one process runs for all, such as the reward
    classifier trained first) makes no collective, and leaves the process group to the run around it."""
    global _alone
    previous, _alone = _alone, True
    try:
        yield
    finally:
        _alone = previous


def backend_for(preference: str, cuda: bool) -> str:
    """NCCL where the run computes on CUDA GPUs; gloo for the CPU (`--device cpu` on a GPU machine too) and MPS,
    which has no collective backend of its own."""
    return "nccl" if cuda and preference in ("auto", "cuda") else "gloo"


def rank() -> int:
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    return rank() == 0


def backend_device(backend: str | None) -> torch.device:
    """Where a backend's collectives take their tensors: NCCL this process's GPU, gloo (and none) the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def comm_device() -> torch.device:
    return backend_device(dist.get_backend() if _active() else None)


def device() -> torch.device | None:
    """This process's GPU under torchrun with NCCL, else None (the config decides: CPU, or MPS with gloo)."""
    return comm_device() if _active() and dist.get_backend() == "nccl" else None


def barrier() -> None:
    if _active():
        dist.barrier()


class Failed(UserError):
    """What stopped another process of the run, as every process reports it."""


def agree(error: BaseException | None) -> None:
    """Every process says whether it failed, in one collective; if any did, every process raises the same one-line
    error (the first failed process's), so none is left waiting for the others at a later collective."""
    if not _active():
        if error is not None:
            raise error
        return
    said = gather_list([None if error is None else f"{_describe(error)} (process {rank()} of {world_size()})"])
    first = next((x for x in said if x is not None), None)
    if first is None:
        return
    if error is not None and not isinstance(error, UserError):
        raise error  # a bug: its own traceback where it happened; the others say what stopped it
    raise Failed(first) from error


def _describe(error: BaseException) -> str:
    return str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {str(error)[:300]}"


@contextmanager
def agreeing():
    """Run the block on every process; then `agree` on how it went (a block that makes no collective itself)."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 (every process hears of it, and then it is raised again)
        agree(e)
        raise
    agree(None)


@contextmanager
def main_first():
    """Rank 0 runs the block first (it may train a missing classifier or fill a cache), then, if it succeeded, the
    others; each time every process learns how it went (`agree`), so a failure anywhere stops all of them."""
    if is_main():
        with agreeing():
            yield
        agree(None)
    else:
        agree(None)  # waits for rank 0's outcome (raising what stopped it)
        with agreeing():
            yield


def share(n: int) -> slice:
    """This process's contiguous share of n items (the first n % K processes take one more)."""
    k, r = world_size(), rank()
    size, extra = divmod(n, k)
    start = r * size + min(r, extra)
    return slice(start, start + size + (r < extra))


def shard(rows: list[int]) -> list[int]:
    """This process's rows of a minibatch (every K-th, starting at its rank)."""
    return rows[rank()::world_size()]


def wrap(module: torch.nn.Module | None, find_unused: bool = False):
    """A module with trainable parameters as the update calls it: inside DistributedDataParallel (`--strategy ddp`),
    or itself, sharded by FSDP2 (`--strategy fsdp`, sharding.py); the module itself in a world of one. Either way
    it accumulates gradients without communicating inside `sharding.no_sync(it)`."""
    if module is None or not _active():
        return module
    if _strategy == "fsdp":
        return sharding.shard_module(module, comm_device().type)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, find_unused_parameters=find_unused)


def _communicate(collective, tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Run `collective` on `tensor` moved to the backend's device (NCCL: the GPU; gloo: the CPU, also for a
    process computing on MPS); the result comes back on `tensor`'s device. Every collective here goes through
    this, so no caller has to know which backend runs (MINIRLHF_STRICT_DEVICES=1 checks that, strict.py)."""
    device = comm_device()
    moved = tensor.to(device)
    moved = moved.clone() if moved is tensor else moved  # collectives work in place: never on the caller's tensor
    with strict.communicating(device):
        collective(moved, *args, **kwargs)
    return moved.to(tensor.device)


def all_sum(values: torch.Tensor) -> torch.Tensor:
    return _communicate(dist.all_reduce, values) if _active() else values


def sum_gradients(params: list[torch.Tensor]) -> None:
    """Add up every process's gradients in one collective, for a model DistributedDataParallel does not wrap
    (each process's loss is its share of the whole batch's mean, so the sum is the single-process gradient)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not _active() or not grads:
        return
    total = all_sum(torch.cat([g.flatten() for g in grads]))
    for g, part in zip(grads, total.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def mean_over_ranks(stats: dict[str, float], share: float) -> dict[str, float]:
    """Statistics of a minibatch over every process: means weighted by each process's `share` of its tokens,
    and the largest probability ratio. float64 on the host: MPS has no float64."""
    keys = sorted(stats)
    means = all_sum(torch.tensor([stats[k] * share for k in keys], dtype=torch.float64))
    out = dict(zip(keys, means.tolist()))
    out["policy/ratio_max"] = all_max(torch.tensor([stats["policy/ratio_max"]])).item()
    return out


def all_max(values: torch.Tensor) -> torch.Tensor:
    return _communicate(dist.all_reduce, values, op=dist.ReduceOp.MAX) if _active() else values


def gather_rows(t: torch.Tensor | None, pad_left: bool = False) -> torch.Tensor | None:
    """Concatenate every process's (B_r, ...) tensor along dim 0, in rank order; a second dimension of
    different lengths is padded with zeros (on the left for left-padded prompts)."""
    if t is None or not _active():
        return t
    if t.dtype == torch.bool:  # not every backend gathers bools
        return gather_rows(t.to(torch.uint8), pad_left).bool()
    sizes = torch.tensor([t.size(0), t.size(1) if t.dim() > 1 else 0])
    shapes = _all_gather(sizes)
    width = max(int(s[1]) for s in shapes)
    if t.dim() > 1 and t.size(1) < width:
        pad = [0, 0] * (t.dim() - 2) + ([width - t.size(1), 0] if pad_left else [0, width - t.size(1)])
        t = torch.nn.functional.pad(t, pad)
    rows = max(int(s[0]) for s in shapes)
    padded = torch.cat([t, t.new_zeros(rows - t.size(0), *t.shape[1:])]) if t.size(0) < rows else t
    out = _all_gather(padded.contiguous())
    return torch.cat([o[: int(s[0])] for o, s in zip(out, shapes)]).to(t.device)


def _all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    """Every process's `t` (same shape everywhere), in rank order, on the backend's device."""
    device = comm_device()
    t = t.to(device)
    out = [torch.empty_like(t) for _ in range(world_size())]
    with strict.communicating(device):
        dist.all_gather(out, t)
    return out


def everywhere(flag: bool) -> bool:
    """Whether `flag` holds on every process (so that all of them take the same branch)."""
    if not _active():
        return flag
    return all_max(torch.tensor([0.0 if flag else 1.0])).item() == 0.0


def spread(params: list[torch.Tensor]) -> float:
    """max - min over the processes of a checksum of the weights: 0 while every process holds the same ones.
    Each tensor is summed on its device in float32, the sums added in float64 on the host (MPS has no float64).
    FSDP's shards are left out: each lives on one process only, so there is no copy to differ."""
    sums = [p.detach().float().sum() for p in params if not sharding.is_shard(p)]
    checksum = torch.stack(sums).to("cpu", torch.float64).sum().reshape(1) if sums else \
        torch.zeros(1, dtype=torch.float64)
    return (all_max(checksum) + all_max(-checksum)).item()


def gather_list(items: list) -> list:
    if not _active():
        return items
    out = [None] * world_size()
    with strict.communicating(comm_device()):
        dist.all_gather_object(out, items)
    return [x for part in out for x in part]


def gather_rollout(rollout):
    """Every process's Rollout joined into the whole batch, on every process."""
    if not _active():
        return rollout
    joined, P = {}, rollout.prompt_ids.size(1)
    for f in fields(rollout):
        v = getattr(rollout, f.name)
        if f.metadata.get("pad") == "prompt+response":  # (B, P+T, ...): prompt columns padded left, the rest right
            present = everywhere(v is not None)  # else the processes that lack it compute it after the gather
            joined[f.name] = torch.cat([gather_rows(v[:, :P], True), gather_rows(v[:, P:])], 1) if present else None
        else:
            joined[f.name] = gather_list(v) if isinstance(v, list) else gather_rows(v, f.metadata.get("pad") == "left")
    return type(rollout)(**joined)


def close(together: bool = False) -> None:
    """Tear the process group down; `together` (a run that ended well) first waits for every process, since one that
    tore its group down while another was still finishing aborted now and then (SIGABRT) after its last step. Not
    after an error: the others may be inside another collective, and would wait for --dist_timeout_s."""
    if _active():
        if together:
            dist.barrier()
        dist.destroy_process_group()


def timed_out(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because another process never came (or died): the backends raise
    it as a DistError, or a RuntimeError naming a timeout or a closed connection."""
    text = str(error)
    return isinstance(error, getattr(dist, "DistError", ())) or (
        isinstance(error, RuntimeError) and any(s in text for s in ("Timed out", "timed out", "Connection closed")))
