"""`--strategy fsdp`: the trained policy sharded across the torchrun processes by PyTorch's FSDP2 (`fully_shard`).

Each process keeps 1/K of the trained weights, their gradients and Adam state. A unit's forward all-gathers its
weights while it runs; its backward reduce-scatters the gradients, averaged over the processes as DDP's all-reduce
averages them, so the losses are scaled as for DDP (distributed.py). What the rest of minirlhf must know:

- `shard_module` makes new parameter objects (DTensors holding this process's shard): the runner points the
  optimizer, built before, at them (`adopt`);
- a forward gathers weights from every process, so every process must run the same passes. `no_sync` lets one
  with more micro-batches accumulate without communicating, as DDP's does; where one process runs the model alone,
  or as many times as its own rows need (sampling until each row ends), every process first gathers the whole
  weights (`unsharded`), and the passes inside communicate nothing;
- to save, every process lends the main one its shards (`gathered`), which the savers read (`full_state_dict`,
  `full_optimizer_state`): a checkpoint holds whole tensors, as with DDP or one process, and resumes with either.

FSDP2 and DTensor take ~0.7 s to import, so only `shard_module` imports them (as `distributed.wrap` does DDP).
"""

from __future__ import annotations

import sys
import warnings
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn as nn

from minirlhf import ConfigError, strict

_replaced: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}  # id(p) -> (p, its shard) until `adopt` takes them
_lent: dict[int, tuple[object, dict]] = {}  # in `gathered`: id(module or optimizer) -> (it, its whole state dict)
_unsharded_depth = 0  # `unsharded` blocks open: an inner one leaves the weights to the outer one


def shard_module(module: nn.Module, device_type: str) -> nn.Module:
    """FSDP2 on each of the module's `units`, then on the module itself, the root, over all processes (whose
    collectives run on `device_type`: cuda for NCCL, cpu for gloo). Returns the module, sharded in place.

    Only trained parameters shard; frozen ones stay whole on every process (`ignored_params`). FSDP2 would take
    both in one unit, but frozen ones have no gradient or Adam state (most of what sharding saves), and the frozen
    trunk of `--policy_options.freeze_layers` is shared with the reference and a separate critic, which run it
    outside the policy's collectives. So under LoRA the base weights stay whole and the adapters shard."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = next(module.parameters()).device
    if device.type != device_type:
        raise ConfigError(f"--strategy fsdp runs on CUDA GPUs (NCCL) or the CPU (gloo), not on {device.type}; "
                          "use --strategy ddp there")
    # FSDP2 warns of each unit whose output is a view, as changing it in place would skip the unit's backward
    # hook; minirlhf changes no module's output in place, so the warning is noise here
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    frozen = {p for p in module.parameters() if not p.requires_grad}
    before = dict(module.named_parameters())
    parts = units(module)
    for unit in parts:
        fully_shard(unit if len(unit) > 1 else unit[0], mesh=mesh, ignored_params=frozen)
    fully_shard(module, mesh=mesh, ignored_params=frozen)
    # Make the module the root now: sampling calls units directly, outside its forward, and the first FSDP module
    # to run would otherwise take itself for the root (FSDP2 has no public call for this).
    module._get_fsdp_state()._lazy_init()
    after = dict(module.named_parameters())
    _replaced.update({id(p): (p, after[name]) for name, p in before.items() if after[name] is not p})
    _report(module, len(parts), torch.device(device_type))
    return module


def units(module: nn.Module) -> list[list[nn.Module]]:
    """What `shard_module` shards one by one below the root, children before parents: each trained block of a stack
    of like blocks (a transformer's layers), then every other module that holds trained parameters of its own (the
    LSTM, an embedding, a norm, a head, the value head). The policies call these directly when they sample, not
    through the root's forward, so each must gather its own weights; modules that share a parameter (tied input
    and output embeddings) form one unit, which FSDP2 gathers when either runs."""
    blocks, inside = [], set()
    for m in module.modules():
        if id(m) in inside or not isinstance(m, nn.ModuleList) or len({type(b) for b in m}) != 1:
            continue
        for block in m:
            if any(p.requires_grad for p in block.parameters()):
                blocks.append([block])
                inside.update(id(x) for x in block.modules())
    holders = [m for m in module.modules() if m is not module and id(m) not in inside
               and any(p.requires_grad for p in m.parameters(recurse=False))]
    groups: list[list[nn.Module]] = []
    for m in reversed(holders):  # a module after those inside it (fully_shard goes bottom-up)
        own = {id(p) for p in m.parameters(recurse=False) if p.requires_grad}
        tied = [i for i, g in enumerate(groups) if own & {id(p) for x in g for p in x.parameters(recurse=False)}]
        merged = [x for i in tied for x in groups[i]] + [m]  # where the first of them was: before their parents
        groups = [g for i, g in enumerate(groups) if i not in tied]
        groups.insert(tied[0] if tied else len(groups), merged)
    return blocks + groups


def _report(module: nn.Module, n_units: int, device: torch.device) -> None:
    """One line (main process): how many of the module's sharded values each process holds."""
    sharded = [p for p in module.parameters() if is_shard(p)]
    held = [None] * dist.get_world_size()
    with strict.communicating(device):
        dist.all_gather_object(held, sum(p.to_local().numel() for p in sharded))
    if _is_main():
        print(f"fsdp: {type(module).__name__} in {n_units} units and the root; the processes hold {held} of its "
              f"{sum(p.numel() for p in sharded)} sharded values", flush=True)


def adopt(optimizer: torch.optim.Optimizer | None) -> None:
    """Point `optimizer`, built before `shard_module`, at the sharded parameters FSDP put in place of those it was
    given; state a resumed run loaded (Adam's moments, whole on every process) is cut to this process's shard."""
    replaced = dict(_replaced)
    _replaced.clear()
    if not replaced or optimizer is None:
        return
    from torch.distributed.tensor import distribute_tensor  # (imported already by shard_module)

    def cut(value, param):  # every process holds the whole tensor: each keeps its part, no message sent
        if not torch.is_tensor(value) or value.shape != param.shape:
            return value  # (Adam's step)
        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)

    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if id(p) in replaced:
                new = group["params"][i] = replaced[id(p)][1]
                optimizer.state[new] = {k: cut(v, new) for k, v in optimizer.state.pop(p, {}).items()}


def is_shard(t) -> bool:
    """Whether `t` is a DTensor (FSDP's shard of a parameter), without importing DTensor in runs that never shard."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(t, dtensor.DTensor)


def _sharded(module) -> bool:
    return module is not None and any(is_shard(p) for p in module.parameters())


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _fsdp_modules(modules: list) -> list[nn.Module]:
    """The FSDP modules (units and roots) in sharded `modules`, each once."""
    found = {id(u): u for m in modules if _sharded(m) for u in m.modules()  # (FSDP is imported once sharded)
             if isinstance(u, sys.modules["torch.distributed.fsdp"].FSDPModule)}
    return list(found.values())


@contextmanager
def no_sync(module):
    """DDP's `no_sync` for any module `distributed.wrap` returned: the passes inside accumulate gradients without
    communicating, and the first pass after reduces them all. Under FSDP the weights stay gathered from the first
    pass inside on, so processes running different numbers of passes still run the same collectives."""
    if hasattr(module, "no_sync"):  # DDP
        with module.no_sync():
            yield
        return
    fsdp = _fsdp_modules([module])
    for u in fsdp:
        u.set_requires_gradient_sync(False, recurse=False)
        u.set_reshard_after_forward(False, recurse=False)
        u.set_reshard_after_backward(False, recurse=False)
    try:
        yield
    finally:
        for u in fsdp:  # back to FSDP2's defaults (the root keeps its weights after forward)
            u.set_requires_gradient_sync(True, recurse=False)
            u.set_reshard_after_forward(u is not module, recurse=False)
            u.set_reshard_after_backward(True, recurse=False)


@contextmanager
def unsharded(modules: list):
    """Every process enters together: inside, sharded modules hold their whole weights and their forwards gather
    nothing, so the main process alone may sample or evaluate them, and processes may decode different numbers of
    tokens. A no-op where nothing is sharded, and inside another such block."""
    global _unsharded_depth
    fsdp = _fsdp_modules(modules) if _unsharded_depth == 0 else []
    roots = {id(m) for m in modules}
    for u in fsdp:
        u.unshard()
        u.set_reshard_after_forward(False, recurse=False)
    _unsharded_depth += 1
    try:
        yield
    finally:
        _unsharded_depth -= 1
        for u in fsdp:  # back to FSDP2's defaults: units free their weights after forward, the root keeps them
            u.set_reshard_after_forward(id(u) not in roots, recurse=False)
            u.reshard()


def _whole(state: dict) -> dict:
    """A state dict with every DTensor gathered whole (every process takes part); on the main process's host, as
    a saver wants it, and empty elsewhere. Tensors under several names (tied weights) are gathered once."""
    done: dict[int, torch.Tensor] = {}
    for v in state.values():
        if is_shard(v) and id(v) not in done:
            done[id(v)] = v.full_tensor().detach().cpu()
    return {k: done.get(id(v), v) for k, v in state.items()} if _is_main() else {}


@contextmanager
def gathered(modules: list, optimizer: torch.optim.Optimizer | None = None):
    """Every process enters together: inside, `full_state_dict` and `full_optimizer_state` give the main process
    the whole state of sharded modules (and of the optimizer that trains them), for it alone to save. A no-op
    where nothing is sharded."""
    roots = [m for m in modules if _sharded(m)]
    for m in roots:
        _lent[id(m)] = m, _whole(m.state_dict(keep_vars=True))  # keep_vars: tied weights are one object
    if roots and optimizer is not None:
        state = optimizer.state_dict()
        _lent[id(optimizer)] = optimizer, {**state, "state": {i: _whole(s) for i, s in state["state"].items()}}
    try:
        yield
    finally:
        _lent.clear()


def full_state_dict(module: nn.Module) -> dict:
    """`module.state_dict()` with whole tensors, as a saver wants it: the module's own, unless it is (or is part
    of) a sharded module, whose whole state the main process gets inside `gathered`."""
    for root, state in _lent.values():
        names = root.named_modules() if isinstance(root, nn.Module) else []
        prefix = next((n + "." if n else "" for n, m in names if m is module), None)
        if prefix is not None:
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    state = module.state_dict()
    if any(is_shard(v) for v in state.values()):
        raise RuntimeError("read a sharded module's weights inside sharding.gathered (every process enters)")
    return state


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()` with whole tensors (inside `gathered` for one that trains sharded parameters)."""
    return _lent[id(optimizer)][1] if id(optimizer) in _lent else optimizer.state_dict()
