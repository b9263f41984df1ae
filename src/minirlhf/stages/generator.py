"""Stage 3: a word-level LSTM language model trained from scratch on the corpus texts.

The best model by validation perplexity is the run's policy folder (model.safetensors, vocab.json, checkpoint.json
at the top of the run directory, as `--policy RUN` reads it). The lifecycle is the shared runner's: `GeneratorJob`.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from minirlhf import runner
from minirlhf.checkpoint import atomic_write_text
from minirlhf.config import DataConfig, OptimConfig, TrainingRunConfig, setting
from minirlhf.data.sentiment import load_splits
from minirlhf.data.vocab import Vocab
from minirlhf.models.lstm import LSTMConfig, LSTMLanguageModel, lm_loss, load_generator, save_generator
from minirlhf.models.policy import LSTMPolicy, SamplingConfig, sample_with
from minirlhf.report import md_cell, plot_links, section, table, write_report
from minirlhf.training import EpochPlan, length_grouped, length_sorted_batches, make_optimizer, optimizer_step

__all__ = ["GeneratorConfig", "train", "load_generator", "generate_texts", "perplexity", "unigram_perplexity"]


@dataclass
class VocabConfig:
    min_freq: int = setting(2, ge=1)
    """keep words seen at least this many times in the training texts"""
    max_size: int = setting(6000, ge=5)
    """at most this many entries, the four specials included"""


@dataclass
class GeneratorTrainConfig(OptimConfig):
    epochs: int = 2
    batch_size: int = 64
    lr: float = 3e-3
    warmup_ratio: float = 0.05
    log_every: int = 50
    max_tokens: int = setting(40, ge=2)
    """words per text used for training (longer texts are cut)"""


@dataclass
class SampleConfig(SamplingConfig):
    """The samples written to samples.md at the end, seeded by the run's seed."""

    max_new_tokens: int = 30
    """words per sample at most"""
    top_p: float = 0.9
    """nucleus sampling: the smallest set of words reaching this probability (1: all)"""
    prompts: list[str] = field(default_factory=lambda: ["i think", "this is", "i love", "driverless cars"])
    """prompts whose continuations are written to samples.md at the end"""
    n: int = setting(3, ge=1)
    """samples per prompt"""


@dataclass
class GeneratorConfig(TrainingRunConfig):
    data: DataConfig = setting(default_factory=DataConfig, fixed_on_resume=True)
    vocab: VocabConfig = setting(default_factory=VocabConfig, fixed_on_resume=True)
    model: LSTMConfig = setting(default_factory=LSTMConfig, fixed_on_resume=True)
    train: GeneratorTrainConfig = field(default_factory=GeneratorTrainConfig)
    samples: SampleConfig = field(default_factory=SampleConfig)


def _batch(seqs: list[list[int]], idx: list[int], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher forcing: inputs (B, T-1) are the tokens, targets (B, T-1) the next tokens (pad: ignored)."""
    T = max(len(seqs[i]) for i in idx)
    ids = torch.full((len(idx), T), pad_id, dtype=torch.long)  # (B, T)
    for row, i in enumerate(idx):
        ids[row, : len(seqs[i])] = torch.tensor(seqs[i])
    ids = ids.to(device)
    return ids[:, :-1], ids[:, 1:]


@torch.no_grad()
def perplexity(model: LSTMLanguageModel, seqs: list[list[int]], pad_id: int, device, batch_size: int = 256) -> float:
    """exp(mean negative log-likelihood per predicted token, <eos> included)."""
    model.eval()
    nll, count = 0.0, 0
    for idx in length_sorted_batches([len(s) for s in seqs], batch_size):
        inputs, targets = _batch(seqs, idx, pad_id, device)
        logits, _, _ = model(inputs)
        nll += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=pad_id, reduction="sum").item()
        count += (targets != pad_id).sum().item()
    return math.exp(nll / max(count, 1))


def unigram_perplexity(train: list[list[int]], val: list[list[int]], vocab: Vocab) -> float:
    """Perplexity on `val` of add-one-smoothed word frequencies from `train` (same vocabulary, same targets)."""
    counts = Counter(t for s in train for t in s[1:])
    support = len(vocab) - 2  # <pad> and <bos> are never predicted
    total = sum(counts.values()) + support
    targets = [t for s in val for t in s[1:]]
    nll = -sum(math.log((counts[t] + 1) / total) for t in targets)
    return math.exp(nll / max(len(targets), 1))


def generate_texts(model, vocab: Vocab, prompts: list[str], n: int, sampling: SamplingConfig,
                   seed: int | None = None) -> list[tuple[str, str]]:
    """n samples per prompt as (prompt, continuation) pairs, batched, through the policies' one sampling path."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    repeated = [p for p in prompts for _ in range(n)]
    texts = sample_with(LSTMPolicy(model, vocab, value_head=False), repeated, sampling, gen).texts
    return list(zip(repeated, texts))


def _write_samples(path: Path, rows: list[tuple[str, str]]) -> None:
    atomic_write_text(path, "\n".join(table(["prompt", "continuation"], [[p, c.replace("|", "/")] for p, c in rows]))
                      + "\n")


class GeneratorJob(runner.ModelJob):
    """Train with teacher forcing, keep the best model by validation perplexity, write samples."""

    stage, name, base, kept = "generator", "generator", None, ("best", "recent")
    progress_keys = {"loss": "train/loss"}

    def __init__(self, cfg: GeneratorConfig):
        self.cfg, self.best, self.recent, self.t0 = cfg, math.inf, [], time.time()

    def setup(self, run: runner.Run) -> None:
        cfg, self.run = self.cfg, run
        splits = load_splits(cfg.data)
        run.say(splits.summary())
        self.vocab = Vocab.build([t for t, _ in splits.train], cfg.vocab.min_freq, cfg.vocab.max_size)
        cut = cfg.train.max_tokens + 1
        self.seqs = {k: [self.vocab.encode(t)[:cut] for t, _ in rows] for k, rows in (("train", splits.train),
                                                                                    ("val", splits.val))}
        self.model = LSTMLanguageModel(cfg.model, len(self.vocab)).to(run.device)
        self.unigram = unigram_perplexity(self.seqs["train"], self.seqs["val"], self.vocab)
        run.say(f"vocabulary {len(self.vocab)} words; LSTM {self.model.num_params():,} parameters; unigram val "
                f"perplexity {self.unigram:.1f}")
        self.plan = EpochPlan(length_grouped([len(s) for s in self.seqs["train"]], cfg.train.batch_size),
                              cfg.train.epochs, cfg.seed)
        self.steps = self.plan.steps
        self.optimizer, self.scheduler = make_optimizer(list(self.model.parameters()), cfg.train, self.steps)

    def step(self, step: int) -> dict | None:
        cfg, pad_id = self.cfg, self.vocab.pad_id
        epoch, idx, last = self.plan.at(step)
        self.model.train()
        inputs, targets = _batch(self.seqs["train"], idx, pad_id, self.run.device)
        loss = lm_loss(self.model(inputs)[0], targets, pad_id)
        grad_norm = optimizer_step(loss, list(self.model.parameters()), self.optimizer, self.scheduler,
                                   cfg.train.max_grad_norm)
        self.recent.append(loss.item())
        row = {}
        if step % cfg.train.log_every == 0:  # the mean since the last log: a readable curve
            mean_loss, self.recent = sum(self.recent) / len(self.recent), []
            row = {"train/loss": mean_loss, "train/perplexity": math.exp(mean_loss), "train/grad_norm": grad_norm}
        return row | self._end_of_epoch(step, epoch) if last else row

    def _end_of_epoch(self, step: int, epoch: int) -> dict:
        val_ppl = perplexity(self.model, self.seqs["val"], self.vocab.pad_id, self.run.device)
        self.run.say(f"epoch {epoch}: val perplexity {val_ppl:.1f} (unigram {self.unigram:.1f})")
        if val_ppl < self.best and self.run.main:
            self.best = val_ppl
            save_generator(self.run.dir.path, self.model, self.vocab, step, {"epoch": epoch, "val_perplexity": val_ppl})
        return {"epoch": epoch, "val/perplexity": val_ppl, "val/unigram_perplexity": self.unigram}

    def finish(self, run: runner.Run) -> dict:
        """The best model's samples; plots and results."""
        s, train_s = self.cfg.samples, time.time() - self.t0
        model, vocab = load_generator(run.dir.path, run.device)
        self.rows = generate_texts(model, vocab, s.prompts, s.n, s, seed=self.cfg.seed)
        _write_samples(run.dir.samples, self.rows)
        run.metrics.plot(run.dir.plot("loss"), ["train/loss"], "generator training loss")
        run.metrics.plot(run.dir.plot("perplexity"), ["val/perplexity", "val/unigram_perplexity"],
                         "validation perplexity")
        return {"val_perplexity": self.best, "unigram_perplexity": self.unigram,
                "ratio_to_unigram": self.best / self.unigram, "params": model.num_params(),
                "vocab_size": len(vocab), "train_seconds": round(train_s, 1)}

    def report(self, run: runner.Run, results: dict) -> None:
        write_report(run.dir, f"Generator run `{run.dir}`",
                     f"An LSTM of {results['params']:,} parameters over {results['vocab_size']:,} words of "
                     f"`{self.cfg.data.source}`, trained with teacher forcing; the best epoch kept.",
                     table(["validation perplexity", "unigram model's", "ratio"],
                           [[f"{self.best:.1f}", f"{self.unigram:.1f}", f"{results['ratio_to_unigram']:.2f}"]]),
                     plot_links(run.dir, ("loss", "perplexity")),
                     section("Samples", table(["prompt", "continuation"],
                                              [[md_cell(p), md_cell(c)] for p, c in self.rows])))
        run.say(f"best val perplexity {self.best:.1f} = {self.best / self.unigram:.2f} x unigram ({self.unigram:.1f}); "
                f"{results['train_seconds']:.0f}s")
        for p, c in self.rows[:: self.cfg.samples.n]:
            run.say(f"  {p} ... {c}")


def train(cfg: GeneratorConfig, resume: str | Path | None = None, overwrite: bool = False) -> Path:
    """Train the LSTM; returns the run directory."""
    return runner.run(GeneratorJob(cfg), cfg, resume, overwrite)
