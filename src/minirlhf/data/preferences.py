"""Preference pairs: JSON Lines of {"prompt", "chosen", "rejected"}, as `minirlhf feedback export` writes them
and as Anthropic HH-RLHF and OpenAI's summarisation comparisons are published.

"prompt" is a string (plain, or HH `Human:/Assistant:` text) or a list of messages; "messages" may stand in for it.
Splits are deterministic and by prompt, so no prompt is in both the training and the held-out pairs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from minirlhf import DataError
from minirlhf.data.dialogue import prompt_of
from minirlhf.data.sentiment import jsonl_objects


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: str
    rejected: str


def read_pairs(path: str | Path) -> list[Pair]:
    """Every pair of a .jsonl file; a bad line stops with `file:line: problem`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"preference file {path} does not exist; give a .jsonl file of "
                        "{\"prompt\", \"chosen\", \"rejected\"} (e.g. from `minirlhf feedback export`)")
    pairs = []
    for where, obj in jsonl_objects(path, ("chosen", "rejected"), "\"prompt\", \"chosen\" and \"rejected\""):
        if "prompt" not in obj and "messages" not in obj:
            raise DataError(f"{where}: missing field 'prompt'; each line needs \"prompt\", \"chosen\" and \"rejected\"")
        for key in ("chosen", "rejected"):
            if not isinstance(obj[key], str):
                raise DataError(f"{where}: field {key!r} must be a string, got {obj[key]!r}")
        pairs.append(Pair(prompt_of(obj, where), obj["chosen"], obj["rejected"]))
    return pairs


def split_pairs(pairs: list[Pair], eval_fraction: float, seed: int = 0,
                max_train: int | None = None, max_eval: int | None = None) -> tuple[list[Pair], list[Pair]]:
    """(training, held-out) pairs, split by prompt with a seeded shuffle; the same on every machine."""
    prompts = sorted({p.prompt for p in pairs})
    random.Random(f"{seed}-preferences").shuffle(prompts)
    n_eval = max(1, round(len(prompts) * eval_fraction)) if len(prompts) > 1 else 0
    held = set(prompts[:n_eval])
    train = [p for p in pairs if p.prompt not in held]
    evals = [p for p in pairs if p.prompt in held]
    random.Random(f"{seed}-preferences-order").shuffle(train)
    random.Random(f"{seed}-preferences-eval-order").shuffle(evals)  # max_eval then takes a sample, not a file's head
    if not train or not evals:
        raise DataError(f"{len(pairs)} preference pairs over {len(prompts)} prompts are too few to hold some out; "
                        "give pairs for at least two different prompts")
    return train[:max_train], evals[:max_eval]


def length_baseline(pairs: list[Pair]) -> float:
    """Accuracy of "the longer response wins" (ties count half): the floor a reward model must beat."""
    score = sum(1.0 if len(p.chosen) > len(p.rejected) else 0.5 if len(p.chosen) == len(p.rejected) else 0.0
                for p in pairs)
    return score / max(1, len(pairs))


def load_split(cfg) -> tuple[list[Pair], list[Pair]]:
    """(training, held-out) pairs of a stage's config: its `preferences` file split by prompt, or with
    `eval_file` set, that file held out whole; at most `max_train` / `max_eval` of each."""
    pairs = read_pairs(cfg.preferences)
    if cfg.eval_file is not None:
        return pairs[: cfg.max_train], read_pairs(cfg.eval_file)[: cfg.max_eval]
    return split_pairs(pairs, cfg.eval_fraction, cfg.split_seed, cfg.max_train, cfg.max_eval)
