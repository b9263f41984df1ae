"""Stage 3: a word-level LSTM language model trained from scratch on the corpus texts."""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from minirlhf import UserError
from minirlhf.checkpoint import atomic_write_text, load_json, load_weights, save_json, save_weights
from minirlhf.config import DataConfig, OptimConfig, RunConfig, save_config
from minirlhf.data.sentiment import load_splits
from minirlhf.data.vocab import Vocab
from minirlhf.metrics import MetricsWriter
from minirlhf.models.lstm import LSTMConfig, LSTMLanguageModel, lm_loss, sample
from minirlhf.runtime import make_run_dir, peak_memory_mb, pick_device, seed_everything
from minirlhf.training import length_grouped_batches, length_sorted_batches, make_optimizer, optimizer_step, progress


@dataclass
class VocabConfig:
    min_freq: int = 2
    """keep words seen at least this many times in the training texts"""
    max_size: int = 6000
    """at most this many entries, the four specials included"""

    checks = {"min_freq": ">= 1", "max_size": ">= 5"}


@dataclass
class GeneratorTrainConfig(OptimConfig):
    epochs: int = 2
    batch_size: int = 64
    lr: float = 3e-3
    warmup_ratio: float = 0.05
    log_every: int = 50
    max_tokens: int = 40
    """words per text used for training (longer texts are cut)"""

    checks = {**OptimConfig.checks, "max_tokens": ">= 2"}


@dataclass
class SampleConfig:
    prompts: list[str] = field(default_factory=lambda: ["i think", "this is", "i love", "driverless cars"])
    """prompts whose continuations are written to samples.md at the end"""
    n: int = 3
    """samples per prompt"""
    max_new_tokens: int = 30
    """words per sample at most"""
    temperature: float = 1.0
    """softmax temperature"""
    top_k: int = 0
    """sample from the k most likely words only (0: all)"""
    top_p: float = 0.9
    """nucleus sampling: the smallest set of words reaching this probability (1: all)"""

    checks = {"n": ">= 1", "max_new_tokens": ">= 1", "temperature": "> 0", "top_k": ">= 0", "top_p": "(0, 1]"}


@dataclass
class GeneratorConfig(RunConfig):
    data: DataConfig = field(default_factory=DataConfig)
    vocab: VocabConfig = field(default_factory=VocabConfig)
    model: LSTMConfig = field(default_factory=LSTMConfig)
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


def save_generator(run_dir: Path, model: LSTMLanguageModel, vocab: Vocab, step: int, extra: dict) -> None:
    """The checkpoint: weights (safetensors), vocabulary and model config + step (JSON)."""
    save_weights(model.state_dict(), run_dir / "model.safetensors")
    vocab.save(run_dir / "vocab.json")
    save_json({"model": dataclasses.asdict(model.cfg), "vocab_size": len(vocab), "step": step, **extra},
              run_dir / "checkpoint.json")


def load_generator(run_dir: str | Path, device="cpu") -> tuple[LSTMLanguageModel, Vocab]:
    """The model and vocabulary a `train-generator` run saved."""
    run_dir = Path(run_dir)
    if not (run_dir / "checkpoint.json").is_file():
        raise UserError(f"{run_dir} is not a generator run (no checkpoint.json); run `minirlhf train-generator` first")
    meta = load_json(run_dir / "checkpoint.json")
    vocab = Vocab.load(run_dir / "vocab.json")
    model = LSTMLanguageModel(LSTMConfig(**meta["model"]), meta["vocab_size"])
    state = load_weights(run_dir / "model.safetensors")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{run_dir}/model.safetensors does not match checkpoint.json ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), vocab


def generate_texts(model, vocab: Vocab, prompts: list[str], n: int, max_new_tokens: int, temperature: float = 1.0,
                   top_k: int = 0, top_p: float = 1.0, seed: int | None = None) -> list[tuple[str, str]]:
    """n samples per prompt as (prompt, continuation) pairs, batched."""
    device = next(model.parameters()).device
    encoded = [vocab.encode(p, eos=False) for p in prompts for _ in range(n)]
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    outs = sample(model, encoded, max_new_tokens, vocab.eos_id, banned=[vocab.pad_id, vocab.bos_id],
                  temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
    return [(p, vocab.decode(o)) for p, o in zip([p for p in prompts for _ in range(n)], outs)]


def _write_samples(path: Path, rows: list[tuple[str, str]]) -> None:
    lines = ["| prompt | continuation |", "| --- | --- |"]
    lines += [f"| {p} | {c.replace('|', '/')} |" for p, c in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


def train(cfg: GeneratorConfig) -> Path:
    """Train with teacher forcing, keep the best model by validation perplexity, write samples."""
    t0 = time.time()
    run_dir = make_run_dir(cfg.out, "generator")
    save_config(cfg, run_dir / "config.yaml")
    seed_everything(cfg.seed)
    device, why = pick_device(cfg.device)
    print(f"device: {device} ({why})")
    splits = load_splits(cfg.data)
    print(splits.summary())
    vocab = Vocab.build([t for t, _ in splits.train], cfg.vocab.min_freq, cfg.vocab.max_size)
    cut = cfg.train.max_tokens + 1
    seqs = {k: [vocab.encode(t)[:cut] for t, _ in rows] for k, rows in (("train", splits.train), ("val", splits.val))}
    model = LSTMLanguageModel(cfg.model, len(vocab)).to(device)
    unigram = unigram_perplexity(seqs["train"], seqs["val"], vocab)
    print(f"vocabulary {len(vocab)} words; LSTM {model.num_params():,} parameters; unigram val perplexity {unigram:.1f}")

    params = list(model.parameters())
    optimizer, scheduler = make_optimizer(params, cfg.train, cfg.train.epochs * -(-len(seqs["train"]) // cfg.train.batch_size))
    metrics = MetricsWriter(run_dir)
    rng = random.Random(cfg.seed)
    best, step, recent = math.inf, 0, []
    for epoch in range(1, cfg.train.epochs + 1):
        model.train()
        bar = progress(length_grouped_batches([len(s) for s in seqs["train"]], cfg.train.batch_size, rng),
                       desc=f"epoch {epoch}/{cfg.train.epochs}", unit="batch")
        for idx in bar:
            inputs, targets = _batch(seqs["train"], idx, vocab.pad_id, device)
            logits, _, _ = model(inputs)
            loss = lm_loss(logits, targets, vocab.pad_id)
            grad_norm = optimizer_step(loss, params, optimizer, scheduler, cfg.train.max_grad_norm)
            step += 1
            recent.append(loss.item())
            bar.set_postfix(loss=f"{recent[-1]:.3f}", refresh=False)
            if step % cfg.train.log_every == 0:
                mean_loss, recent = sum(recent) / len(recent), []  # mean since the last log: a readable curve
                metrics.log(step, **{"train/loss": mean_loss, "train/perplexity": math.exp(mean_loss),
                                     "train/grad_norm": grad_norm})
        val_ppl = perplexity(model, seqs["val"], vocab.pad_id, device)
        metrics.log(step, epoch=epoch, **{"val/perplexity": val_ppl, "val/unigram_perplexity": unigram})
        print(f"epoch {epoch}: val perplexity {val_ppl:.1f} (unigram {unigram:.1f})")
        if val_ppl < best:
            best = val_ppl
            save_generator(run_dir, model, vocab, step, {"epoch": epoch, "val_perplexity": val_ppl})
    train_seconds = time.time() - t0

    model, vocab = load_generator(run_dir, device)
    s = cfg.samples
    rows = generate_texts(model, vocab, s.prompts, s.n, s.max_new_tokens, s.temperature, s.top_k, s.top_p, seed=cfg.seed)
    _write_samples(run_dir / "samples.md", rows)
    metrics.close()
    metrics.plot(run_dir / "loss.png", ["train/loss"], "generator training loss")
    metrics.plot(run_dir / "perplexity.png", ["val/perplexity", "val/unigram_perplexity"], "validation perplexity")
    results = {"val_perplexity": best, "unigram_perplexity": unigram, "ratio_to_unigram": best / unigram,
               "params": model.num_params(), "vocab_size": len(vocab), "train_seconds": round(train_seconds, 1),
               "peak_memory_mb": round(peak_memory_mb())}
    save_json(results, run_dir / "results.json")
    print(f"best val perplexity {best:.1f} = {best / unigram:.2f} x unigram ({unigram:.1f}); {train_seconds:.0f}s")
    for p, c in rows[:: s.n]:
        print(f"  {p} ... {c}")
    return run_dir
