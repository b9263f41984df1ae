"""Stage 1: fine-tune a pretrained encoder as a sentiment classifier (the reward model of RLHF).

The embeddings and lower layers are frozen; their output is computed once and cached, so each step trains only the
upper layers. Before it starts, a run says how long it will take (from its token counts and one timed batch) and, when
that is over 10 minutes, which flags make it quicker. The lifecycle (checkpoints, --resume, results) is the shared
runner's: `ClassifierJob` is this stage.
"""

from __future__ import annotations

import time
from array import array
from dataclasses import dataclass, field
from typing import Literal
from pathlib import Path

import torch
import torch.nn.functional as F

from minirlhf import runner
from minirlhf.checkpoint import atomic_dir
from minirlhf.config import DataConfig, OptimConfig, TrainingRunConfig, setting
from minirlhf.data.sentiment import load_splits
from minirlhf.models.classifier import DEFAULT_ENCODER, Truncator, freeze_lower, load_pretrained, set_dropout
from minirlhf.models.trunk import FrozenCache, cached_forward, lower_hidden, start_at_layer
from minirlhf.report import plot_links, table, write_report
from minirlhf.runtime import release_freed_memory
from minirlhf.training import EpochPlan, length_grouped, length_sorted_batches, make_optimizer, optimizer_step


@dataclass
class ClassifierModelConfig:
    name: str = DEFAULT_ENCODER
    """transformers encoder: hub name or local folder (`minilm`: the offline all-MiniLM-L6-v2)"""
    freeze_layers: int = setting(4, ge=0)
    """freeze the embeddings and this many lowest layers"""
    cache_frozen: bool = True
    """compute the frozen layers' output once and train only the upper layers on it"""
    max_length: int = setting(128, ge=8, le=8192)
    """tokens per text, special tokens included"""
    truncation: Literal["head", "head_tail", "tail"] = "head_tail"
    """what to keep of a longer text: `head` (the start), `tail` (the end) or `head_tail` (first quarter + end)"""
    dropout: float | None = setting(None, ge=0, lt=1)
    """dropout probability of every dropout layer while training (None: the encoder's own, 0.1 for MiniLM); 0 makes
    a CPU step about twice as fast, as drawing the masks costs about as much as the layers"""


@dataclass
class ClassifierTrainConfig(OptimConfig):
    epochs: int = 3
    lr: float = 1e-4
    eval_batch_size: int = setting(64, ge=1)
    """texts per forward pass when evaluating and caching"""


@dataclass
class ClassifierConfig(TrainingRunConfig):
    data: DataConfig = setting(default_factory=DataConfig, fixed_on_resume=True)
    model: ClassifierModelConfig = setting(default_factory=ClassifierModelConfig, fixed_on_resume=True)
    train: ClassifierTrainConfig = field(default_factory=ClassifierTrainConfig)


def binary_scores(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy, F1 of the positive class and mean cross-entropy. logits (N, 2), labels (N,)."""
    pred = logits.argmax(-1)
    tp = ((pred == 1) & (labels == 1)).sum().item()
    fp = ((pred == 1) & (labels == 0)).sum().item()
    fn = ((pred == 0) & (labels == 1)).sum().item()
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return {"accuracy": (pred == labels).float().mean().item(), "f1": f1,
            "loss": F.cross_entropy(logits, labels).item()}


SLOW_S = 600.0
"""a run estimated to take longer than this (10 minutes) is told, before it starts, how to be quicker"""
QUICK_S = 300.0
"""what the quicker run it is told of aims at (5 minutes)"""


@dataclass
class Estimate:
    """What a run will cost, from the token counts of its splits (as truncated) and the seconds per token of each
    pass it makes, timed on one batch (`time_passes`): linear in tokens, as batches are grouped by length."""

    tokens: dict[str, int]
    """tokens of the train, val and test splits"""
    texts: int
    """training texts"""
    epochs: int
    rates: tuple[float, float, float]
    """seconds per token: the frozen layers' forward (the cache; 0 without one), a training step (forward and
    backward), the whole model's forward (the test set)"""
    cache_bytes: int = 0
    """the frozen layers' output for the train and val splits, fp16"""
    long_texts: bool = False
    """most training texts were cut to max_length"""

    def seconds(self, texts: int | None = None, epochs: int | None = None) -> float:
        """Caching, training (with each epoch's validation pass) and testing, for this many training texts and
        epochs (default: the run's)."""
        lower, step, full = self.rates
        train = self.tokens["train"] * (self.texts if texts is None else texts) / max(self.texts, 1)
        val = self.tokens["val"]
        epochs = epochs or self.epochs
        # the cache, then per epoch a step per batch and a validation forward (about a third of a step), then the test
        return lower * (train + val) + epochs * step * (train + val / 3) + full * self.tokens["test"]

    def quicker(self) -> tuple[int, int] | None:
        """(max_train, epochs) that bring a slow run near QUICK_S; None when the run is not slow."""
        if self.seconds() <= SLOW_S:
            return None
        epochs = min(self.epochs, 2)
        fixed = self.seconds(0, epochs)
        per_text = (self.seconds(self.texts, epochs) - fixed) / max(self.texts, 1)
        texts = int((QUICK_S - fixed) / max(per_text, 1e-12)) // 1000 * 1000
        return max(1000, min(self.texts, texts)), epochs

    def line(self) -> str:
        """One line: the estimate, and for a slow run the flags of a quicker one."""
        mean = self.tokens["train"] / max(self.texts, 1)
        text = (f"estimated time: about {_duration(self.seconds())} ({self.epochs} epoch{'s' * (self.epochs > 1)} of "
                f"{self.texts:,} texts x {mean:.0f} tokens; timed on one batch)")
        if self.cache_bytes:
            text += f", frozen-layer cache {self.cache_bytes / 2 ** 20:,.0f} MB"
        faster = self.quicker()
        if faster is not None:
            texts, epochs = faster
            tested = "; --config configs/imdb_classifier.yaml is a tested setting for long reviews" \
                if self.long_texts else ""
            text += (f"; quicker: --data.max_train={texts} --train.epochs={epochs} (about "
                     f"{_duration(self.seconds(texts, epochs))}{tested})")
        return text


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def time_passes(model, n: int, cached: bool, length: int, device, batch_size: int = 8) -> tuple[float, float, float]:
    """Seconds per token of the frozen layers' forward, a training step and the whole model's forward, each timed
    on a (batch_size, length) batch: on a CPU the rate per token hardly depends on the batch (on a GPU a small batch
    overstates the time), and 8 texts take about a second in all. In eval mode, so that no dropout draws from the
    run's random stream; the gradients are dropped."""
    model.eval()
    token = min(1000, model.config.vocab_size - 1)  # any real token: the time does not depend on which
    ids = torch.full((batch_size, length), token, device=device)  # (B, T)
    mask = torch.ones_like(ids)

    def step() -> None:
        if not cached:
            return model(input_ids=ids, attention_mask=mask).logits.sum().backward()
        with start_at_layer(model, n, lower_hidden(model, ids, mask, n)):
            model(input_ids=ids, attention_mask=mask).logits.sum().backward()

    @torch.inference_mode()
    def forward(lower: bool) -> None:
        lower_hidden(model, ids, mask, n) if lower else model(input_ids=ids, attention_mask=mask)

    def per_token(fn) -> float:
        """The faster of two passes: the first of a shape also allocates and picks its kernels."""
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            if ids.device.type in ("cuda", "mps"):  # an accelerator returns before its kernels finish
                getattr(torch, ids.device.type).synchronize()
            times.append(time.perf_counter() - t0)
        return min(times) / ids.numel()

    rates = (per_token(lambda: forward(True)) if cached else 0.0, per_token(step), per_token(lambda: forward(False)))
    model.zero_grad(set_to_none=True)
    return rates


TRIM_STEPS, TRIM_BATCHES = 5, 40
"""training steps, and evaluation batches (which free less), between two `release_freed_memory` calls: each costs
about 0.2 s, the memory it hands back being faulted in again"""


@torch.inference_mode()
def _evaluate(model, seqs, labels, cache, n, pad_id, batch_size, device) -> dict[str, float]:
    model.eval()
    logits = torch.empty(len(seqs), 2)
    for i, idx in enumerate(length_sorted_batches([len(s) for s in seqs], batch_size), 1):
        logits[idx] = cached_forward(model, idx, seqs, cache, n, pad_id, device).float().cpu()
        if i % TRIM_BATCHES == 0:
            release_freed_memory()
    return binary_scores(logits, torch.tensor(labels))


class ClassifierJob(runner.ModelJob):
    """Fine-tune, keep the best model by validation accuracy (model/), report test accuracy and F1."""

    stage, name, base, kept = "classifier", "classifier", None, ("best", "recent")
    progress_keys = {"loss": "train/loss"}

    def __init__(self, cfg: ClassifierConfig):
        self.cfg, self.best, self.recent, self.t0 = cfg, -1.0, [], time.time()

    def setup(self, run: runner.Run) -> None:
        cfg, device, self.run = self.cfg, run.device, run
        splits = load_splits(cfg.data)
        run.say(splits.summary())
        self.model, self.tokenizer = load_pretrained(cfg.model.name)
        self.model.to(device)
        if cfg.model.dropout is not None:
            set_dropout(self.model, cfg.model.dropout)
        self.n = cfg.model.freeze_layers
        self.trainable, self.total = freeze_lower(self.model, self.n), sum(p.numel() for p in self.model.parameters())
        run.say(f"encoder {cfg.model.name}: embeddings and lowest {self.n} layers frozen; trainable parameters "
                f"{self.trainable:,} of {self.total:,} ({100 * self.trainable / self.total:.1f}%)")
        truncate = Truncator(self.tokenizer, cfg.model.max_length, cfg.model.truncation)
        self.pad_id = self.tokenizer.pad_token_id or 0
        parts = {"train": splits.train, "val": splits.val, "test": splits.test}
        # 4 bytes a token, not a Python int's 36: 20,000 reviews of 256 tokens would otherwise hold 180 MB
        self.seqs = {k: [array("i", ids) for ids in truncate([t for t, _ in rows])] for k, rows in parts.items()}
        self.labels = {k: [y for _, y in rows] for k, rows in parts.items()}
        use_cache = cfg.model.cache_frozen and self.n > 0
        with run.precision.autocast():  # timed at the run's own precision
            self.estimate = self._estimate(use_cache, truncate)
        run.say(self.estimate.line())
        t_cache = time.time()
        self.cache = {k: FrozenCache(self.model, self.seqs[k], self.pad_id, self.n, cfg.train.eval_batch_size, device)
                      if use_cache else None for k in ("train", "val")}
        self.cache_s = time.time() - t_cache
        self.plan = EpochPlan(length_grouped([len(s) for s in self.seqs["train"]], cfg.train.batch_size),
                              cfg.train.epochs, cfg.seed)
        self.steps = self.plan.steps
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = make_optimizer(self.params, cfg.train, self.steps)

    def _estimate(self, cached: bool, truncate: Truncator) -> Estimate:
        """The run's cost before it starts: the texts' token counts and one timed batch of each pass."""
        lengths = {k: [len(s) for s in seqs] for k, seqs in self.seqs.items()}
        train = lengths["train"] or [8]
        rates = time_passes(self.model, self.n, cached, max(8, round(sum(train) / len(train))), self.run.device)
        cached_tokens = sum(lengths["train"]) + sum(lengths["val"]) if cached else 0
        return Estimate({k: sum(v) for k, v in lengths.items()}, len(lengths["train"]), self.cfg.train.epochs, rates,
                        cached_tokens * self.model.config.hidden_size * 2,  # the cache is fp16
                        long_texts=sum(n >= truncate.max_length for n in train) > len(train) / 2)

    def begin(self, run: runner.Run) -> None:
        self.epoch_t0 = time.time()

    def step(self, step: int) -> dict | None:
        cfg, device = self.cfg, self.run.device
        epoch, idx, last = self.plan.at(step)
        self.model.train()
        logits = cached_forward(self.model, idx, self.seqs["train"], self.cache["train"], self.n, self.pad_id, device)
        loss = F.cross_entropy(logits, torch.tensor([self.labels["train"][i] for i in idx], device=device))
        grad_norm = optimizer_step(loss, self.params, self.optimizer, self.scheduler, cfg.train.max_grad_norm)
        if step % TRIM_STEPS == 0:
            release_freed_memory()
        self.recent.append(loss.item())
        row = {}
        if step % cfg.train.log_every == 0:  # the mean since the last log: a readable curve
            row = {"train/loss": sum(self.recent) / len(self.recent), "train/grad_norm": grad_norm,
                   "train/lr": self.scheduler.get_last_lr()[0]}
            self.recent = []
        return row | self._end_of_epoch(epoch) if last else row

    def _end_of_epoch(self, epoch: int) -> dict:
        """Validation figures; the model is kept (model/) when they are the best so far."""
        release_freed_memory()  # the last steps' memory, before the evaluation and the checkpoint
        val = _evaluate(self.model, self.seqs["val"], self.labels["val"], self.cache["val"], self.n, self.pad_id,
                        self.cfg.train.eval_batch_size, self.run.device)
        self.run.say(f"epoch {epoch}: val accuracy {val['accuracy']:.4f}  F1 {val['f1']:.4f}  loss {val['loss']:.4f}")
        if val["accuracy"] > self.best and self.run.main:
            self.best = val["accuracy"]
            with atomic_dir(self.run.dir.model) as tmp:
                self.model.save_pretrained(tmp)
                self.tokenizer.save_pretrained(tmp)
        row = {"epoch": epoch, **{f"val/{k}": v for k, v in val.items()}, "time/epoch_s": time.time() - self.epoch_t0}
        self.epoch_t0 = time.time()
        return row

    def end(self) -> None:
        self.cache = None
        release_freed_memory()  # training's heap, before the test model loads

    def finish(self, run: runner.Run) -> dict:
        """The best epoch's model on the test split; plots and results."""
        from transformers import AutoModelForSequenceClassification  # heavy: only where it is used

        cfg, train_s = self.cfg, time.time() - self.t0
        model = AutoModelForSequenceClassification.from_pretrained(run.dir.model).to(run.device)
        test = _evaluate(model, self.seqs["test"], self.labels["test"], None, 0, self.pad_id, cfg.train.eval_batch_size,
                         run.device) if self.seqs["test"] else {}
        run.metrics.log(self.steps, **{f"test/{k}": v for k, v in test.items()})
        run.metrics.plot(run.dir.plot("loss"), ["train/loss", "val/loss"], "classifier loss")
        run.metrics.plot(run.dir.plot("accuracy"), ["val/accuracy", "val/f1"], "classifier validation accuracy")
        return {"train_examples": len(self.seqs["train"]), "test_examples": len(self.seqs["test"]),
                "best_val_accuracy": self.best, **{f"test_{k}": v for k, v in test.items()},
                "trainable_params": self.trainable, "total_params": self.total, "cache_seconds": round(self.cache_s, 1),
                "train_seconds": round(train_s, 1), "total_seconds": round(time.time() - self.t0, 1),
                "estimated_seconds": round(self.estimate.seconds(), 1)}

    def report(self, run: runner.Run, results: dict) -> None:
        nan, cfg = float("nan"), self.cfg
        write_report(run.dir, f"Classifier run `{run.dir}`",
                     f"Encoder `{cfg.model.name}` on `{cfg.data.source}`: {results['train_examples']} training and "
                     f"{results['test_examples']} test texts; {results['trainable_params']:,} of "
                     f"{results['total_params']:,} parameters trained.",
                     table(["", "value"], [["best validation accuracy", f"{results['best_val_accuracy']:.4f}"],
                                           ["test accuracy", f"{results.get('test_accuracy', nan):.4f}"],
                                           ["test F1", f"{results.get('test_f1', nan):.4f}"],
                                           ["seconds (training)", f"{results['train_seconds']:.0f}"],
                                           ["peak memory, MB", f"{results['peak_memory_mb']}"]]),
                     plot_links(run.dir, ("loss", "accuracy")))
        run.say(f"test accuracy {results.get('test_accuracy', float('nan')):.4f}  F1 "
                f"{results.get('test_f1', float('nan')):.4f}  ({results['total_seconds']:.0f}s, peak memory "
                f"{results['peak_memory_mb']} MB)")


def train(cfg: ClassifierConfig, resume: str | Path | None = None, overwrite: bool = False) -> Path:
    """Fine-tune the classifier; returns the run directory."""
    return runner.run(ClassifierJob(cfg), cfg, resume, overwrite)
