"""A verdict that does not hang on noise: one starting reward for every system, measured once with enough
samples; the target relative to it; every system run with several seeds; and the speed-up read as its lower
bound across seeds (the slowest seed of ours against the quickest of theirs)."""

import statistics

import torch

from minirlhf.models.load import load_policy
from benchmarks.sentiment_reward import positive_logit


@torch.no_grad()
def reference_start(prompts: list[str], response_len: int, max_se: float = 0.045, min_samples: int = 4,
                    max_samples: int = 16, batch: int = 64) -> dict:
    """The reference policy's mean reward on the held-out openings, sampled as every system's held-out check
    samples (temperature 1, `response_len` tokens), `min_samples` or more responses per opening until the
    standard error is at most `max_se`. The error treats each opening's mean as one draw (responses to one
    opening are alike), so it counts the spread between openings, which more samples cannot shrink."""
    policy = load_policy("smollm2", "cpu", value_head=False)
    per_opening: list[list[float]] = [[] for _ in prompts]
    k = se = 0
    while k < max_samples and (k < min_samples or se > max_se):
        gen = torch.Generator().manual_seed(1000 + k)
        for i in range(0, len(prompts), batch):
            chunk = prompts[i: i + batch]
            texts = policy.sample(chunk, response_len, gen).texts
            for j, r in enumerate(positive_logit(chunk, texts)):
                per_opening[i + j].append(r)
        k += 1
        means = [statistics.fmean(r) for r in per_opening]
        se = statistics.stdev(means) / len(means) ** 0.5
    return {"reward": statistics.fmean(means), "se": se, "openings": len(prompts), "samples_per_opening": k}


def seconds_to(target: float, evals: list[dict]) -> float | None:
    """Training seconds at the first held-out check at or above the target (None: never reached)."""
    return next((e["train_s"] for e in evals if e["eval_reward"] >= target), None)


def spread(times: list[float | None]) -> dict:
    reached = [t for t in times if t is not None]
    out = {"per_seed": [None if t is None else round(t, 1) for t in times], "reached": f"{len(reached)}/{len(times)}"}
    if reached:
        out |= {"mean": round(statistics.fmean(reached), 1), "min": round(min(reached), 1),
                "max": round(max(reached), 1)}
    return out


def lower_bound_speedup(ours: list[float | None], theirs: list[float | None],
                        theirs_total: list[float]) -> float | None:
    """The slowest seed of ours against the quickest of theirs; a seed of theirs that never reached the target
    counts with its whole training time (less than its time to target). None if any seed of ours missed it."""
    if not ours or any(t is None for t in ours):
        return None
    quickest = min(t if t is not None else total for t, total in zip(theirs, theirs_total))
    return quickest / max(ours)
