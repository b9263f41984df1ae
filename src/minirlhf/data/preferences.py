"""Preference pairs: (prompt, chosen, rejected) strings, read from a .jsonl file or from `hf:NAME[:split]`
(a Hugging Face dataset, or a local folder or data file read through `datasets`; see data/hub.py).

Files and datasets may be in any layout of data/layouts.py: {"prompt", "chosen", "rejected"}, as `minirlhf feedback
export` writes them and as the files under shared/data hold them; Anthropic HH-RLHF text; or TRL conversational /
UltraFeedback-binarized message lists, pairs of whole episodes included (as `feedback export` writes those: the
opening as "prompt", each side's turns after it; the response is the rest of the conversation as HH text, so a
reward model reading `dialogue_text(prompt, chosen)` reads the whole chosen conversation). Splits are deterministic
and by prompt, so no prompt is in both the training and the held-out pairs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from minirlhf import DataError
from minirlhf.data import hub, layouts
from minirlhf.data.sentiment import jsonl_objects


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: str
    rejected: str


def read_pairs(path: str | Path, flag: str = "--preferences") -> list[Pair]:
    """Every pair of a .jsonl file or an `hf:` dataset; a bad row stops with `file:line: problem`. `flag` is the
    option that gave the source, for the offline error's advice."""
    if hub.is_hub(str(path)):
        rows = hub.load_rows(str(path), flag)
    else:
        if not Path(path).is_file():
            raise DataError(f"preference file {path} does not exist; give a .jsonl file of {{\"prompt\", "
                            "\"chosen\", \"rejected\"} (e.g. from `minirlhf feedback export`) or hf:DATASET[:split]")
        rows = jsonl_objects(Path(path), (), "\"chosen\" and \"rejected\" (and a \"prompt\")")
    where, first = rows[0]
    convert = layouts.detect(first, where)
    return [Pair(*convert(obj, where)) for where, obj in rows]


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
        return pairs[: cfg.max_train], read_pairs(cfg.eval_file, "--eval_file")[: cfg.max_eval]
    return split_pairs(pairs, cfg.eval_fraction, cfg.split_seed, cfg.max_train, cfg.max_eval)
