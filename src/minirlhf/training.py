"""Small pieces every training loop shares: length-aware batching, the LR schedule, progress bars."""

from __future__ import annotations

import random
import sys

import torch
from tqdm import tqdm

from minirlhf import UserError
from minirlhf.precision import precision


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
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear_decay(total_steps, cfg.warmup_ratio))
    return optimizer, scheduler


def optimizer_step(loss, params: list, optimizer, scheduler, max_grad_norm: float, sync=None) -> float:
    """Backward, clip the global gradient norm, step (and the LR schedule, if any); returns the norm before clipping.
    `sync(params)` runs between backward and clipping (adding up the processes' gradients).

    A non-finite loss stops the run before it can touch the weights; checkpoints already saved stay.
    """
    if not torch.isfinite(loss):
        raise UserError(f"the training loss became {loss.item()}; lower the learning rate or raise the warm-up "
                        "(checkpoints saved so far are intact)")
    optimizer.zero_grad(set_to_none=True)
    backward(loss)
    if sync is not None:
        sync(params)
    return clipped_step(params, optimizer, scheduler, max_grad_norm)


def backward(loss: torch.Tensor) -> None:
    """loss.backward(), scaled first under --dtype fp16 (small fp16 gradients would otherwise flush to zero)."""
    precision().scaler.scale(loss).backward()


def clipped_step(params: list, optimizer, scheduler, max_grad_norm: float) -> float:
    """Unscale (fp16), clip the global gradient norm, step the optimizer and the LR schedule (if any); returns the
    norm before clipping."""
    scaler = precision().scaler
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    scaler.step(optimizer)  # skipped by the scaler when fp16 gradients overflowed
    scaler.update()
    if scheduler is not None:
        scheduler.step()
    return grad_norm.item()


def progress(iterable, desc: str, **kwargs):
    """A tqdm bar on stderr; in logs (no terminal) it prints a line every 30 s instead of redrawing."""
    interactive = sys.stderr.isatty()
    return tqdm(iterable, desc=desc, mininterval=0.2 if interactive else 30, dynamic_ncols=interactive, **kwargs)


class EpochPlan:
    """Which batch each step of a supervised stage trains on. Epoch e's batches are drawn from a stream seeded by
    (seed, e), so a run resumed at any step sees exactly the batches the uninterrupted run saw.

    `batches_of(rng)` makes one epoch's batches (lists of example indices) from that stream."""

    def __init__(self, batches_of, epochs: int, seed: int):
        self.batches_of, self.epochs, self.seed = batches_of, epochs, seed
        self.per_epoch = len(batches_of(random.Random(0)))
        self.steps = epochs * self.per_epoch
        self._epoch, self._batches = 0, []

    def at(self, step: int) -> tuple[int, list[int], bool]:
        """(epoch, the batch's indices, whether it ends its epoch) of step 1, 2, ..."""
        epoch, i = divmod(step - 1, self.per_epoch)
        if epoch + 1 != self._epoch:
            self._epoch, self._batches = epoch + 1, self.batches_of(random.Random(f"{self.seed}-epoch-{epoch + 1}"))
        return epoch + 1, self._batches[i], i == self.per_epoch - 1


def shuffled_batches(n: int, batch_size: int):
    """`batches_of` for EpochPlan: every example once an epoch, in random order."""
    def batches_of(rng: random.Random) -> list[list[int]]:
        order = list(range(n))
        rng.shuffle(order)
        return [order[i: i + batch_size] for i in range(0, n, batch_size)]
    return batches_of


def length_grouped(lengths: list[int], batch_size: int):
    """`batches_of` for EpochPlan: random batches of similar lengths (`length_grouped_batches`)."""
    return lambda rng: length_grouped_batches(lengths, batch_size, rng)
