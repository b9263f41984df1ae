"""DPO (Rafailov et al., 2023): learn from preference pairs directly, with no reward model and no sampling.

`minirlhf dpo --policy RUN|smollm2 --preferences FILE.jsonl` raises the policy's log-probability of each chosen
response over the rejected one, measured against the frozen starting policy (the reference): the implicit reward
of a response is beta * (log pi(y|x) - log pi_ref(y|x)). The reference's log-probs of every pair are computed once,
before training. `loss_type=ipo` swaps the logistic loss for IPO's squared one (Azar et al., 2023).

Each optimizer step takes `batch_size` pairs; the step batches are drawn once and kept (their order reshuffled
each epoch), so a causal LM's frozen blocks run once per pair (`cache_frozen`). Under torchrun each process takes
its share of every step batch; the per-pair sums are all-reduced and rank 0 writes.
"""

from __future__ import annotations

import contextlib
import gc
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from minirlhf import UserError, distributed
from minirlhf.checkpoint import atomic_dir, atomic_write_text, save_json
from minirlhf.config import RunConfig, save_config
from minirlhf.data.preferences import Pair, length_baseline, load_split
from minirlhf.metrics import MetricsWriter
from minirlhf.models.policy import PolicyOptions, Rollout, load_policy
from minirlhf.runtime import make_run_dir, memory_report, peak_memory_mb, pick_device, seed_everything
from minirlhf.training import make_optimizer, progress


@dataclass
class DPOConfig(RunConfig):
    policy: str = ""
    """the starting policy, also the reference: an LSTM generator run, an RL or DPO run, a causal LM folder or hub
    name, or `smollm2` (SmolLM2-135M-Instruct, offline)"""
    policy_options: PolicyOptions = field(default_factory=PolicyOptions)
    """how a causal LM policy is set up (with LoRA the reference is the model with its adapters off)"""
    preferences: str = ""
    """preference pairs, .jsonl of {"prompt", "chosen", "rejected"} (e.g. from `minirlhf feedback export`)"""
    eval_file: str | None = None
    """held-out pairs (.jsonl); default: hold out `eval_fraction` of the prompts of `preferences`"""
    eval_fraction: float = 0.1
    """share of the prompts whose pairs are held out"""
    max_train: int | None = None
    """use at most this many training pairs (None: all)"""
    max_eval: int | None = 200
    """use at most this many held-out pairs (None: all)"""
    split_seed: int = 0
    """seed of the shuffle that splits the pairs by prompt"""
    beta: float = 0.1
    """strength of the implicit KL constraint: the implicit reward is beta * log(pi / pi_ref)"""
    loss_type: str = "sigmoid"
    """`sigmoid` (DPO's logistic loss) or `ipo` (IPO's squared loss, which does not push margins to infinity)"""
    label_smoothing: float = 0.0
    """assumed probability that a pair's label is flipped (conservative DPO; sigmoid loss only)"""
    epochs: int = 1
    """passes over the training pairs"""
    steps: int = 0
    """optimizer steps (0: `epochs` passes); more than a pass goes round the pairs again"""
    batch_size: int = 16
    """pairs per optimizer step"""
    micro_batch_size: int = 4
    """pairs per forward pass; a step accumulates the gradients of batch_size / micro_batch_size passes"""
    lr: float = 5e-5
    """peak AdamW learning rate"""
    warmup_ratio: float = 0.1
    """fraction of steps with linear warm-up; the rest decays linearly to zero"""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this"""
    max_prompt_tokens: int = 256
    """tokens per prompt (after any chat template); a longer prompt keeps its end"""
    max_response_tokens: int = 128
    """tokens per response, end-of-text included; a longer response is cut"""
    cache_frozen: bool = True
    """keep every pair's output of a causal LM's frozen blocks in memory (computed once, with the reference
    log-probs) instead of recomputing it each epoch; memory ~ tokens x hidden size x 4 bytes per pair"""
    eval_every: int = 20
    """log the held-out `eval/` metrics every this many steps (0: only before training and at the end)"""
    save_every: int = 100
    """checkpoint the policy every this many steps (and at the end)"""
    samples: int = 4
    """held-out prompts that the reference and the trained policy answer in report.md (0: none)"""

    algorithm = "dpo"
    checks = {**RunConfig.checks, "eval_fraction": "(0, 0.5]", "max_train": ">= 1", "max_eval": ">= 1",
              "beta": "> 0", "loss_type": "{sigmoid,ipo}", "label_smoothing": "[0, 0.5)", "epochs": ">= 1",
              "steps": ">= 0", "batch_size": ">= 1", "micro_batch_size": ">= 1", "lr": "> 0", "warmup_ratio": "[0, 1]",
              "weight_decay": ">= 0", "max_grad_norm": "> 0", "max_prompt_tokens": ">= 1",
              "max_response_tokens": ">= 1", "eval_every": ">= 0", "save_every": ">= 1", "samples": ">= 0"}


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
    """Sums over the pairs of each of STATS, then the pair count: (len(STATS) + 1,), float64 for all-reduce.
    A pair counts as correct when the chosen response's implicit reward is strictly higher."""
    columns = [losses.detach(), chosen_rewards, rejected_rewards, (chosen_rewards > rejected_rewards).double(),
               chosen_rewards - rejected_rewards, chosen_logps.detach(), rejected_logps.detach(),
               (chosen_logps - rejected_logps).detach(), torch.ones_like(losses)]
    return torch.stack([c.double().sum() for c in columns])


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
    for start in range(0, len(mine), cfg.micro_batch_size):
        chunk = [pairs[i] for i in mine[start: start + cfg.micro_batch_size]]
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
    sums = torch.zeros(len(STATS) + 1, dtype=torch.float64, device=next(policy.parameters()).device)
    for batch in batches:
        sums += batch_losses(policy, batch, cfg)[1]
    return means(sums, "eval/")


def reference_eval(batches: list[PairBatch], cfg, device) -> dict[str, float]:
    """The `eval/` metrics before training: the policy is then the reference, so its log-probs are the cached ones
    (and every implicit reward is 0)."""
    sums = torch.zeros(len(STATS) + 1, dtype=torch.float64, device=device)
    for b in batches:
        chosen, rejected = b.split(b.ref_logps)
        losses, cr, rr = dpo_loss(chosen, rejected, chosen, rejected, cfg.beta, cfg.loss_type, cfg.label_smoothing)
        sums += pair_sums(losses, cr, rr, chosen, rejected)
    return means(sums, "eval/")


def plan(cfg, n_train: int) -> tuple[list[list[int]], int]:
    """The step batches (pair indices, drawn once, sizes within one of each other) and the number of steps."""
    order = list(range(n_train))
    random.Random(f"{cfg.seed}-dpo").shuffle(order)
    n = math.ceil(n_train / cfg.batch_size)
    bounds = [round(i * n_train / n) for i in range(n + 1)]
    batches = [order[a:b] for a, b in zip(bounds, bounds[1:])]
    k = distributed.world_size()
    if min(len(b) for b in batches) < k:
        raise UserError(f"with {k} processes every step needs at least {k} pairs; raise batch_size (now "
                        f"{cfg.batch_size}) or give more training pairs (now {n_train})")
    return batches, cfg.steps or cfg.epochs * n


def batch_of_step(step: int, n_batches: int, seed: int) -> int:
    """Which step batch a step (1, 2, ...) trains on: each epoch visits them all, in its own shuffled order."""
    epoch, position = divmod(step - 1, n_batches)
    order = list(range(n_batches))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[position]


def train_step(train_policy, batches: list[PairBatch], n_pairs: int, optimizer, scheduler, params, cfg) -> dict:
    """Gradients of one step batch (n_pairs over every process), accumulated over this process's forward passes,
    then one clipped AdamW step. The loss is the mean over the step's pairs on one process or several."""
    sums = torch.zeros(len(STATS) + 1, dtype=torch.float64, device=params[0].device)
    optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1  # DDP all-reduces the accumulated gradients in the last backward only
        sync = contextlib.nullcontext() if last or not hasattr(train_policy, "no_sync") else train_policy.no_sync()
        with sync:
            losses, s = batch_losses(train_policy, batch, cfg)
            (losses.sum() * distributed.world_size() / n_pairs).backward()
        sums += s
    row = means(sums)
    if not distributed.everywhere(math.isfinite(row["loss"]), sums.device):
        raise UserError(f"the DPO loss became {row['loss']}; lower the learning rate (checkpoints saved so far are "
                        "intact)")
    row["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm).item()
    row["lr"] = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    return row


def load_pairs(cfg) -> tuple[list[Pair], list[Pair]]:
    if not cfg.policy:
        raise UserError("dpo needs --policy (a generator run, an RL or DPO run, a causal LM, or smollm2)")
    if not cfg.preferences:
        raise UserError("dpo needs preference pairs: pass --preferences FILE.jsonl of {\"prompt\", \"chosen\", "
                        "\"rejected\"}")
    if cfg.loss_type == "ipo" and cfg.label_smoothing:
        raise UserError("label_smoothing is for the sigmoid loss; set label_smoothing=0 with loss_type=ipo")
    return load_split(cfg)


def save_checkpoint(run_dir: Path, cfg, step: int, policy) -> None:
    """checkpoint/policy/ (what `minirlhf generate RUN_DIR` and later stages load) and state.json, replaced whole."""
    with atomic_dir(run_dir / "checkpoint") as tmp:
        policy.save(tmp / "policy")
        save_json({"algorithm": cfg.algorithm, "step": step, "policy_from": cfg.policy}, tmp / "state.json")


def train(cfg: DPOConfig) -> Path | None:
    """Reference log-probs once, then DPO steps over the training pairs; returns the run directory (None on the
    other processes under torchrun)."""
    distributed.init()
    main = distributed.is_main()
    seed_everything(cfg.seed)
    device, why = (distributed.device(), "torchrun") if distributed.device() else pick_device(cfg.device)
    train_pairs, eval_pairs = load_pairs(cfg)  # bad input fails here, on every process alike
    step_rows, steps = plan(cfg, len(train_pairs))
    with distributed.main_first():
        policy = load_policy(cfg.policy, device, value_head=False, **cfg.policy_options.as_kwargs())
    ref = policy.frozen_copy()
    params = [p for p in policy.parameters() if p.requires_grad]
    if not params:
        raise UserError("the policy has no trainable parameters; lower policy_options.freeze_layers")
    run_dir = make_run_dir(cfg.out, cfg.algorithm) if main else None
    if main:
        save_config(cfg, run_dir / "config.yaml")
        print(f"device: {device} ({why}), {distributed.world_size()} process(es)\n"
              f"dpo: policy {cfg.policy} ({policy.kind}), {len(train_pairs)} training pairs, {len(eval_pairs)} "
              f"held-out pairs; {steps} steps of {cfg.batch_size} pairs, beta {cfg.beta}, {cfg.loss_type} loss")
    t0 = time.time()
    with progress(total=len(train_pairs) + len(eval_pairs), desc="reference log-probs", unit="pair",
                  disable=not main, iterable=None) as bar:
        batches = [make_batches(policy, ref, train_pairs, rows, cfg, bar) for rows in step_rows]
        eval_batches = make_batches(policy, ref, eval_pairs, list(range(len(eval_pairs))), cfg, bar)
    ref_s = time.time() - t0
    optimizer, scheduler = make_optimizer(params, cfg, steps)
    train_policy = distributed.wrap(policy)
    metrics = MetricsWriter(run_dir) if main else None
    before = reference_eval(eval_batches, cfg, device)
    if main:
        metrics.log(0, **before, **{"time/ref_s": ref_s})
    train_s, row = 0.0, {}
    for step in progress(range(1, steps + 1), desc="dpo", unit="step", disable=not main):
        t1 = time.time()
        k = batch_of_step(step, len(batches), cfg.seed)
        row = train_step(train_policy, batches[k], len(step_rows[k]), optimizer, scheduler, params, cfg)
        row["time/step_s"] = time.time() - t1
        train_s += row["time/step_s"]
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == steps:
            row |= evaluate(policy, eval_batches, cfg)
        if distributed.world_size() > 1:  # 0 while every process holds the same weights, as it must
            row["dist/param_spread"] = distributed.spread(sum(p.double().sum() for p in params))
        if main:
            metrics.log(step, **row)
        if main and (step % cfg.save_every == 0 or step == steps):
            save_checkpoint(run_dir, cfg, step, policy)
    if main:
        metrics.close()
        _finish(run_dir, cfg, metrics, policy, ref, eval_pairs, before, row, steps, train_s, ref_s, optimizer,
                len(train_pairs))
    del train_policy  # DDP's reducer (in a reference cycle) must go before the process group, or the exit
    gc.collect()  # can abort ("terminate called without an active exception")
    distributed.barrier()
    distributed.close()
    return run_dir


def _finish(run_dir, cfg, metrics, policy, ref, eval_pairs, before, after, steps, train_s, ref_s, optimizer,
            n_train) -> None:
    """Plots, results.json and report.md."""
    metrics.plot(run_dir / "loss.png", ["loss", "eval/loss"], f"DPO loss ({cfg.loss_type})")
    metrics.plot(run_dir / "rewards.png", ["rewards/accuracy", "eval/rewards/accuracy", "rewards/margin",
                                           "eval/rewards/margin"], "implicit reward: accuracy and margin")
    metrics.plot(run_dir / "logps.png", ["eval/logps/margin", "eval/logps/chosen", "eval/logps/rejected"],
                 "held-out log-probs of the policy")
    strip = lambda d: {k[len("eval/"):]: v for k, v in d.items() if k.startswith("eval/")}  # noqa: E731
    results = {"pairs_train": n_train, "pairs_eval": len(eval_pairs), "steps": steps,
               "before": strip(before), "after": strip(after), "length_baseline": length_baseline(eval_pairs),
               "time_ref_s": round(ref_s, 1), "time_train_s": round(train_s, 1),
               "memory": memory_report([policy, ref], optimizer), "peak_memory_mb": round(peak_memory_mb()),
               "samples": answer_samples(policy, ref, eval_pairs, cfg)}
    save_json(results, run_dir / "results.json")
    write_report(run_dir, results, cfg)
    b, a = results["before"], results["after"]
    print(f"held-out pairs: implicit-reward accuracy {b['rewards/accuracy']:.3f} -> {a['rewards/accuracy']:.3f}, "
          f"log-prob margin (chosen - rejected) {b['logps/margin']:.2f} -> {a['logps/margin']:.2f} nats")


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


def write_report(run_dir: Path, results: dict, cfg) -> None:
    from minirlhf.evaluate import md_cell

    b, a = results["before"], results["after"]
    lines = [f"# DPO run `{run_dir}`", "", f"Policy `{cfg.policy}`, preferences `{cfg.preferences}`: "
             f"{results['pairs_train']} training and {results['pairs_eval']} held-out pairs; beta {cfg.beta}, "
             f"{cfg.loss_type} loss.", "", "| held-out pairs | before (reference) | after (policy) |",
             "| --- | --- | --- |"]
    lines += [f"| {k} | {b[k]:.4f} | {a[k]:.4f} |" for k in STATS]
    lines += ["", f"Longer-response-wins baseline on these pairs: {results['length_baseline']:.3f}.", ""]
    lines += [f"![{n}]({n}.png)" for n in ("loss", "rewards", "logps")]
    lines += ["", "## Samples", "", "| prompt | reference (before) | policy (after) |", "| --- | --- | --- |"]
    lines += [f"| {md_cell(s['prompt'])} | {md_cell(s['reference'])} | {md_cell(s['policy'])} |"
              for s in results["samples"]]
    atomic_write_text(run_dir / "report.md", "\n".join(lines) + "\n")
