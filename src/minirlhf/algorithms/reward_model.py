"""A reward model from human preferences: the Bradley–Terry loss on (prompt, chosen, rejected) pairs.

`minirlhf train-reward-model --preferences FILE.jsonl` fine-tunes a pretrained model with a scalar head (default
the offline MiniLM encoder, lower layers frozen and their outputs cached) so that the chosen response of each pair
scores higher; `minirlhf eval-reward-model RUN_DIR --preferences FILE.jsonl` prints held-out pair accuracy, mean
margin and the length-only baseline. The run is then the `reward_model` term of RLHF (rewards.py).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from minirlhf import UserError
from minirlhf.checkpoint import atomic_dir, save_json
from minirlhf.config import OptimConfig, RunConfig, save_config
from minirlhf.data.dialogue import dialogue_text
from minirlhf.data.preferences import Pair, length_baseline, load_split, read_pairs
from minirlhf.metrics import MetricsWriter
from minirlhf.models.classifier import DEFAULT_ENCODER, Truncator, freeze_lower
from minirlhf.models.reward_model import RewardModel, load_scalar_model
from minirlhf.models.trunk import FrozenCache, cached_forward, split_works
from minirlhf.runtime import make_run_dir, peak_memory_mb, pick_device, seed_everything
from minirlhf.training import length_sorted_batches, make_optimizer, optimizer_step, progress


@dataclass
class RewardModelModelConfig:
    name: str = DEFAULT_ENCODER
    """pretrained model given a scalar head: an encoder or a causal LM, by hub name or folder (`minilm`: the offline
    all-MiniLM-L6-v2; `smollm2`: the offline SmolLM2-135M-Instruct)"""
    freeze_layers: int = 4
    """freeze the embeddings and this many lowest layers"""
    cache_frozen: bool = True
    """compute the frozen layers' output once and train only the upper layers on it (encoders)"""
    max_length: int = 192
    """tokens per dialogue, special tokens included; a longer one keeps its end, where the judged reply is"""
    pooling: str = "auto"
    """what the scalar head reads: `mean` of all token states, `reply_mean` of the reply's (after the last
    "Assistant:"), `last` token (causal LMs); auto: mean for encoders, last for causal LMs"""

    checks = {"freeze_layers": ">= 0", "max_length": "[8, 8192]", "pooling": "{auto,mean,reply_mean,last}"}


@dataclass
class RewardModelTrainConfig(OptimConfig):
    epochs: int = 2
    batch_size: int = 16
    """pairs per optimizer step"""
    lr: float = 1e-4
    eval_batch_size: int = 64
    """texts per forward pass when evaluating and caching"""

    checks = {**OptimConfig.checks, "eval_batch_size": ">= 1"}


@dataclass
class RewardModelConfig(RunConfig):
    preferences: str = ""
    """preference pairs, .jsonl of {"prompt", "chosen", "rejected"} (e.g. from `minirlhf feedback export`)"""
    eval_file: str | None = None
    """held-out pairs (.jsonl); default: hold out `eval_fraction` of the prompts of `preferences`"""
    eval_fraction: float = 0.1
    """share of the prompts whose pairs are held out"""
    max_train: int | None = None
    """use at most this many training pairs (None: all)"""
    max_eval: int | None = None
    """use at most this many held-out pairs (None: all)"""
    split_seed: int = 0
    """seed of the shuffle that splits the pairs by prompt"""
    model: RewardModelModelConfig = field(default_factory=RewardModelModelConfig)
    train: RewardModelTrainConfig = field(default_factory=RewardModelTrainConfig)

    checks = {**RunConfig.checks, "eval_fraction": "(0, 0.5]", "max_train": ">= 1", "max_eval": ">= 1"}


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Per-pair loss (B,) of chosen_rewards (B,) and rejected_rewards (B,): -log sigmoid(r_chosen - r_rejected),
    the negative log-likelihood of the preference under the Bradley–Terry model (Bradley & Terry, 1952;
    Ouyang et al., 2022, eq. 1)."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards)


def pair_scores(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """Accuracy (chosen scores higher), mean margin and mean loss of rewards (N,) and (N,)."""
    return {"accuracy": (chosen > rejected).float().mean().item(), "margin": (chosen - rejected).mean().item(),
            "loss": bradley_terry_loss(chosen, rejected).mean().item()}


class PairTexts:
    """The 2N token sequences of N pairs (chosen i at i, rejected i at N + i) and, optionally, their frozen layers."""

    def __init__(self, pairs: list[Pair], truncate: Truncator):
        self.n = len(pairs)
        self.seqs = truncate([dialogue_text(p.prompt, p.chosen) for p in pairs]
                             + [dialogue_text(p.prompt, p.rejected) for p in pairs])
        self.cache: FrozenCache | None = None

    def rewards(self, model, idx: list[int], n_frozen: int, pad_id: int, device) -> torch.Tensor:
        """Scalar rewards (len(idx),) of sequences idx."""
        return cached_forward(model, idx, self.seqs, self.cache, n_frozen, pad_id, device)[:, 0]


@torch.inference_mode()
def all_rewards(model, texts: PairTexts, n_frozen: int, pad_id: int, batch_size: int, device) -> torch.Tensor:
    model.eval()
    out = torch.empty(len(texts.seqs))
    for idx in length_sorted_batches([len(s) for s in texts.seqs], batch_size):
        out[idx] = texts.rewards(model, idx, n_frozen, pad_id, device).float().cpu()
    return out


def evaluate(model, texts: PairTexts, n_frozen, pad_id, batch_size, device) -> tuple[dict, torch.Tensor]:
    r = all_rewards(model, texts, n_frozen, pad_id, batch_size, device)
    return pair_scores(r[: texts.n], r[texts.n:]), r


def _load_split(cfg: RewardModelConfig) -> tuple[list[Pair], list[Pair]]:
    if not cfg.preferences:
        raise UserError("the reward model needs preference pairs: pass --preferences FILE.jsonl")
    return load_split(cfg)


def _epoch(cfg, model, params, optimizer, scheduler, texts, n, pad_id, device, rng, metrics, step, epoch) -> int:
    model.train()
    order = list(range(texts.n))
    rng.shuffle(order)
    batches = [order[i: i + cfg.train.batch_size] for i in range(0, len(order), cfg.train.batch_size)]
    bar = progress(batches, desc=f"epoch {epoch}/{cfg.train.epochs}", unit="batch")
    recent: list[tuple[float, float]] = []
    for idx in bar:
        r = texts.rewards(model, idx + [texts.n + i for i in idx], n, pad_id, device)  # (2B,) chosen then rejected
        chosen, rejected = r[: len(idx)], r[len(idx):]
        loss = bradley_terry_loss(chosen, rejected).mean()
        grad_norm = optimizer_step(loss, params, optimizer, scheduler, cfg.train.max_grad_norm)
        step += 1
        recent.append((loss.item(), (chosen > rejected).float().mean().item()))
        bar.set_postfix(loss=f"{recent[-1][0]:.3f}", refresh=False)
        if step % cfg.train.log_every == 0:
            losses, accs = zip(*recent)
            recent = []
            metrics.log(step, **{"train/loss": sum(losses) / len(losses), "train/accuracy": sum(accs) / len(accs),
                                 "train/grad_norm": grad_norm, "train/lr": scheduler.get_last_lr()[0]})
    return step


def train(cfg: RewardModelConfig) -> Path:
    """Fit the reward model; report held-out accuracy and margin against the length-only baseline."""
    t0 = time.time()
    run_dir = make_run_dir(cfg.out, "reward-model")
    save_config(cfg, run_dir / "config.yaml")
    seed_everything(cfg.seed)
    device, why = pick_device(cfg.device)
    train_pairs, eval_pairs = _load_split(cfg)
    print(f"device: {device} ({why}); {len(train_pairs)} training pairs, {len(eval_pairs)} held-out pairs")
    model, tokenizer = load_scalar_model(cfg.model.name, cfg.model.pooling)
    model.to(device)
    n = cfg.model.freeze_layers
    trainable, total = freeze_lower(model, n), sum(p.numel() for p in model.parameters())
    print(f"reward model {cfg.model.name}: lowest {n} layers frozen; trainable parameters {trainable:,} of {total:,}")
    truncate, pad_id = Truncator(tokenizer, cfg.model.max_length, "tail"), tokenizer.pad_token_id
    texts = {"train": PairTexts(train_pairs, truncate), "eval": PairTexts(eval_pairs, truncate)}
    if cfg.model.cache_frozen and n > 0 and split_works(model, texts["eval"].seqs, n, pad_id, device):
        for part in texts.values():
            part.cache = FrozenCache(model, part.seqs, pad_id, n, cfg.train.eval_batch_size, device)
    else:
        n = 0  # the whole model runs (its frozen layers only skip gradients)

    params = [p for p in model.parameters() if p.requires_grad]
    steps_per_epoch = -(-texts["train"].n // cfg.train.batch_size)
    optimizer, scheduler = make_optimizer(params, cfg.train, cfg.train.epochs * steps_per_epoch)
    metrics, rng, step = MetricsWriter(run_dir), random.Random(cfg.seed), 0
    first, _ = evaluate(model, texts["eval"], n, pad_id, cfg.train.eval_batch_size, device)
    metrics.log(0, **{f"eval/{k}": v for k, v in first.items()})
    for epoch in range(1, cfg.train.epochs + 1):
        step = _epoch(cfg, model, params, optimizer, scheduler, texts["train"], n, pad_id, device, rng, metrics,
                      step, epoch)
        held, _ = evaluate(model, texts["eval"], n, pad_id, cfg.train.eval_batch_size, device)
        metrics.log(step, epoch=epoch, **{f"eval/{k}": v for k, v in held.items()})
        print(f"epoch {epoch}: held-out accuracy {held['accuracy']:.4f}  margin {held['margin']:.3f}  "
              f"loss {held['loss']:.4f}")
    _, train_r = evaluate(model, texts["train"], n, pad_id, cfg.train.eval_batch_size, device)
    with atomic_dir(run_dir / "model") as tmp:
        model.save(tmp, tokenizer, {"base": cfg.model.name, "max_length": cfg.model.max_length,
                                    "mean": train_r.mean().item(), "std": max(train_r.std().item(), 1e-6)})
    metrics.close()
    metrics.plot(run_dir / "loss.png", ["train/loss", "eval/loss"], "Bradley-Terry loss")
    metrics.plot(run_dir / "accuracy.png", ["train/accuracy", "eval/accuracy"], "pair accuracy (chosen scores higher)")
    results = {"train_pairs": texts["train"].n, "eval_pairs": texts["eval"].n, **{f"eval_{k}": v for k, v in held.items()},
               "eval_accuracy_step0": first["accuracy"], "length_baseline": length_baseline(eval_pairs),
               "trainable_params": trainable, "total_params": total, "total_seconds": round(time.time() - t0, 1),
               "peak_memory_mb": round(peak_memory_mb())}
    save_json(results, run_dir / "results.json")
    print(f"held-out accuracy {held['accuracy']:.4f} (longer-response baseline {results['length_baseline']:.4f}), "
          f"margin {held['margin']:.3f}  ({results['total_seconds']:.0f}s, peak memory {results['peak_memory_mb']} MB)")
    return run_dir


def evaluate_run(run_dir: str, preferences: str, device_name: str = "auto", batch_size: int = 32) -> dict:
    """`minirlhf eval-reward-model`: accuracy, mean margin and the length baseline of a run on a pair file."""
    device, _ = pick_device(device_name)
    pairs = read_pairs(preferences)
    rm = RewardModel.from_run(run_dir, device)
    chosen = rm.score([dialogue_text(p.prompt, p.chosen) for p in pairs], batch_size)
    rejected = rm.score([dialogue_text(p.prompt, p.rejected) for p in pairs], batch_size)
    out = {"preferences": preferences, "pairs": len(pairs), **pair_scores(chosen, rejected),
           "length_baseline": length_baseline(pairs)}
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}))
    return out
