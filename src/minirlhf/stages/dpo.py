"""DPO (Rafailov et al., 2023): learn from preference pairs directly, with no reward model and no sampling.

`minirlhf dpo --policy RUN|smollm2 --preferences FILE.jsonl` raises the policy's log-probability of each chosen
response over the rejected one, measured against the frozen starting policy (the reference): the implicit reward
of a response is beta * (log pi(y|x) - log pi_ref(y|x)). The reference's log-probs of every pair are computed once,
before training. `loss_type=ipo` swaps the logistic loss for IPO's squared one (Azar et al., 2023).

Each optimizer step takes `train.batch_size` pairs; the step batches are drawn once and kept (their order reshuffled
each epoch), so a causal LM's frozen blocks run once per pair (`cache_frozen`). Under torchrun each process takes
its share of every step batch; the per-pair sums are all-reduced and rank 0 writes. The lifecycle (checkpoints,
--resume, results) is the shared runner's: `DPOJob` is what DPO gives it.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from typing import Literal
from pathlib import Path

import torch
import torch.nn.functional as F

from minirlhf import ConfigError, distributed, runner, sharding
from minirlhf.report import md_cell, plot_links, section, table, write_report
from minirlhf.config import MicroBatchOptimConfig, PreferenceDataConfig, TrainingRunConfig, setting
from minirlhf.data.preferences import Pair, length_baseline, load_split
from minirlhf.models.load import PolicyOptions, load_policy, load_reference, record_frozen
from minirlhf.stages.policy_job import PolicyJob
from minirlhf.models.policy import Rollout
from minirlhf.training import EpochPlan, backward, clipped_step, make_optimizer, progress, shuffled_batches


@dataclass
class DPOTrainConfig(MicroBatchOptimConfig):
    steps: int = setting(0, ge=0)
    """optimizer steps (0: `epochs` passes); more than a pass goes round the pairs again"""
    batch_size: int = 16
    """pairs per optimizer step"""
    lr: float = 5e-5


@dataclass
class DPOConfig(PreferenceDataConfig, TrainingRunConfig):
    policy: str = setting("", fixed_on_resume=True)
    """the starting policy, also the reference: an LSTM generator run, an RL or DPO run, a causal LM folder or hub
    name, or `smollm2` (SmolLM2-135M-Instruct, offline)"""
    policy_options: PolicyOptions = setting(default_factory=PolicyOptions, fixed_on_resume=True)
    """how a causal LM policy is set up (with LoRA the reference is the model with its adapters off)"""
    ref_policy: str = setting("", fixed_on_resume=True)
    """the reference, if not the starting policy (`loop` keeps its first policy)"""
    max_eval: int | None = 200
    train: DPOTrainConfig = field(default_factory=DPOTrainConfig)
    """the optimiser and the passes over the pairs"""
    beta: float = setting(0.1, gt=0)
    """strength of the implicit KL constraint: the implicit reward is beta * log(pi / pi_ref)"""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """`sigmoid` (DPO's logistic loss) or `ipo` (IPO's squared loss, which does not push margins to infinity)"""
    label_smoothing: float = setting(0.0, ge=0, lt=0.5)
    """assumed probability that a pair's label is flipped (conservative DPO; sigmoid loss only)"""
    max_prompt_tokens: int = setting(256, ge=1)
    """tokens per prompt (after any chat template); a longer prompt keeps its end"""
    max_response_tokens: int = setting(128, ge=1)
    """tokens per response, end-of-text included; a longer response is cut"""
    cache_frozen: bool = True
    """keep every pair's output of a causal LM's frozen blocks in memory (computed once, with the reference
    log-probs) instead of recomputing it each epoch; memory ~ tokens x hidden size x 4 bytes per pair"""
    eval_every: int = setting(20, ge=0)
    """log the held-out `eval/` metrics every this many steps (0: only before training and at the end)"""
    save_every: int = 100
    samples: int = setting(4, ge=0)
    """held-out prompts that the reference and the trained policy answer in report.md (0: none)"""

    algorithm = "dpo"


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and implicit rewards from summed response log-probs, all (B,).

    h = (log pi(y_w) - log pi(y_l)) - (log ref(y_w) - log ref(y_l)), the chosen response y_w, the rejected y_l.
    sigmoid: -log sigmoid(beta h) (Rafailov et al., 2023, eq. 7); with label smoothing eps (conservative DPO)
             -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).
    ipo:     (h - 1 / (2 beta))^2 (Azar et al., 2023, eq. 17), which pulls h to a finite target.
    Returns (losses, chosen_rewards, rejected_rewards), a reward beta * (log pi(y) - log ref(y)), detached.
    """
    logits = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)  # (B,)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(-beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}; use sigmoid or ipo")
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


STATS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "logps/chosen",
         "logps/rejected", "logps/margin")


def pair_sums(losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> torch.Tensor:
    """Sums over the pairs of each of STATS, then the pair count: (len(STATS) + 1,), float64 on the host (exact
    over many steps and processes; MPS has no float64). A pair counts as correct when the chosen response's
    implicit reward is strictly higher."""
    columns = [losses.detach(), chosen_rewards, rejected_rewards, (chosen_rewards > rejected_rewards).float(),
               chosen_rewards - rejected_rewards, chosen_logps.detach(), rejected_logps.detach(),
               (chosen_logps - rejected_logps).detach(), torch.ones_like(losses)]
    return torch.stack([c.float().sum() for c in columns]).to("cpu", torch.float64)


def means(sums: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """The means of STATS over every process's pairs, from `pair_sums` (summed)."""
    sums = distributed.all_sum(sums)
    return {prefix + k: (sums[i] / sums[-1].clamp(min=1)).item() for i, k in enumerate(STATS)}


@dataclass
class PairBatch:
    """A forward pass's pairs: chosen then rejected responses as one Rollout, and their reference log-probs."""

    rollout: Rollout  # 2n rows: the n chosen responses, then the n rejected ones
    ref_logps: torch.Tensor  # (2n,) summed over each response

    def split(self, logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = logps.size(0) // 2
        return logps[:n], logps[n:]


def sequence_logps(policy, rollout: Rollout) -> torch.Tensor:
    """log pi(y|x) of each response: its tokens' log-probs summed (padding holds 0). (2n,)"""
    return policy(rollout, entropy=False)[0].sum(1)


def _size(pair: Pair, cfg) -> int:
    """A cheap guess of a pair's padded length in tokens (~4 characters a token), to batch similar lengths."""
    return min(len(pair.prompt), 4 * cfg.max_prompt_tokens) + min(max(len(pair.chosen), len(pair.rejected)),
                                                                  4 * cfg.max_response_tokens)


def make_batches(policy, ref, pairs: list[Pair], rows: list[int], cfg, bar=None) -> list[PairBatch]:
    """This process's share of `rows` as forward passes of similar lengths, with the reference log-probs."""
    mine = sorted(rows[distributed.share(len(rows))], key=lambda i: _size(pairs[i], cfg))
    batches = []
    for start in range(0, len(mine), cfg.train.micro_batch_size):
        chunk = [pairs[i] for i in mine[start: start + cfg.train.micro_batch_size]]
        rollout = policy.teacher_forced([p.prompt for p in chunk] * 2, [p.chosen for p in chunk] +
                                        [p.rejected for p in chunk], cfg.max_prompt_tokens, cfg.max_response_tokens)
        policy.prepare(rollout)  # frozen blocks' output, outside inference mode: the training passes reuse it
        with torch.inference_mode():
            ref_logps = sequence_logps(ref, rollout)
        if not cfg.cache_frozen:
            rollout.frozen_hidden = None
        batches.append(PairBatch(rollout, ref_logps.clone()))
        if bar is not None:
            bar.update(len(chunk))
    return batches


def batch_losses(policy, batch: PairBatch, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass: per-pair losses (n,) and their STATS sums."""
    logps = sequence_logps(policy, batch.rollout)  # (2n,)
    if not cfg.cache_frozen:
        batch.rollout.frozen_hidden = None
    chosen, rejected = batch.split(logps)
    ref_chosen, ref_rejected = batch.split(batch.ref_logps)
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, cfg.beta,
                                                        cfg.loss_type, cfg.label_smoothing)
    return losses, pair_sums(losses, chosen_rewards, rejected_rewards, chosen, rejected)


@torch.no_grad()
def evaluate(policy, batches: list[PairBatch], cfg) -> dict[str, float]:
    """`eval/` means of STATS over the held-out pairs (every process's share)."""
    sums = torch.zeros(len(STATS) + 1, dtype=torch.float64)  # on the host, as pair_sums
    for batch in batches:
        sums += batch_losses(policy, batch, cfg)[1]
    return means(sums, "eval/")


def reference_eval(batches: list[PairBatch], cfg) -> dict[str, float]:
    """The `eval/` metrics before training: the policy is then the reference, so its log-probs are the cached ones
    (and every implicit reward is 0)."""
    sums = torch.zeros(len(STATS) + 1, dtype=torch.float64)
    for b in batches:
        chosen, rejected = b.split(b.ref_logps)
        losses, cr, rr = dpo_loss(chosen, rejected, chosen, rejected, cfg.beta, cfg.loss_type, cfg.label_smoothing)
        sums += pair_sums(losses, cr, rr, chosen, rejected)
    return means(sums, "eval/")


def plan(cfg, n_train: int) -> tuple[list[list[int]], EpochPlan]:
    """The step batches (pair indices, drawn once, sizes within one of each other: a causal LM's frozen blocks run
    once per pair) and which of them each step trains on: each epoch visits them all, in its own shuffled order."""
    order = list(range(n_train))
    random.Random(f"{cfg.seed}-dpo").shuffle(order)
    n = math.ceil(n_train / cfg.train.batch_size)
    bounds = [round(i * n_train / n) for i in range(n + 1)]
    batches = [order[a:b] for a, b in zip(bounds, bounds[1:])]
    k = distributed.world_size()
    if min(len(b) for b in batches) < k:
        raise ConfigError(f"with {k} processes every step needs at least {k} pairs; raise train.batch_size (now "
                          f"{cfg.train.batch_size}) or give more training pairs (now {n_train})")
    stream = lambda epoch: random.Random(cfg.seed * 1_000_003 + epoch - 1)  # noqa: E731  (DPO runs' own, kept)
    return batches, EpochPlan(shuffled_batches(n, 1), cfg.train.epochs, cfg.seed, cfg.train.steps, stream)


def train_step(train_policy, batches: list[PairBatch], n_pairs: int, optimizer, scheduler, params, cfg) -> dict:
    """Gradients of one step batch (n_pairs over every process), accumulated over this process's forward passes,
    then one clipped AdamW step. The loss is the mean over the step's pairs on one process or several."""
    sums = torch.zeros(len(STATS) + 1, dtype=torch.float64)
    optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1  # DDP all-reduces the accumulated gradients in the last backward only
        sync = contextlib.nullcontext() if last else sharding.no_sync(train_policy)  # DDP's, or FSDP's equivalent
        with sync:
            losses, s = batch_losses(train_policy, batch, cfg)
            backward(losses.sum() * distributed.world_size() / n_pairs)
        sums += s
    row = means(sums)  # a non-finite loss gives non-finite gradients: `clipped_step` skips the update
    row["lr"] = scheduler.get_last_lr()[0]
    row["grad_norm"] = clipped_step(params, optimizer, scheduler, cfg.train.max_grad_norm)
    return row


def load_pairs(cfg) -> tuple[list[Pair], list[Pair]]:
    if not cfg.policy:
        raise ConfigError("dpo needs --policy (a generator run, an RL or DPO run, a causal LM, or smollm2)")
    if not cfg.preferences:
        raise ConfigError("dpo needs preference pairs: pass --preferences FILE.jsonl of {\"prompt\", \"chosen\", "
                          "\"rejected\"}")
    if cfg.loss_type == "ipo" and cfg.label_smoothing:
        raise ConfigError("label_smoothing is for the sigmoid loss; set label_smoothing=0 with loss_type=ipo")
    return load_split(cfg)


class DPOJob(PolicyJob):
    """DPO as a job of the shared runner: the reference log-probs once in `begin`, then one step batch a step."""

    stage, name, scheduler, kept = "dpo", "dpo", None, ("train_s",)
    progress_keys = {"loss": "loss", "acc": "rewards/accuracy"}

    def __init__(self, cfg: DPOConfig):
        self.cfg, self.base, self.train_s, self.last = cfg, cfg.policy, 0.0, {}

    def setup(self, run: runner.Run) -> None:
        cfg, self.run = self.cfg, run
        self.train_pairs, self.eval_pairs = load_pairs(cfg)  # bad input fails here, on every process alike
        self.step_rows, self.plan = plan(cfg, len(self.train_pairs))
        self.steps = self.plan.steps
        self.policy = load_policy(cfg.policy, run.device, value_head=False, **cfg.policy_options.as_kwargs())
        self.ref = load_reference(cfg.ref_policy, run.device, **cfg.policy_options.as_kwargs()) if cfg.ref_policy \
            else self.policy.frozen_copy()
        record_frozen(self.policy, cfg.policy_options, run.say)
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        if not self.params:
            raise ConfigError("the policy has no trainable parameters; lower policy_options.freeze_layers")
        run.say(f"dpo: policy {cfg.policy} ({self.policy.kind}), {len(self.train_pairs)} training pairs, "
                f"{len(self.eval_pairs)} held-out pairs; {self.steps} steps of {cfg.train.batch_size} pairs, "
                f"beta {cfg.beta}, {cfg.loss_type} loss")
        self.optimizer, self.scheduler = make_optimizer(self.params, cfg.train, self.steps)

    def begin(self, run: runner.Run) -> dict:
        """The reference's log-probs of every pair (and the frozen blocks' output), on every process at once."""
        t0 = time.time()
        with progress(total=len(self.train_pairs) + len(self.eval_pairs), desc="reference log-probs", unit="pair",
                      disable=not run.main, iterable=None) as bar:
            self.batches = [make_batches(self.policy, self.ref, self.train_pairs, rows, self.cfg, bar)
                            for rows in self.step_rows]
            self.eval_batches = make_batches(self.policy, self.ref, self.eval_pairs, list(range(len(self.eval_pairs))),
                                             self.cfg, bar)
        self.ref_s = time.time() - t0
        self.train_policy = distributed.wrap(self.policy)
        self.params = [p for p in self.policy.parameters() if p.requires_grad]  # FSDP's shards replace them
        self.before = reference_eval(self.eval_batches, self.cfg)
        return self.before | {"time/ref_s": self.ref_s}

    def step(self, step: int) -> dict | None:
        cfg, t0 = self.cfg, time.time()
        _, (k,), _ = self.plan.at(step)
        row = train_step(self.train_policy, self.batches[k], len(self.step_rows[k]), self.optimizer, self.scheduler,
                         self.params, cfg)
        row["time/step_s"] = time.time() - t0
        self.train_s += row["time/step_s"]
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == self.steps:
            with sharding.unsharded([self.policy]):  # each process's share of the pairs: unequal numbers of passes
                row |= evaluate(self.policy, self.eval_batches, cfg)
            self.last = row
        if distributed.world_size() > 1:  # 0 while every process holds the same weights, as it must
            row["dist/param_spread"] = distributed.spread(self.params)
        logged = step % cfg.train.log_every == 0 or "eval/loss" in row
        return row if logged else None

    def end(self) -> None:
        self.train_policy = None  # DDP's reducer (in a reference cycle) must go before the process group

    def modules(self) -> list:
        return [self.policy, self.ref]

    def finish(self, run: runner.Run) -> dict:
        """Plots and results: held-out figures before and after, the length baseline, timings, samples."""
        cfg, metrics = self.cfg, run.metrics
        metrics.plot(run.dir.plot("loss"), ["loss", "eval/loss"], f"DPO loss ({cfg.loss_type})")
        metrics.plot(run.dir.plot("rewards"), ["rewards/accuracy", "eval/rewards/accuracy", "rewards/margin",
                                               "eval/rewards/margin"], "implicit reward: accuracy and margin")
        metrics.plot(run.dir.plot("logps"), ["eval/logps/margin", "eval/logps/chosen", "eval/logps/rejected"],
                     "held-out log-probs of the policy")
        after = self.last or evaluate(self.policy, self.eval_batches, cfg)
        strip = lambda d: {k[len("eval/"):]: v for k, v in d.items() if k.startswith("eval/")}  # noqa: E731
        return {"pairs_train": len(self.train_pairs), "pairs_eval": len(self.eval_pairs), "steps": self.steps,
                "before": strip(self.before), "after": strip(after), "length_baseline": length_baseline(self.eval_pairs),
                "time_ref_s": round(self.ref_s, 1), "time_train_s": round(self.train_s, 1),
                "samples": answer_samples(self.policy, self.ref, self.eval_pairs, cfg)}

    def report(self, run: runner.Run, results: dict) -> None:
        dpo_report(run.dir, results, self.cfg)
        b, a = results["before"], results["after"]
        run.say(f"held-out pairs: implicit-reward accuracy {b['rewards/accuracy']:.3f} -> {a['rewards/accuracy']:.3f}, "
                f"log-prob margin (chosen - rejected) {b['logps/margin']:.2f} -> {a['logps/margin']:.2f} nats")


def train(cfg: DPOConfig, resume: str | Path | None = None, overwrite: bool = False) -> Path | None:
    """Reference log-probs once, then DPO steps over the training pairs; returns the run directory (None on the
    other processes under torchrun)."""
    return runner.run(DPOJob(cfg), cfg, resume, overwrite)


@torch.no_grad()
def answer_samples(policy, ref, pairs: list[Pair], cfg) -> list[dict]:
    """The reference's and the policy's answers to the shortest held-out prompts (same seed)."""
    prompts = sorted({p.prompt for p in pairs}, key=len)[: cfg.samples]
    if not prompts:
        return []
    device = next(policy.parameters()).device
    answers = [m.sample(prompts, cfg.max_response_tokens, torch.Generator(device=device).manual_seed(cfg.seed)).texts
               for m in (ref, policy)]
    return [{"prompt": p, "reference": r, "policy": o} for p, r, o in zip(prompts, *answers)]


def dpo_report(run_dir, results: dict, cfg) -> Path:
    """report.md of a DPO run: the held-out pairs' figures before and after, plots, answers of both policies."""
    b, a = results["before"], results["after"]
    return write_report(
        run_dir, f"DPO run `{run_dir}`",
        f"Policy `{cfg.policy}`, preferences `{cfg.preferences}`: {results['pairs_train']} training and "
        f"{results['pairs_eval']} held-out pairs; beta {cfg.beta}, {cfg.loss_type} loss.",
        table(["held-out pairs", "before (reference)", "after (policy)"], [[k, f"{b[k]:.4f}", f"{a[k]:.4f}"] for k in STATS]),
        f"Longer-response-wins baseline on these pairs: {results['length_baseline']:.3f}.",
        plot_links(run_dir, ("loss", "rewards", "logps")),
        section("Samples", table(["prompt", "reference (before)", "policy (after)"],
                                 [[md_cell(s["prompt"]), md_cell(s["reference"]), md_cell(s["policy"])]
                                  for s in results["samples"]])))
