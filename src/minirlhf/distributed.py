"""Multi-process training on PyTorch's own engine: `torchrun --nproc_per_node=K -m minirlhf ppo ...`.

Each process samples, scores and compares with the reference its own share of a step's responses; the
small per-response tensors are then gathered, so every process holds the whole batch and computes the
same advantages as one process would. In the update each process takes its share of every minibatch,
scales its token-mean loss so that DistributedDataParallel's gradient average equals the single-process
gradient, and all processes step identically. Rank 0 alone writes files. gloo on CPU, NCCL on CUDA.
Without torchrun (WORLD_SIZE unset) every function here is a no-op for a world of one.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import fields

import torch
import torch.distributed as dist


def init() -> tuple[int, int]:
    """Join the process group torchrun describes in the environment; (rank, world size)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device | None:
    """This process's GPU under torchrun with CUDA, else None (let the config decide)."""
    if dist.is_initialized() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return None


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextmanager
def main_first():
    """Rank 0 runs the block first (it may train a missing classifier or fill a cache), then the others."""
    if not is_main():
        barrier()
    try:
        yield
    finally:  # rank 0 failing (bad input) still releases the others, which then fail the same way
        if is_main():
            barrier()


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
    """DistributedDataParallel around a module with trainable parameters (the module itself in a world of one)."""
    if module is None or not dist.is_initialized():
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, find_unused_parameters=find_unused)


def all_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values)
    return values


def mean_over_ranks(stats: dict[str, float], share: float, device) -> dict[str, float]:
    """Statistics of a minibatch over every process: means weighted by each process's `share` of its tokens,
    and the largest probability ratio."""
    keys = sorted(stats)
    means = all_sum(torch.tensor([stats[k] * share for k in keys], dtype=torch.float64, device=device))
    out = dict(zip(keys, means.tolist()))
    out["policy/ratio_max"] = all_max(torch.tensor([stats["policy/ratio_max"]], device=device)).item()
    return out


def all_max(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def gather_rows(t: torch.Tensor | None, pad_left: bool = False) -> torch.Tensor | None:
    """Concatenate every process's (B_r, ...) tensor along dim 0, in rank order; a second dimension of
    different lengths is padded with zeros (on the left for left-padded prompts)."""
    if t is None or not dist.is_initialized():
        return t
    if t.dtype == torch.bool:  # not every backend gathers bools
        return gather_rows(t.to(torch.uint8), pad_left).bool()
    sizes = torch.tensor([t.size(0), t.size(1) if t.dim() > 1 else 0], device=t.device)
    shapes = [torch.zeros_like(sizes) for _ in range(world_size())]
    dist.all_gather(shapes, sizes)
    width = max(int(s[1]) for s in shapes)
    if t.dim() > 1 and t.size(1) < width:
        pad = [0, 0] * (t.dim() - 2) + ([width - t.size(1), 0] if pad_left else [0, width - t.size(1)])
        t = torch.nn.functional.pad(t, pad)
    rows = max(int(s[0]) for s in shapes)
    padded = torch.cat([t, t.new_zeros(rows - t.size(0), *t.shape[1:])]) if t.size(0) < rows else t
    out = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(out, padded.contiguous())
    return torch.cat([o[: int(s[0])] for o, s in zip(out, shapes)])


def everywhere(flag: bool, device=None) -> bool:
    """Whether `flag` holds on every process (so that all of them take the same branch)."""
    if not dist.is_initialized():
        return flag
    return all_max(torch.tensor([0.0 if flag else 1.0], device=device)).item() == 0.0


def spread(value: torch.Tensor) -> float:
    """max - min over the processes of a scalar, e.g. a checksum of the weights."""
    return (all_max(value.reshape(1)) + all_max(-value.reshape(1))).item()


def gather_list(items: list) -> list:
    if not dist.is_initialized():
        return items
    out = [None] * world_size()
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]


def gather_rollout(rollout):
    """Every process's Rollout joined into the whole batch, on every process."""
    if not dist.is_initialized():
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


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
