"""A reward model from human preferences: the Bradley–Terry loss on (prompt, chosen, rejected) pairs.

`minirlhf train-reward-model --preferences FILE.jsonl` fine-tunes a pretrained model with a scalar head (default
the offline MiniLM encoder, lower layers frozen and their outputs cached) so that the chosen response of each pair
scores higher; `minirlhf eval-reward-model RUN_DIR --preferences FILE.jsonl` prints held-out pair accuracy, mean
margin and the length-only baseline. The run is then the `reward_model` term of RLHF (rewards.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Literal
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from minirlhf import ConfigError, distributed, runner
from minirlhf.checkpoint import atomic_dir, save_json
from minirlhf.config import OptimConfig, PreferenceDataConfig, TrainingRunConfig, setting
from minirlhf.data.dialogue import dialogue_text
from minirlhf.data.preferences import Pair, length_baseline, load_split, read_pairs
from minirlhf.models.classifier import DEFAULT_ENCODER, Truncator, freeze_lower
from minirlhf.models.reward_model import RewardModel, ScalarRewardModel, load_scalar_model, member_folder
from minirlhf.models.trunk import FrozenCache, cached_forward, copy_sharing, find_trunk, split_works
from minirlhf.report import plot_links, table, write_report
from minirlhf.runtime import pick_device
from minirlhf.training import EpochPlan, length_sorted_batches, make_optimizer, optimizer_step, shuffled_batches


@dataclass
class RewardModelModelConfig:
    name: str = DEFAULT_ENCODER
    """pretrained model given a scalar head: an encoder or a causal LM, by hub name or folder (`minilm`: the offline
    all-MiniLM-L6-v2; `smollm2`: the offline SmolLM2-135M-Instruct)"""
    freeze_layers: int = setting(4, ge=0)
    """freeze the embeddings and this many lowest layers"""
    cache_frozen: bool = True
    """compute the frozen layers' output once and train only the upper layers on it (encoders)"""
    max_length: int = setting(192, ge=8, le=8192)
    """tokens per dialogue, special tokens included; a longer one keeps its end, where the judged reply is"""
    pooling: Literal["auto", "mean", "reply_mean", "last"] = "auto"
    """what the scalar head reads: `mean` of all token states, `reply_mean` of the reply's (after the last
    "Assistant:"), `last` token (causal LMs); auto: mean for encoders, last for causal LMs"""
    init: str = ""
    """a reward-model run of the same `name` and pooling to start from, its scalar head included (a warm start:
    `minirlhf loop` retrains each round's reward model from the last round's)"""


@dataclass
class RewardModelTrainConfig(OptimConfig):
    epochs: int = 2
    batch_size: int = 16
    """pairs per optimizer step"""
    lr: float = 1e-4
    eval_batch_size: int = setting(64, ge=1)
    """texts per forward pass when evaluating and caching"""


@dataclass
class RewardModelConfig(PreferenceDataConfig, TrainingRunConfig):
    model: RewardModelModelConfig = setting(default_factory=RewardModelModelConfig, fixed_on_resume=True)
    train: RewardModelTrainConfig = field(default_factory=RewardModelTrainConfig)
    ensemble: int = setting(1, ge=1, le=16, fixed_on_resume=True)
    """members trained together (Coste et al., ICLR 2024): each starts from the same pretrained weights with a head
    of its own seed and, with `bootstrap`, sees each pair a Poisson(1) number of times; the frozen lower layers
    are shared. RL combines them with --reward.ensemble=mean|wco|uwo. One pretrained model is all there is offline,
    so members differ by head seed and data, not by pretraining seed (Eisenstein et al. 2023 found that weaker)"""
    bootstrap: bool = setting(True, fixed_on_resume=True)
    """with an ensemble, weigh each member's pairs by its own Poisson(1) draws (a bootstrap resample)"""


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

    def rewards(self, members: list, idx: list[int], n_frozen: int, pad_id: int, device) -> torch.Tensor:
        """Scalar rewards (K, len(idx)) of sequences idx under each of K members."""
        return torch.stack([cached_forward(m, idx, self.seqs, self.cache, n_frozen, pad_id, device)[:, 0]
                            for m in members])


@torch.inference_mode()
def all_rewards(members: list, texts: PairTexts, n_frozen: int, pad_id: int, batch_size: int, device) -> torch.Tensor:
    """Every member's rewards (K, 2N) of every chosen and rejected text."""
    for m in members:
        m.eval()
    out = torch.empty(len(members), len(texts.seqs))
    for idx in length_sorted_batches([len(s) for s in texts.seqs], batch_size):
        out[:, idx] = texts.rewards(members, idx, n_frozen, pad_id, device).float().cpu()
    return out


def evaluate(members: list, texts: PairTexts, n_frozen, pad_id, batch_size, device) -> tuple[dict, torch.Tensor]:
    """Pair scores of the members' mean reward (of the one model's), and the rewards (K, 2N)."""
    r = all_rewards(members, texts, n_frozen, pad_id, batch_size, device)
    mean = r.mean(0)  # (2N,)
    return pair_scores(mean[: texts.n], mean[texts.n:]), r


class RewardModelJob(runner.ModelJob):
    """Fit the reward model; report held-out accuracy and margin against the length-only baseline."""

    stage, name, kept = "reward_model", "reward-model", ("recent", "first")
    progress_keys = {"loss": "train/loss"}

    def __init__(self, cfg: RewardModelConfig):
        self.cfg, self.base, self.recent, self.t0 = cfg, cfg.model.name, [], time.time()
        self.first = None  # the held-out figures before training (kept by the checkpoint for a resumed run)
        self.held = self.held_rewards = None  # the last evaluation's figures, and its rewards (K, 2N)

    def setup(self, run: runner.Run) -> None:
        cfg, device, self.run = self.cfg, run.device, run
        if not cfg.preferences:
            raise ConfigError("the reward model needs preference pairs: pass --preferences FILE.jsonl")
        self.train_pairs, self.eval_pairs = load_split(cfg)
        run.say(f"{len(self.train_pairs)} training pairs, {len(self.eval_pairs)} held-out pairs")
        first, self.tokenizer = load_scalar_model(cfg.model.name, cfg.model.pooling)
        n = cfg.model.freeze_layers
        self.trainable, self.total = freeze_lower(first, n), sum(p.numel() for p in first.parameters())
        self.members = [first] + [_member(first, n, cfg.seed, k) for k in range(1, cfg.ensemble)]
        self.model = first if cfg.ensemble == 1 else nn.ModuleList(self.members)  # what the checkpoint holds
        if cfg.model.init:
            self._warm_start(cfg.model.init)
        self.model.to(device)
        run.say(f"reward model {cfg.model.name}: lowest {n} layers frozen; trainable parameters {self.trainable:,} "
                f"of {self.total:,}" + (f", in each of {cfg.ensemble} members" if cfg.ensemble > 1 else ""))
        truncate, self.pad_id = Truncator(self.tokenizer, cfg.model.max_length, "tail"), self.tokenizer.pad_token_id
        self.texts = {"train": PairTexts(self.train_pairs, truncate), "eval": PairTexts(self.eval_pairs, truncate)}
        if cfg.model.cache_frozen and n > 0 and split_works(first, self.texts["eval"].seqs, n, self.pad_id, device):
            for part in self.texts.values():  # the members share their frozen layers, so one cache serves all
                part.cache = FrozenCache(first, part.seqs, self.pad_id, n, cfg.train.eval_batch_size, device)
        else:
            n = 0  # the whole model runs (its frozen layers only skip gradients)
        self.n = n
        self.weights = _bootstrap(cfg, self.texts["train"].n)  # (K, N)
        self.plan = EpochPlan(shuffled_batches(self.texts["train"].n, cfg.train.batch_size), cfg.train.epochs, cfg.seed)
        k, last = distributed.world_size(), self.texts["train"].n % cfg.train.batch_size or cfg.train.batch_size
        if min(cfg.train.batch_size, last) < k:
            raise ConfigError(f"with {k} processes every step needs at least {k} pairs; raise train.batch_size (now "
                              f"{cfg.train.batch_size}) or change the number of training pairs ({self.texts['train'].n})")
        self.steps = self.plan.steps
        self.groups = [[p for p in m.parameters() if p.requires_grad] for m in self.members]
        self.params = [p for group in self.groups for p in group]
        self.optimizer, self.scheduler = make_optimizer(self.params, cfg.train, self.steps)

    def _warm_start(self, init: str) -> None:
        """Each member from the init run's (its one model, or its member of the same number)."""
        start = RewardModel.from_run(init)
        if len(start.models) not in (1, len(self.members)):
            raise ConfigError(f"--model.init {init} has {len(start.models)} members and this run {len(self.members)}; "
                              "start from a single reward model or an ensemble of the same size")
        for k, member in enumerate(self.members):
            source = start.models[k % len(start.models)]
            try:
                if source.pooling != member.pooling:
                    raise RuntimeError(f"pooling {source.pooling}, not {member.pooling}")
                member.load_state_dict(source.state_dict())
            except RuntimeError as e:
                raise ConfigError(f"--model.init {init} does not fit --model.name {self.cfg.model.name} "
                                  f"({str(e).splitlines()[0][:100]}); start from a reward model of the same base") from e

    def _evaluate(self, part: str) -> tuple[dict, torch.Tensor]:
        return evaluate(self.members, self.texts[part], self.n, self.pad_id, self.cfg.train.eval_batch_size,
                        self.run.device)

    def begin(self, run: runner.Run) -> dict:
        if self.first is None:
            self.first, _ = self._evaluate("eval")
        return {f"eval/{k}": v for k, v in self.first.items()}

    def step(self, step: int) -> dict | None:
        cfg, texts = self.cfg, self.texts["train"]
        epoch, idx, last = self.plan.at(step)
        for m in self.members:
            m.train()
        mine = idx[distributed.share(len(idx))]  # this process's pairs (all of them in a world of one)
        r = texts.rewards(self.members, mine + [texts.n + i for i in mine], self.n, self.pad_id, self.run.device)
        chosen, rejected = r[:, : len(mine)], r[:, len(mine):]  # (K, b) each
        losses = bradley_terry_loss(chosen, rejected) * self.weights[:, mine]  # (K, b): each member its own resample
        loss = losses.sum() / len(idx)  # this process's share of the batch mean (of each member): they add up to it
        if not distributed.everywhere(bool(torch.isfinite(loss))):
            loss = loss.new_tensor(float("nan"))  # every process stops, with the same message
        grad_norm = optimizer_step(loss, self.params, self.optimizer, self.scheduler, cfg.train.max_grad_norm,
                                   sync=distributed.sum_gradients, groups=self.groups)
        K = len(self.members)
        sums = torch.tensor([losses.sum().item() / K, (chosen > rejected).sum().item() / K], dtype=torch.float64)
        self.recent.append(tuple((distributed.all_sum(sums) / len(idx)).tolist()))
        row = {}
        if step % cfg.train.log_every == 0:
            losses, accs = zip(*self.recent)
            self.recent = []
            row = {"train/loss": sum(losses) / len(losses), "train/accuracy": sum(accs) / len(accs),
                   "train/grad_norm": grad_norm, "train/lr": self.scheduler.get_last_lr()[0]}
            if distributed.world_size() > 1:  # 0 while every process holds the same weights, as it must
                row["dist/param_spread"] = distributed.spread(self.params)
        if last:
            self.held, self.held_rewards = self._evaluate("eval")
            self.run.say(f"epoch {epoch}: held-out accuracy {self.held['accuracy']:.4f}  margin "
                         f"{self.held['margin']:.3f}  loss {self.held['loss']:.4f}")
            row |= {"epoch": epoch, **{f"eval/{k}": v for k, v in self.held.items()}}
        return row

    def finish(self, run: runner.Run) -> dict:
        """model/ (each member with the mean and std of its rewards on the training responses), plots, results."""
        cfg = self.cfg
        if self.held is None:  # a run resumed after its last step
            self.held, self.held_rewards = self._evaluate("eval")
        held = self.held
        _, train_r = self._evaluate("train")  # (K, 2N)
        meta = {"base": cfg.model.name, "max_length": cfg.model.max_length}
        stats = [{"mean": r.mean().item(), "std": max(r.std().item(), 1e-6)} for r in train_r]
        with atomic_dir(run.dir.model) as tmp:
            if len(self.members) == 1:
                self.members[0].save(tmp, self.tokenizer, meta | stats[0])
            else:
                for k, member in enumerate(self.members):
                    member.save(tmp / member_folder(k), self.tokenizer, meta | stats[k])
                save_json(meta | {"members": len(self.members), "bootstrap": cfg.bootstrap, "seed": cfg.seed,
                                  "pooling": self.members[0].pooling}, tmp / "reward_model.json")
        run.metrics.plot(run.dir.plot("loss"), ["train/loss", "eval/loss"], "Bradley-Terry loss")
        run.metrics.plot(run.dir.plot("accuracy"), ["train/accuracy", "eval/accuracy"],
                         "pair accuracy (chosen scores higher)")
        members = {}
        if len(self.members) > 1:  # each member's held-out accuracy, from the rewards the last evaluation gave
            n = self.texts["eval"].n
            members = {"members": len(self.members), "eval_member_accuracy": [
                round(pair_scores(r[:n], r[n:])["accuracy"], 4) for r in self.held_rewards]}
        return {"train_pairs": self.texts["train"].n, "eval_pairs": self.texts["eval"].n,
                **{f"eval_{k}": v for k, v in held.items()}, "eval_accuracy_step0": self.first["accuracy"],
                "length_baseline": length_baseline(self.eval_pairs), "trainable_params": self.trainable,
                "total_params": self.total, **members, "total_seconds": round(time.time() - self.t0, 1)}

    def report(self, run: runner.Run, results: dict) -> None:
        members = results.get("eval_member_accuracy")
        write_report(run.dir, f"Reward model run `{run.dir}`",
                     f"`{self.cfg.model.name}` with a scalar head, Bradley-Terry loss on `{self.cfg.preferences}`: "
                     f"{results['train_pairs']} training and {results['eval_pairs']} held-out pairs.",
                     table(["held-out pairs", "before training", "after"],
                           [["accuracy (chosen scores higher)", f"{results['eval_accuracy_step0']:.4f}",
                             f"{results['eval_accuracy']:.4f}"],
                            ["longer-response-wins baseline", "", f"{results['length_baseline']:.4f}"],
                            ["mean margin (chosen - rejected)", "", f"{results['eval_margin']:.3f}"]]),
                     f"Each member's held-out accuracy: {', '.join(f'{a:.4f}' for a in members)}." if members else "",
                     plot_links(run.dir, ("loss", "accuracy")))
        run.say(f"held-out accuracy {results['eval_accuracy']:.4f} (longer-response baseline "
                f"{results['length_baseline']:.4f}), margin {results['eval_margin']:.3f}  "
                f"({results['total_seconds']:.0f}s, peak memory {results['peak_memory_mb']} MB)")


def _member(first: ScalarRewardModel, n: int, seed: int, k: int) -> ScalarRewardModel:
    """Member k of an ensemble: a copy of the first sharing its frozen layers, with a head of its own seed."""
    member = copy_sharing(first, find_trunk(first).frozen_modules(n) if n > 0 else [])
    g = torch.Generator().manual_seed(seed * 7919 + k)
    nn.init.normal_(member.head.weight, std=1 / (first.config.hidden_size + 1) ** 0.5, generator=g)
    return member


def _bootstrap(cfg: RewardModelConfig, n: int) -> torch.Tensor:
    """Weights (K, n) of each member's pairs: Poisson(1) counts, the bootstrap of a stream (Oza & Russell, 2001),
    for an ensemble with `bootstrap`; else ones."""
    if cfg.ensemble == 1 or not cfg.bootstrap:
        return torch.ones(cfg.ensemble, n)
    g = torch.Generator().manual_seed(cfg.seed * 104729 + 1)
    return torch.poisson(torch.ones(cfg.ensemble, n), generator=g)


def train(cfg: RewardModelConfig, resume: str | Path | None = None, overwrite: bool = False) -> Path:
    """Fit the reward model; returns the run directory."""
    return runner.run(RewardModelJob(cfg), cfg, resume, overwrite)


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
