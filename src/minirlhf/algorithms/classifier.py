"""Stage 1: fine-tune a pretrained encoder as a sentiment classifier (the reward model of RLHF)."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from minirlhf.checkpoint import atomic_dir, save_json
from minirlhf.config import DataConfig, OptimConfig, RunConfig, save_config
from minirlhf.data.sentiment import load_splits
from minirlhf.metrics import MetricsWriter
from minirlhf.models.classifier import DEFAULT_ENCODER, Truncator, freeze_lower, load_pretrained
from minirlhf.models.trunk import FrozenCache, cached_forward
from minirlhf.runtime import make_run_dir, peak_memory_mb, pick_device, seed_everything
from minirlhf.training import length_grouped_batches, length_sorted_batches, make_optimizer, optimizer_step, progress


@dataclass
class ClassifierModelConfig:
    name: str = DEFAULT_ENCODER
    """transformers encoder: hub name or local folder (`minilm`: the offline all-MiniLM-L6-v2)"""
    freeze_layers: int = 4
    """freeze the embeddings and this many lowest layers"""
    cache_frozen: bool = True
    """compute the frozen layers' output once and train only the upper layers on it"""
    max_length: int = 128
    """tokens per text, special tokens included"""
    truncation: str = "head_tail"
    """what to keep of a longer text: `head` (the start), `tail` (the end) or `head_tail` (first quarter + end)"""

    checks = {"freeze_layers": ">= 0", "max_length": "[8, 8192]", "truncation": "{head,head_tail,tail}"}


@dataclass
class ClassifierTrainConfig(OptimConfig):
    epochs: int = 3
    lr: float = 1e-4
    eval_batch_size: int = 64
    """texts per forward pass when evaluating and caching"""

    checks = {**OptimConfig.checks, "eval_batch_size": ">= 1"}


@dataclass
class ClassifierConfig(RunConfig):
    data: DataConfig = field(default_factory=DataConfig)
    model: ClassifierModelConfig = field(default_factory=ClassifierModelConfig)
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


@torch.inference_mode()
def _evaluate(model, seqs, labels, cache, n, pad_id, batch_size, device) -> dict[str, float]:
    model.eval()
    logits = torch.empty(len(seqs), 2)
    for idx in length_sorted_batches([len(s) for s in seqs], batch_size):
        logits[idx] = cached_forward(model, idx, seqs, cache, n, pad_id, device).float().cpu()
    return binary_scores(logits, torch.tensor(labels))


def train(cfg: ClassifierConfig) -> Path:
    """Fine-tune, keep the best model by validation accuracy, report test accuracy and F1."""
    t0 = time.time()
    run_dir = make_run_dir(cfg.out, "classifier")
    save_config(cfg, run_dir / "config.yaml")
    seed_everything(cfg.seed)
    device, why = pick_device(cfg.device)
    print(f"device: {device} ({why})")

    splits = load_splits(cfg.data)
    print(splits.summary())
    model, tokenizer = load_pretrained(cfg.model.name)
    model.to(device)
    n = cfg.model.freeze_layers
    trainable = freeze_lower(model, n)
    total = sum(p.numel() for p in model.parameters())
    print(f"encoder {cfg.model.name}: embeddings and lowest {n} layers frozen; "
          f"trainable parameters {trainable:,} of {total:,} ({100 * trainable / total:.1f}%)")

    truncate = Truncator(tokenizer, cfg.model.max_length, cfg.model.truncation)
    pad_id = tokenizer.pad_token_id or 0
    seqs = {name: truncate([t for t, _ in rows]) for name, rows in
            (("train", splits.train), ("val", splits.val), ("test", splits.test))}
    labels = {name: [y for _, y in rows] for name, rows in
              (("train", splits.train), ("val", splits.val), ("test", splits.test))}
    use_cache = cfg.model.cache_frozen and n > 0
    t_cache = time.time()
    cache = {k: FrozenCache(model, seqs[k], pad_id, n, cfg.train.eval_batch_size, device) if use_cache else None
             for k in ("train", "val")}
    cache_seconds = time.time() - t_cache

    params = [p for p in model.parameters() if p.requires_grad]
    steps_per_epoch = -(-len(seqs["train"]) // cfg.train.batch_size)
    optimizer, scheduler = make_optimizer(params, cfg.train, cfg.train.epochs * steps_per_epoch)
    rng = random.Random(cfg.seed)
    metrics = MetricsWriter(run_dir)
    train_y = torch.tensor(labels["train"])
    best, step, recent = -1.0, 0, []
    for epoch in range(1, cfg.train.epochs + 1):
        t_epoch = time.time()
        model.train()
        bar = progress(length_grouped_batches([len(s) for s in seqs["train"]], cfg.train.batch_size, rng),
                   desc=f"epoch {epoch}/{cfg.train.epochs}", unit="batch")
        for idx in bar:
            logits = cached_forward(model, idx, seqs["train"], cache["train"], n, pad_id, device)
            loss = F.cross_entropy(logits, train_y[idx].to(device))
            grad_norm = optimizer_step(loss, params, optimizer, scheduler, cfg.train.max_grad_norm)
            step += 1
            recent.append(loss.item())
            bar.set_postfix(loss=f"{recent[-1]:.3f}", refresh=False)
            if step % cfg.train.log_every == 0:
                mean_loss, recent = sum(recent) / len(recent), []  # mean since the last log: a readable curve
                metrics.log(step, **{"train/loss": mean_loss, "train/grad_norm": grad_norm,
                                     "train/lr": scheduler.get_last_lr()[0]})
        val = _evaluate(model, seqs["val"], labels["val"], cache["val"], n, pad_id, cfg.train.eval_batch_size, device)
        metrics.log(step, epoch=epoch, **{f"val/{k}": v for k, v in val.items()}, **{"time/epoch_s": time.time() - t_epoch})
        print(f"epoch {epoch}: val accuracy {val['accuracy']:.4f}  F1 {val['f1']:.4f}  loss {val['loss']:.4f}")
        if val["accuracy"] > best:
            best = val["accuracy"]
            with atomic_dir(run_dir / "model") as tmp:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
    train_seconds = time.time() - t0
    del cache

    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "model").to(device)  # the best epoch
    test = _evaluate(model, seqs["test"], labels["test"], None, 0, pad_id, cfg.train.eval_batch_size, device) if seqs["test"] else {}
    metrics.log(step, **{f"test/{k}": v for k, v in test.items()})
    metrics.close()
    metrics.plot(run_dir / "loss.png", ["train/loss", "val/loss"], "classifier loss")
    metrics.plot(run_dir / "accuracy.png", ["val/accuracy", "val/f1"], "classifier validation accuracy")
    results = {"train_examples": len(seqs["train"]), "test_examples": len(seqs["test"]), "best_val_accuracy": best, **{f"test_{k}": v for k, v in test.items()},
               "trainable_params": trainable, "total_params": total, "cache_seconds": round(cache_seconds, 1), "train_seconds": round(train_seconds, 1),
               "total_seconds": round(time.time() - t0, 1), "peak_memory_mb": round(peak_memory_mb())}
    save_json(results, run_dir / "results.json")
    print(f"test accuracy {test.get('accuracy', float('nan')):.4f}  F1 {test.get('f1', float('nan')):.4f}  "
          f"({results['total_seconds']:.0f}s, peak memory {results['peak_memory_mb']} MB)")
    return run_dir
