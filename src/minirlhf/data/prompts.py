"""Prompts for RLHF: the first words of the corpus texts, or a .jsonl file of {"prompt": ...}, where a prompt may be
a conversation (`{"messages": [...]}` or HH `Human:/Assistant:` text; see data/dialogue.py).

Training prompts come from the corpus's training split and held-out prompts from its validation split,
so the evaluation never sees a prompt the policy trained on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from minirlhf import DataError
from minirlhf.config import DataConfig
from minirlhf.data.dialogue import prompt_of
from minirlhf.data.sentiment import jsonl_objects, load_splits
from minirlhf.data.vocab import detokenize, tokenize


@dataclass
class PromptConfig:
    file: str | None = None
    """a .jsonl file of {"prompt": ...} objects (default: the first words of the corpus texts, see `data`)"""
    eval_file: str | None = None
    """held-out prompts (.jsonl); default: held out from the same source"""
    words: int = 2
    """words of each corpus text used as its prompt"""
    template: str = "{prompt}"
    """how each prompt is put to the policy; {prompt} is replaced, e.g. "Write a tweet that starts with: {prompt}" """
    max_eval: int = 64
    """held-out prompts used for evaluation"""

    checks = {"words": ">= 1", "max_eval": ">= 1"}


def first_words(texts: list[str], words: int) -> list[str]:
    """The first `words` words of each text (deduplicated, order kept)."""
    prompts = [detokenize(tokenize(t)[:words]) for t in texts]
    return list(dict.fromkeys(p for p in prompts if p))


def read_prompts(path: str) -> list[str]:
    """The prompts of a .jsonl file, conversations as HH text; a bad line stops with `file:line: problem`."""
    if not Path(path).is_file():
        raise DataError(f"prompt file {path} does not exist; give a .jsonl file with one {{\"prompt\": ...}} per line")
    prompts = []
    for where, obj in jsonl_objects(Path(path), (), "a \"prompt\" (string, HH text or messages) or \"messages\""):
        if "prompt" not in obj and "messages" not in obj:
            raise DataError(f"{where}: missing field 'prompt'; each line needs a \"prompt\" or a \"messages\" list")
        prompts.append(prompt_of(obj, where))
    return prompts


def load_prompts(cfg: PromptConfig, data: DataConfig) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts), templated; the same on every machine for the same config."""
    if "{prompt}" not in cfg.template:
        raise DataError(f"prompts.template must contain {{prompt}}, got {cfg.template!r}")
    if cfg.file is not None:
        train = read_prompts(cfg.file)
        if cfg.eval_file is None:
            random.Random(f"{data.split_seed}-prompts").shuffle(train)
            n_eval = min(cfg.max_eval, max(1, round(len(train) * data.val_fraction)))
            held, train = train[:n_eval], train[n_eval:]
    else:
        splits = load_splits(data)
        train = first_words([t for t, _ in splits.train], cfg.words)
        held = first_words([t for t, _ in splits.val], cfg.words)
    if cfg.eval_file is not None:
        held = read_prompts(cfg.eval_file)
    if not train or not held:
        raise DataError(f"{'training' if not train else 'held-out'} prompts are empty; give more prompts")
    fill = lambda ps: [cfg.template.replace("{prompt}", p) for p in ps]  # noqa: E731
    return fill(train), fill(held[: cfg.max_eval])
