"""The loop that PPO, A2C, GRPO and RLOO share: sample responses, score them, compare them with the
frozen reference, estimate advantages, and improve the policy with the clipped surrogate objective.

The algorithms differ only in their advantages (and GRPO in where its KL penalty goes); those pieces
live in ppo.py, grpo.py and rloo.py, and `_advantages` below picks one by the config's `algorithm`.
"""

from __future__ import annotations

import gc
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from minirlhf import UserError, distributed
from minirlhf.checkpoint import atomic_write_text, save_json
from minirlhf.config import DataConfig, RunConfig, save_config
from minirlhf.data.prompts import PromptConfig, load_prompts
from minirlhf.metrics import MetricsWriter
from minirlhf.models.policy import PolicyOptions, Rollout, distinct_rows, load_policy
from minirlhf.ops import kl_estimate, masked_mean
from minirlhf.rewards import Reward, RewardConfig
from minirlhf.runtime import make_run_dir, memory_report, peak_memory_mb, pick_device, seed_everything
from minirlhf.training import optimizer_step, progress


@dataclass
class RLConfig(RunConfig):
    policy: str = ""
    """the starting policy: an LSTM generator run, an RL run, a causal LM folder or hub name, or `smollm2`
    (SmolLM2-135M-Instruct, offline)"""
    policy_options: PolicyOptions = field(default_factory=PolicyOptions)
    """how a causal LM policy is set up"""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """the reward: a weighted sum of named terms (`--reward RUN` sets reward.classifier)"""
    data: DataConfig = field(default_factory=DataConfig)
    """the corpus whose texts' first words are the prompts (unless prompts.file is set)"""
    prompts: PromptConfig = field(default_factory=PromptConfig)
    """where the prompts come from"""
    steps: int = 60
    """iterations of rollout, then update"""
    batch_size: int = 64
    """responses sampled per iteration"""
    response_len: int = 16
    """tokens per response at most"""
    ppo_epochs: int = 4
    """passes over each batch of rollouts"""
    minibatch_size: int = 16
    """responses per gradient step"""
    lr: float = 3e-4
    """Adam learning rate"""
    clip_eps: float = 0.2
    """clip range of the probability ratio"""
    kl_coef: float = 0.1
    """(initial) coefficient of the KL penalty against the reference"""
    kl_estimator: str = "k1"
    """per-token KL estimator in the penalty: k1 (log-ratio) or k3 (always >= 0)"""
    adaptive_kl: bool = True
    """adapt kl_coef towards kl_target (Ziegler et al., 2019); false keeps it fixed"""
    kl_target: float = 6.0
    """target KL per response, in nats, of the adaptive controller"""
    kl_horizon: int = 10000
    """horizon of the adaptive controller, in responses"""
    target_kl: float = 0.1
    """stop a step's epochs early once the approximate KL to the rollout policy exceeds 1.5 x this"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this"""
    sample_every: int = 10
    """add a table of sample responses to samples.md at the start and every this many steps"""
    save_every: int = 20
    """checkpoint the policy every this many steps (and at the end)"""
    eval_every: int = 0
    """log `eval/reward`, the mean reward on the held-out prompts, before training and every this many steps,
    with `time/train_s`, the training time so far (0: evaluate at the end only)"""

    algorithm: ClassVar[str] = ""
    checks = {**RunConfig.checks, "steps": ">= 1", "batch_size": ">= 1", "response_len": ">= 1", "ppo_epochs": ">= 1",
              "minibatch_size": ">= 1", "lr": "> 0", "clip_eps": "> 0", "kl_coef": ">= 0", "kl_estimator": "{k1,k3}",
              "kl_target": "> 0", "kl_horizon": ">= 1", "target_kl": "> 0", "max_grad_norm": "> 0",
              "sample_every": ">= 1", "save_every": ">= 1", "eval_every": ">= 0"}


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps: float) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate objective (Schulman et al., 2017, eq. 7), negated. All inputs (B, T).

    L = -E[min(r A, clip(r, 1 - eps, 1 + eps) A)], r = exp(logprobs - old_logprobs), averaged over tokens.
    """
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"policy/approx_kl": masked_mean(0.5 * log_ratio ** 2, mask).item(),
                 "policy/clipfrac": masked_mean((clipped > unclipped).float(), mask).item(),
                 "policy/ratio_max": (ratio * mask).max().item()}
    return loss, stats


class AdaptiveKLController:
    """Ziegler et al. (2019), sec. 2.2: kl_coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon."""

    def __init__(self, kl_coef: float, target: float, horizon: int, adaptive: bool = True):
        self.value, self.target, self.horizon, self.adaptive = kl_coef, target, horizon, adaptive

    def update(self, kl: float, n_responses: int) -> None:
        if self.adaptive:
            error = max(-0.2, min(0.2, kl / self.target - 1))
            self.value *= 1 + error * n_responses / self.horizon


@dataclass
class Batch:
    """One iteration's experience: what the update reads, all (B, T) but `rollout`."""

    rollout: Rollout
    ref_logprobs: torch.Tensor
    advantages: torch.Tensor
    old_values: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def select(self, idx: list[int]) -> "Batch":
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return Batch(self.rollout.select(idx), self.ref_logprobs[idx], self.advantages[idx],
                     pick(self.old_values), pick(self.returns))


def group_size(cfg) -> int:
    """Samples per prompt: 1 for PPO and A2C, `group_size` for the group-baseline algorithms."""
    return getattr(cfg, "group_size", 1)


def _advantages(cfg, rollout, scores, kl, kl_coef) -> Batch:
    """The algorithms' one real difference: how a score becomes a per-token advantage."""
    from minirlhf.algorithms import grpo, ppo, rloo

    mask = rollout.response_mask
    if cfg.algorithm == "grpo":
        return Batch(rollout, kl.ref_logprobs, grpo.advantages(scores, cfg.group_size, mask))
    if cfg.algorithm == "rloo":
        seq_kl = (kl.penalty * mask).sum(1)
        return Batch(rollout, kl.ref_logprobs, rloo.advantages(scores - kl_coef * seq_kl, cfg.group_size, mask))
    advantages, returns = ppo.advantages(scores, kl.penalty, rollout.values, mask, kl_coef, cfg)
    return Batch(rollout, kl.ref_logprobs, advantages, rollout.values, returns)


def _shuffled(n: int, group: int, minibatch_size: int, rng) -> list[int]:
    """Rows in random order; whole groups stay together where minibatches hold whole groups, so that a
    minibatch reads each of its prompts once (`CausalLMPolicy._predicting`)."""
    if group == 1 or minibatch_size % group or n % group:
        order = list(range(n))
        rng.shuffle(order)
        return order
    groups = list(range(n // group))
    rng.shuffle(groups)
    return [g * group + i for g in groups for i in range(group)]


def _positions_read(rollout: Rollout, rows: list[int]) -> int:
    """Tokens a minibatch's pass reads: every response, and each distinct prompt once (as the causal LM does)."""
    _, first = distinct_rows(rollout.prompt_ids[rows])
    return int(rollout.prompt_mask[rows][first].sum() + rollout.response_mask[rows].sum())


def _update(cfg, policy, value_model, optimizer, batch: Batch, kl_coef: float, rng) -> dict:
    """Epochs over shuffled minibatches of the clipped objective (plus value loss, plus GRPO's KL term);
    stops early once the policy has moved too far from the one that sampled.

    Under torchrun each process takes its share of every minibatch and scales its token mean by its share
    of the minibatch's tokens, so the averaged gradient is the one a single process would compute.
    """
    from minirlhf.algorithms.ppo import value_loss

    params = [p for group in optimizer.param_groups for p in group["params"]]
    stats: list[dict] = []
    for _ in range(cfg.ppo_epochs):
        order = _shuffled(len(batch.rollout.prompts), group_size(cfg), cfg.minibatch_size, rng)
        for start in range(0, len(order), cfg.minibatch_size):
            rows = order[start: start + cfg.minibatch_size]
            mb = batch.select(distributed.shard(rows))
            mask = mb.rollout.response_mask
            share = (mask.sum() / batch.rollout.response_mask[rows].sum()).item()  # 1 on one process
            logprobs, values, _ = policy(mb.rollout, entropy=False)
            loss, s = policy_loss(logprobs, mb.rollout.logprobs, mb.advantages, mask, cfg.clip_eps)
            s["policy/loss"] = loss.item()
            if mb.returns is not None:
                values = values if value_model is None else value_model(mb.rollout, entropy=False)[1]
                vf = value_loss(values, mb.old_values, mb.returns, mask, cfg.clip_value)
                loss, s["value/loss"] = loss + cfg.vf_coef * vf, vf.item()
            if cfg.algorithm == "grpo":  # GRPO puts the KL penalty in the loss (Shao et al., 2024, eq. 3)
                kl = masked_mean(kl_estimate(logprobs, mb.ref_logprobs, "k3"), mask)
                loss, s["policy/kl_loss"] = loss + kl_coef * kl, kl.item()
            if distributed.world_size() > 1:
                loss = loss * (share * distributed.world_size())
                s = distributed.mean_over_ranks(s, share, mask.device)
                if not distributed.everywhere(bool(torch.isfinite(loss)), mask.device):
                    loss = loss.new_tensor(float("nan"))  # every process stops, with the same message
            s["policy/grad_norm"] = optimizer_step(loss, params, optimizer, None, cfg.max_grad_norm)
            s["update/tokens"] = _positions_read(batch.rollout, rows)
            stats.append(s)
        if stats[-1]["policy/approx_kl"] > 1.5 * cfg.target_kl:  # the same on every process
            break
    mean = {k: sum(d[k] for d in stats) / len(stats) for k in stats[0]}
    return mean | {"policy/ratio_max": max(d["policy/ratio_max"] for d in stats), "policy/updates": len(stats),
                   "update/tokens": sum(d["update/tokens"] for d in stats)}  # positions the update passes ran over


@dataclass
class KLTerms:
    ref_logprobs: torch.Tensor  # (B, T)
    penalty: torch.Tensor  # (B, T) the configured estimator, 0 on padding
    k1: torch.Tensor  # (B,) summed log-ratio per response: the unbiased KL that is logged and controlled


def kl_terms(cfg, logprobs, ref_logprobs, mask) -> KLTerms:
    penalty = kl_estimate(logprobs, ref_logprobs, cfg.kl_estimator) * mask
    return KLTerms(ref_logprobs, penalty, (kl_estimate(logprobs, ref_logprobs, "k1") * mask).sum(1))


def step_rng(seed: int, step: int) -> random.Random:
    """The step's own stream for picking prompts and shuffling minibatches: a run resumed at any step
    draws exactly what the uninterrupted run drew (the data position is the step)."""
    return random.Random(seed * 1_000_003 + step)


def row_generators(seed: int, step: int, rows: range, device) -> list[torch.Generator]:
    """One sampling generator per response of the step, keyed by its row in the whole batch, so the
    responses are the same on one process or split across several, and after a resume."""
    return [torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) * 100_003 + r) for r in rows]


def _prompt_batch(cfg, prompts: list[str], rng) -> list[str]:
    """batch_size / group_size distinct prompts, each repeated group_size times in a row."""
    g = group_size(cfg)
    picked = rng.sample(prompts, min(cfg.batch_size // g, len(prompts)))
    return [p for p in picked for _ in range(g)]


@dataclass
class Models:
    policy: torch.nn.Module
    ref: torch.nn.Module
    value_model: torch.nn.Module | None  # the separate critic, if any
    train_policy: torch.nn.Module | None = None  # the policy as the update calls it (DDP-wrapped under torchrun)
    train_critic: torch.nn.Module | None = None

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for m in (self.policy, self.value_model) if m is not None for p in m.parameters() if p.requires_grad]

    def wrap(self) -> None:
        self.train_policy = distributed.wrap(self.policy)
        self.train_critic = distributed.wrap(self.value_model, find_unused=True)  # its LM head gets no gradient


def _experience(cfg, step: int, models: Models, reward, prompts: list[str], device):
    """This process samples, scores and compares with the reference its share of the step's responses;
    then the whole batch is gathered. Returns rollout, reward terms and reference log-probs of all B
    responses, and the step's random stream."""
    rng = step_rng(cfg.seed, step)
    batch_prompts = _prompt_batch(cfg, prompts, rng)
    rows = range(len(batch_prompts))[distributed.share(len(batch_prompts))]
    rollout = models.policy.sample(batch_prompts[rows.start: rows.stop], cfg.response_len,
                                   row_generators(cfg.seed, step, rows, device))
    models.policy.prepare(rollout)  # outside the inference mode below; a no-op where sampling kept it
    _, terms = reward(models.policy, rollout)
    with torch.inference_mode():
        ref_logprobs = models.ref(rollout, entropy=False)[0]
        values = models.value_model(rollout, entropy=False)[1] if models.value_model is not None else None
    if values is not None:
        rollout.values = values.clone()  # clones leave inference mode: the losses read them
    gather = distributed.gather_rows
    terms = {k: gather(v.to(device)) for k, v in terms.items()}
    rollout = distributed.gather_rollout(rollout)
    return rollout, terms, gather(ref_logprobs.clone()), rng


def _step(cfg, step: int, models: Models, optimizer, kl_ctl, reward, prompts, device) -> tuple[dict, Rollout, dict]:
    """One iteration: experience, advantages, update. Returns the metrics row, the rollout and reward terms."""
    t0 = time.time()
    rollout, terms, ref_logprobs, rng = _experience(cfg, step, models, reward, prompts, device)
    mask, total = rollout.response_mask, terms["total"]
    kl = kl_terms(cfg, rollout.logprobs, ref_logprobs, mask)
    with torch.no_grad():
        batch = _advantages(cfg, rollout, reward.normalized(total), kl, kl_ctl.value)
    t1 = time.time()
    stats = _update(cfg, models.train_policy, models.train_critic, optimizer, batch, kl_ctl.value, rng)
    row = {"reward/mean": total.mean().item(), "reward/std": total.std().item() if len(total) > 1 else 0.0,
           **{f"reward/{k}": v.mean().item() for k, v in terms.items() if k != "total"},
           "objective/kl": kl.k1.mean().item(), "objective/kl_coef": kl_ctl.value,
           "objective/entropy": masked_mean(rollout.entropy, mask).item(), **stats,
           "response/length": mask.sum(1).mean().item(), "response/ended": rollout.ended.float().mean().item(),
           "time/rollout_s": t1 - t0, "time/update_s": time.time() - t1}
    if batch.returns is not None:
        from minirlhf.algorithms.ppo import explained_variance

        row["value/explained_var"] = explained_variance(batch.old_values, batch.returns, mask)
    if distributed.world_size() > 1:  # 0 while every process holds the same weights, as it must
        row["dist/param_spread"] = distributed.spread(sum(p.double().sum() for p in models.trainable()))
    return row, rollout, terms


def _check(cfg, n_prompts: int) -> None:
    if not cfg.policy:
        raise UserError(f"{cfg.algorithm} needs --policy (a generator run, an RL run, a causal LM, or smollm2)")
    g = group_size(cfg)
    if cfg.batch_size % g or cfg.batch_size < g:
        raise UserError(f"batch_size={cfg.batch_size} must be a multiple of group_size={g}")
    if cfg.algorithm == "a2c" and (cfg.ppo_epochs != 1 or cfg.minibatch_size < cfg.batch_size):
        raise UserError("a2c makes one gradient step per rollout: keep ppo_epochs=1 and minibatch_size >= batch_size")
    batch = min(cfg.batch_size // g, n_prompts) * g  # fewer prompts than batch_size // g make a smaller batch
    k, last = distributed.world_size(), batch % cfg.minibatch_size or cfg.minibatch_size
    if min(batch, cfg.minibatch_size, last) < k:
        raise UserError(f"with {k} processes every minibatch needs at least {k} responses; raise batch_size "
                        f"and minibatch_size (now {cfg.batch_size} and {cfg.minibatch_size})")


def setup(cfg, device) -> tuple[Models, Reward, list[str], list[str]]:
    """The models (policy, frozen reference, separate critic), the reward, training and held-out prompts."""
    critic = getattr(cfg, "critic", None)
    policy = load_policy(cfg.policy, device, value_head=critic == "head", **cfg.policy_options.as_kwargs())
    ref = policy.frozen_copy()
    value_model = policy.critic_copy() if critic == "separate" else None
    reward = Reward(cfg.reward, cfg.response_len, device, cfg.data)
    train_prompts, eval_prompts = load_prompts(cfg.prompts, cfg.data)
    return Models(policy, ref, value_model), reward, train_prompts, eval_prompts


def train(cfg: RLConfig, resume: str | Path | None = None) -> Path | None:
    """Rollout, score, KL against the reference, advantages, clipped updates; returns the run directory
    (None on the other processes under torchrun). `resume` continues a run from its last checkpoint."""
    from minirlhf.algorithms.rl_state import restore, samples_so_far, save_checkpoint
    from minirlhf.evaluate import evaluate_policy, held_out_reward, sample_table, training_plots, write_report

    distributed.init()
    main = distributed.is_main()
    _check(cfg, cfg.batch_size)
    seed_everything(cfg.seed)
    device, why = (distributed.device(), "torchrun") if distributed.device() else pick_device(cfg.device)
    if main:
        print(f"device: {device} ({why}), {distributed.world_size()} process(es)")
    with distributed.main_first():
        models, reward, train_prompts, eval_prompts = setup(cfg, device)  # bad input fails here
    _check(cfg, len(train_prompts))
    optimizer = torch.optim.Adam(models.trainable(), lr=cfg.lr, fused=device.type in ("cpu", "cuda"))
    kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon, cfg.adaptive_kl)
    done, train_s = (0, 0.0) if resume is None else restore(Path(resume), cfg, models, optimizer, kl_ctl, reward, device)
    if done >= cfg.steps and (Path(resume) / "results.json").is_file():
        raise UserError(f"{resume} already ran {done} steps; pass --steps=N with N > {done} to train further")
    run_dir = Path(resume) if resume is not None else make_run_dir(cfg.out, cfg.algorithm) if main else None
    if main:
        save_config(cfg, run_dir / "config.yaml")
        print(f"{cfg.algorithm}: policy {cfg.policy} ({models.policy.kind}), {len(train_prompts)} training prompts, "
              f"{len(eval_prompts)} held-out prompts" + (f"; resuming after step {done}" if done else ""))
    metrics = MetricsWriter(run_dir, keep_until=done) if main else None
    samples = samples_so_far(run_dir, cfg, done) if main else ""
    models.wrap()
    memory: dict = {}
    if main and cfg.eval_every and done == 0:
        metrics.log(0, **{"eval/reward": held_out_reward(models.policy, reward, eval_prompts, cfg), "time/train_s": 0.0})
    bar = progress(range(done + 1, cfg.steps + 1), desc=cfg.algorithm, unit="step", disable=not main)
    for step in bar:
        row, rollout, terms = _step(cfg, step, models, optimizer, kl_ctl, reward, train_prompts, device)
        kl_ctl.update(row["objective/kl"], len(rollout.prompts))
        if not main:
            continue
        memory = memory_report([models.policy, models.ref, models.value_model], optimizer)
        train_s += row["time/rollout_s"] + row["time/update_s"]
        if cfg.eval_every and step % cfg.eval_every == 0:
            row |= {"eval/reward": held_out_reward(models.policy, reward, eval_prompts, cfg), "time/train_s": train_s}
        metrics.log(step, **row, **memory)
        bar.set_postfix(reward=f"{row['reward/mean']:.2f}", kl=f"{row['objective/kl']:.2f}", refresh=False)
        if step == 1 or step % cfg.sample_every == 0:
            samples += sample_table(step, rollout, terms)
            atomic_write_text(run_dir / "samples.md", samples)
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_checkpoint(run_dir, cfg, step, models, optimizer, kl_ctl, reward, train_s)
    models.train_policy = models.train_critic = None  # DDP's reducers must go before the process group does,
    gc.collect()  # or the exit can abort ("terminate called without an active exception")
    if not main:
        distributed.close()
        return None
    metrics.close()
    training_plots(metrics, run_dir, cfg)
    results = evaluate_policy(models.policy, models.ref, reward, eval_prompts, cfg, seed=cfg.seed)
    results["memory"] = memory | {"memory/peak_rss_mb": round(peak_memory_mb(), 1)}
    results["peak_memory_mb"] = round(peak_memory_mb())
    save_json(results, run_dir / "results.json")
    write_report(run_dir, results, cfg)
    print(f"held-out reward: reference {results['reward_reference']:.3f} -> policy {results['reward_policy']:.3f}, "
          f"win rate {results['win_rate']:.2f}, KL {results['kl']:.2f} nats; memory: " +
          ", ".join(f"{k.split('/')[1]} {v:.1f} MB" for k, v in results["memory"].items()))
    distributed.close()
    return run_dir
