"""Prompts for RLHF: the first words of the corpus texts, or a .jsonl file of {"prompt": ...} (or {"text": ...}),
or `hf:NAME[:split]` with a "prompt" or "text" column (see data/hub.py); a prompt may be a conversation
(`{"messages": [...]}`, a message list, or HH `Human:/Assistant:` text; see data/dialogue.py).

Training prompts come from the corpus's training split and held-out prompts from its validation split,
so the evaluation never sees a prompt the policy trained on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from minirlhf import DataError
from minirlhf.config import DataConfig, setting
from minirlhf.data import hub
from minirlhf.data.dialogue import prompt_of
from minirlhf.data.sentiment import jsonl_objects, load_splits
from minirlhf.data.vocab import detokenize, tokenize


@dataclass
class PromptConfig:
    file: str | None = None
    """a .jsonl file of {"prompt": ...} objects, or hf:NAME[:split] with a prompt or text column (default: the first
    words of the corpus texts, see `data`)"""
    eval_file: str | None = None
    """held-out prompts (.jsonl or hf:NAME[:split]); default: held out from the same source"""
    words: int = setting(2, ge=1)
    """words of each corpus text used as its prompt"""
    template: str = "{prompt}"
    """how each prompt is put to the policy; {prompt} is replaced, e.g. "Write a tweet that starts with: {prompt}" """
    max_eval: int = setting(64, ge=1)
    """held-out prompts used for evaluation"""


def first_words(texts: list[str], words: int) -> list[str]:
    """The first `words` words of each text (deduplicated, order kept)."""
    prompts = [detokenize(tokenize(t)[:words]) for t in texts]
    return list(dict.fromkeys(p for p in prompts if p))


def read_prompts(path: str, flag: str = "--prompts.file") -> list[str]:
    """The prompts of a .jsonl file or an `hf:` dataset, conversations as HH text; a bad row stops with
    `file:line: problem`. `flag` is the option that gave the source, for the offline error's advice."""
    if hub.is_hub(path):
        rows = hub.load_rows(path, flag)
    elif not Path(path).is_file():
        raise DataError(f"prompt file {path} does not exist; give a .jsonl file with one {{\"prompt\": ...}} per line "
                        "or hf:DATASET[:split]")
    else:
        rows = jsonl_objects(Path(path), (), "a \"prompt\" (string, HH text or messages), \"text\" or \"messages\"")
    return [_prompt(obj, where) for where, obj in rows]


def _prompt(obj: dict, where: str) -> str:
    if "prompt" in obj or "messages" in obj:
        return prompt_of(obj, where)
    if "text" in obj:  # plain text datasets, and hub prompt sets with a text column
        return prompt_of({"prompt": obj["text"]}, where)
    raise DataError(f"{where}: missing field 'prompt'; each line needs a \"prompt\" (or \"text\") or a \"messages\" "
                    "list")


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
        held = read_prompts(cfg.eval_file, "--prompts.eval_file")
    if not train or not held:
        raise DataError(f"{'training' if not train else 'held-out'} prompts are empty; give more prompts")
    fill = lambda ps: [cfg.template.replace("{prompt}", p) for p in ps]  # noqa: E731
    return fill(train), fill(held[: cfg.max_eval])
