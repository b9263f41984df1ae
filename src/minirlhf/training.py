"""Small pieces every training loop shares: length-aware batching, the LR schedule, progress bars."""

from __future__ import annotations

import math
import random
import sys
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
from tqdm import tqdm

from minirlhf import UserError, distributed
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


@dataclass
class Skips:
    """Updates skipped because their gradients were not finite (`--guards`): warn says so at the first and stops the
    run after IN_A_ROW in a row (it is going nowhere); strict stops at the first; off only counts. The weights are
    never touched by such an update, so no checkpoint can hold what it would have made."""

    mode: str = "warn"
    total: int = 0
    """in the whole run (a resumed run continues the count from its checkpoint)"""
    in_a_row: int = 0

    IN_A_ROW: ClassVar[int] = 10

    def skip(self, grad_norm: float) -> None:
        self.total, self.in_a_row = self.total + 1, self.in_a_row + 1
        fix = ("lower --train.lr, or find what made the loss non-finite (a reward or a data value); no skipped update "
               "reaches a checkpoint, so the last one is intact for --resume")
        if self.mode == "strict":
            raise UserError(f"the gradients were not finite (norm {grad_norm}); --guards strict stopped the run "
                            f"before the update; {fix}")
        if self.mode == "warn" and self.in_a_row >= self.IN_A_ROW:
            raise UserError(f"{self.in_a_row} updates in a row had non-finite gradients and were skipped; {fix}")
        if self.mode == "warn" and self.total == 1 and distributed.is_main():
            print(f"the gradients were not finite (norm {grad_norm}): that update was skipped, the weights are "
                  "unchanged (counted in train/skipped_updates; --guards strict stops instead)", flush=True)


_skips = Skips()


def skips(mode: str | None = None, total: int = 0) -> Skips:
    """The run's count of skipped updates; a new count for a run that starts (`mode`) or resumes (`total`)."""
    global _skips
    if mode is not None:
        _skips = Skips(mode, total)
    return _skips


def optimizer_step(loss, params: list, optimizer, scheduler, max_grad_norm: float, sync=None,
                   groups: list[list] | None = None) -> float:
    """Backward, clip the global gradient norm, step (and the LR schedule, if any); returns the norm before clipping.
    `sync(params)` runs between backward and clipping (adding up the processes' gradients). A non-finite loss gives
    non-finite gradients, and the update is skipped (`clipped_step`): every process of a torchrun sees the same
    summed gradients, so all of them skip together. `groups`: parameter lists clipped each on its own (the members
    of an ensemble, each as if trained alone)."""
    optimizer.zero_grad(set_to_none=True)
    backward(loss)
    if sync is not None:
        sync(params)
    return clipped_step(params, optimizer, scheduler, max_grad_norm, groups)


def backward(loss: torch.Tensor) -> None:
    """loss.backward(), scaled first under --dtype fp16 (small fp16 gradients would otherwise flush to zero)."""
    precision().scaler.scale(loss).backward()


def clipped_step(params: list, optimizer, scheduler, max_grad_norm: float, groups: list[list] | None = None) -> float:
    """Unscale (fp16), clip the global gradient norm (of each of `groups`, if given), step the optimizer and the LR
    schedule (if any); returns the norm before clipping (of all groups together). Gradients that are not finite skip
    the update (`Skips`); the schedule still steps, so the learning rate stays a function of the step."""
    scaler = precision().scaler
    scaler.unscale_(optimizer)
    norms = [torch.nn.utils.clip_grad_norm_(group, max_grad_norm).item() for group in (groups or [params])]
    grad_norm = norms[0] if len(norms) == 1 else math.sqrt(sum(n * n for n in norms))
    if math.isfinite(grad_norm) or scaler.is_enabled():  # fp16's scaler skips an overflow and lowers its scale itself
        scaler.step(optimizer)
        scaler.update()
        _skips.in_a_row = 0
    else:
        optimizer.zero_grad(set_to_none=True)
        _skips.skip(grad_norm)
    if scheduler is not None:
        with warnings.catch_warnings():  # torch's warning of a schedule stepped without the optimizer: meant here
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            scheduler.step()
    return grad_norm


def progress(iterable, desc: str, **kwargs):
    """A tqdm bar on stderr; in logs (no terminal) it prints a line every 30 s instead of redrawing."""
    interactive = sys.stderr.isatty()
    return tqdm(iterable, desc=desc, mininterval=0.2 if interactive else 30, dynamic_ncols=interactive, **kwargs)


class EpochPlan:
    """Which batch each step of a supervised stage trains on, the one batch schedule of every stage. Epoch e's batches
    are drawn from a stream seeded by (seed, e), so a run resumed at any step sees exactly the batches the
    uninterrupted run saw.

    `batches_of(rng)` makes one epoch's batches (lists of example indices, or DPO's indices of step batches drawn
    once) from that stream. `steps`: a number of steps other than `epochs` whole passes (the last pass may be cut
    short). `stream(e)`: the random stream of epoch e, where a stage's saved runs were made with another one."""

    def __init__(self, batches_of, epochs: int, seed: int, steps: int | None = None, stream=None):
        self.batches_of, self.epochs, self.seed = batches_of, epochs, seed
        self.stream = stream or (lambda epoch: random.Random(f"{seed}-epoch-{epoch}"))
        self.per_epoch = len(batches_of(random.Random(0)))
        self.steps = steps or epochs * self.per_epoch
        self._epoch, self._batches = 0, []

    def at(self, step: int) -> tuple[int, list[int], bool]:
        """(epoch, the batch of step 1, 2, ..., whether it ends its epoch)"""
        epoch, i = divmod(step - 1, self.per_epoch)
        if epoch + 1 != self._epoch:
            self._epoch, self._batches = epoch + 1, self.batches_of(self.stream(epoch + 1))
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
