"""Small pieces every training loop shares: length-aware batching, the LR schedule, progress bars."""

from __future__ import annotations

import random
import sys


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Batches of indices with similar lengths, for inference: little padding, same results."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def length_grouped_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Random batches of similar lengths: shuffle, sort within windows of 50 batches, shuffle batches."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = 50 * batch_size
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w: w + window], key=lambda i: lengths[i])
        batches += [chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def warmup_linear_decay(total_steps: int, warmup_ratio: float):
    """LR multiplier: linear warm-up over warmup_ratio of the steps, then linear decay to zero."""
    warmup = max(1, int(total_steps * warmup_ratio))
    return lambda step: min((step + 1) / warmup, max(0.0, (total_steps - step) / max(1, total_steps - warmup)))


def make_optimizer(params: list, cfg, total_steps: int):
    """AdamW over `params` and its warm-up/decay schedule, from an OptimConfig."""
    import torch

    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear_decay(total_steps, cfg.warmup_ratio))
    return optimizer, scheduler


def optimizer_step(loss, params: list, optimizer, scheduler, max_grad_norm: float) -> float:
    """Backward, clip the global gradient norm, step (and the LR schedule, if any); returns the norm before clipping.

    A non-finite loss stops the run before it can touch the weights; checkpoints already saved stay.
    """
    import torch

    from minirlhf import UserError

    if not torch.isfinite(loss):
        raise UserError(f"the training loss became {loss.item()}; lower the learning rate or raise the warm-up "
                        "(checkpoints saved so far are intact)")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return grad_norm.item()


def progress(iterable, desc: str, **kwargs):
    """A tqdm bar on stderr; in logs (no terminal) it prints a line every 30 s instead of redrawing."""
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(iterable, desc=desc, mininterval=0.2 if interactive else 30, dynamic_ncols=interactive, **kwargs)
