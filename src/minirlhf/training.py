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


def progress(iterable, desc: str, **kwargs):
    """A tqdm bar on stderr; in logs (no terminal) it prints a line every 30 s instead of redrawing."""
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(iterable, desc=desc, mininterval=0.2 if interactive else 30, dynamic_ncols=interactive, **kwargs)
