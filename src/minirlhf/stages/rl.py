"""The loop every RL algorithm shares: sample responses, score them, compare them with the frozen reference, let
the algorithm turn scores into advantages, and improve the policy with the clipped surrogate objective.

What differs between algorithms is an `Algorithm` (rl_core.py), looked up in registry.py by the config's name;
this file names none of them. The run's lifecycle (run directory, checkpoints, --resume, torchrun, results) is the
shared runner's (runner.py): `RLJob` is what RL gives it.

A checkpoint holds policy/ (and value_model/ for a separate critic) as loadable models, and in state.json the KL
coefficient, reward moments and training time. The prompts and sampling seeds of step s derive from (seed, s), so
the step is the data position and a resumed run repeats the uninterrupted one exactly (CPU; tested with SIGKILL).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from minirlhf import ConfigError, distributed, runner, sharding
from minirlhf.checkpoint import atomic_write_text
from minirlhf.data.prompts import load_prompts
from minirlhf.envs.base import env_prompts
from minirlhf.models.load import load_policy, load_reference, record_frozen
from minirlhf.models.policy import Rollout, distinct_rows
from minirlhf.models import rewards
from minirlhf.models.rewards import Reward, RunningMoments
from minirlhf.ops import masked_mean
from minirlhf.rl import registry
from minirlhf.rl.core import (FROZEN_FRACTION, AdaptiveKLController, Algorithm, Batch, RLConfig, default_lr,
                              explained_variance, kl_terms, policy_loss, value_loss)
from minirlhf.rl.guards import Guards
from minirlhf.rundir import RunDir
from minirlhf.stages import rl_episodes
from minirlhf.stages.policy_job import PolicyJob
from minirlhf.stages.evaluate import (distinct_n, evaluate_episodes, evaluate_policy, held_out_reward, in_minibatches,
                                      perplexity, response_nll, sample_table, training_plots, episode_report, rl_report)
from minirlhf.runtime import memory_report, release_freed_memory
from minirlhf.training import optimizer_step

LOSS_STATS = ("policy/loss", "value/loss", "policy/kl_loss")
"""stats that are loss terms: token sums over the whole minibatch's normaliser, so they add up over processes"""


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


def _minibatch(cfg, algo: Algorithm, models, optimizer, params, batch: Batch, rows: list[int], kl_coef: float) -> dict:
    """One gradient step on `rows`. Under torchrun each process takes its share of the rows; every loss is a token
    sum over the whole minibatch's normaliser, so the processes' losses add up to the single-process one."""
    mb = batch.select(distributed.shard(rows))
    mask, whole = mb.rollout.response_mask, batch.rollout.response_mask[rows]
    denominator = algo.normaliser(whole, cfg)
    logprobs, values, _ = models.train_policy(mb.rollout, entropy=False)
    loss, s = policy_loss(logprobs, mb.rollout.logprobs, mb.advantages, mask, cfg.clip_eps, denominator)
    s["policy/loss"] = loss.item()
    if algo.critic:
        values = values if models.train_critic is None else models.train_critic(mb.rollout, entropy=False)[1]
        vf = value_loss(values, mb.old_values, mb.returns, mask, cfg.clip_value, denominator)
        loss, s["value/loss"] = loss + cfg.vf_coef * vf, vf.item()
    if algo.loss_terms is not None:
        term, extra = algo.loss_terms(cfg, logprobs, mb, kl_coef, denominator)
        loss, s = loss + term, s | extra
    if distributed.world_size() > 1:
        share = (mask.sum() / whole.sum()).item()  # this process's share of the minibatch's tokens
        loss = loss * distributed.world_size()  # DDP averages the gradients; the losses must add up
        s = distributed.mean_over_ranks({k: v / share if k in LOSS_STATS else v for k, v in s.items()}, share)
        if not distributed.everywhere(bool(torch.isfinite(loss))):
            loss = loss.new_tensor(float("nan"))  # every process stops, with the same message
    s["policy/grad_norm"] = optimizer_step(loss, params, optimizer, None, cfg.train.max_grad_norm)
    s["update/tokens"] = _positions_read(batch.rollout, rows)
    return s


def _update(cfg, algo: Algorithm, models, optimizer, batch: Batch, kl_coef: float, rng) -> dict:
    """Epochs over shuffled minibatches; stops early once the policy has moved too far from the one that sampled."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    stats: list[dict] = []
    for _ in range(cfg.ppo_epochs):
        order = _shuffled(len(batch.rollout.prompts), algo.group_size(cfg), cfg.minibatch_size, rng)
        for start in range(0, len(order), cfg.minibatch_size):
            rows = order[start: start + cfg.minibatch_size]
            stats.append(_minibatch(cfg, algo, models, optimizer, params, batch, rows, kl_coef))
        if stats[-1]["policy/approx_kl"] > 1.5 * cfg.target_kl:  # the same on every process
            break
    mean = {k: sum(d[k] for d in stats) / len(stats) for k in stats[0]}
    return mean | {"policy/ratio_max": max(d["policy/ratio_max"] for d in stats), "policy/updates": len(stats),
                   "update/tokens": sum(d["update/tokens"] for d in stats)}  # positions the update passes ran over


def step_rng(seed: int, step: int) -> random.Random:
    """The step's own stream for picking prompts and shuffling minibatches: a run resumed at any step
    draws exactly what the uninterrupted run drew (the data position is the step)."""
    return random.Random(seed * 1_000_003 + step)


def row_generators(seed: int, step: int, rows: range, device) -> list[torch.Generator]:
    """One sampling generator per response of the step, keyed by its row in the whole batch, so the
    responses are the same on one process or split across several, and after a resume."""
    return [torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) * 100_003 + r) for r in rows]


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


class PromptSource:
    """Single replies to prompts, scored by the run's reward: the loop's experience without an environment
    (rl_episodes.EpisodeSource with one)."""

    def __init__(self, cfg, prompts: list[str], reward: Reward):
        self.cfg, self.prompts, self.reward = cfg, prompts, reward

    def draw(self, rng, n_groups: int) -> list[str]:
        return rng.sample(self.prompts, min(n_groups, len(self.prompts)))

    def sample(self, policy, prompts: list[str], generators) -> tuple[Rollout, dict]:
        return policy.sample(prompts, self.cfg.response_len, generators), {}

    def score(self, policy, rollout: Rollout, terms: dict) -> dict:
        return self.reward(policy, rollout)[1]

    def scores(self, terms: dict) -> torch.Tensor:
        return self.reward.normalized(terms["total"])


def _experience(cfg, algo: Algorithm, step: int, models: Models, source, device):
    """This process samples (replies to prompts, or episodes), scores and compares with the reference its share of
    the step's responses; then the whole batch is gathered. Returns rollout, reward terms and reference log-probs of
    all B responses, the step's random stream, and the seconds spent sampling."""
    rng, g = step_rng(cfg.seed, step), algo.group_size(cfg)
    items = [x for x in source.draw(rng, cfg.batch_size // g) for _ in range(g)]  # prompts or episode seeds
    rows = range(len(items))[distributed.share(len(items))]
    t0 = time.perf_counter()
    with sharding.unsharded([models.policy]), distributed.agreeing():  # FSDP: whole weights for the decode loop;
        rollout, terms = source.sample(models.policy, items[rows.start: rows.stop],  # an environment that fails
                                       row_generators(cfg.seed, step, rows, device))  # on one process stops all
    sample_s = time.perf_counter() - t0
    models.policy.prepare(rollout)  # outside the inference mode below; a no-op where sampling kept it
    with distributed.agreeing():  # a reward that fails on one process (a NaN, a user function) stops all of them
        terms = source.score(models.policy, rollout, terms)
    with torch.inference_mode():  # in minibatches: a whole batch's logits at once would be the step's peak memory
        ref_logprobs = in_minibatches(lambda r: models.ref(r, entropy=False)[0], rollout, cfg.minibatch_size)
        values = None if models.value_model is None else \
            in_minibatches(lambda r: models.value_model(r, entropy=False)[1], rollout, cfg.minibatch_size)
    if values is not None:
        rollout.values = values.clone()  # clones leave inference mode: the losses read them
    gather = distributed.gather_rows
    terms = {k: gather(v.to(device)) for k, v in terms.items()}
    rollout = distributed.gather_rollout(rollout)
    return rollout, terms, gather(ref_logprobs.clone()), rng, sample_s


def check(cfg, algo: Algorithm, n_prompts: int) -> None:
    if not cfg.policy:
        raise ConfigError(f"{cfg.algorithm} needs --policy (a generator run, an RL run, a causal LM, or smollm2)")
    g = algo.group_size(cfg)
    if cfg.batch_size % g or cfg.batch_size < g:
        raise ConfigError(f"batch_size={cfg.batch_size} must be a multiple of group_size={g}")
    if algo.check is not None:
        algo.check(cfg)
    if cfg.env.name:
        cfg.env.check()
    else:
        rewards.check(cfg.reward)  # before any model loads
    batch = min(cfg.batch_size // g, n_prompts) * g  # fewer prompts than batch_size // g make a smaller batch
    k, last = distributed.world_size(), batch % cfg.minibatch_size or cfg.minibatch_size
    if min(batch, cfg.minibatch_size, last) < k:
        raise ConfigError(f"with {k} processes every minibatch needs at least {k} responses; raise batch_size "
                          f"and minibatch_size (now {cfg.batch_size} and {cfg.minibatch_size})")


def samples_so_far(run_dir: RunDir, cfg, last_step: int) -> str:
    """samples.md's tables up to `last_step` (all that a resumed run keeps)."""
    text = f"# Sample responses during {cfg.algorithm} training\n"
    if last_step > 0 and run_dir.samples.is_file():
        head, *sections = run_dir.samples.read_text(encoding="utf-8").split("\n## step ")
        text = head + "".join(f"\n## step {s}" for s in sections if int(s.split("\n", 1)[0]) <= last_step)
    return text


class RLJob(PolicyJob):
    """RL as a job of the shared runner: the models, reward and prompts; one iteration per step."""

    stage, scheduler, kept = "rl", None, ("train_s",)
    progress_keys = {"reward": "reward/mean", "kl": "objective/kl"}

    def __init__(self, cfg: RLConfig):
        self.cfg, self.algo = cfg, registry.get(cfg.algorithm)
        self.name = self.algorithm = cfg.algorithm
        self.title = self.algo.title  # the model card's method
        self.base, self.steps = cfg.policy, cfg.steps
        self.train_s, self.samples, self.clock = 0.0, "", None

    def setup(self, run: runner.Run) -> None:
        cfg, algo, device = self.cfg, self.algo, run.device
        check(cfg, algo, cfg.batch_size)
        policy = load_policy(cfg.policy, device, value_head=algo.critic and cfg.critic == "head",
                             frozen_fraction=FROZEN_FRACTION, **cfg.policy_options.as_kwargs())
        record_frozen(policy, cfg.policy_options, run.say)  # before the reference, which takes the same blocks
        value_model = policy.critic_copy() if algo.critic and cfg.critic == "separate" else None
        ref = load_reference(cfg.ref_policy, device, **cfg.policy_options.as_kwargs()) if cfg.ref_policy \
            else policy.frozen_copy()
        self.models = Models(policy, ref, value_model)
        if cfg.train.lr is None:  # recorded in config.yaml, which is written after this
            cfg.train.lr = default_lr(policy.kind, algo)
        self.guards = Guards(cfg.guards, cfg.kl_target, algo.group_size(cfg))
        if cfg.env.name:  # episodes: the environment scores every turn
            rl_episodes.check(cfg, policy)
            self.train_prompts, self.eval_prompts = env_prompts(cfg.env, cfg.prompts, cfg.data)
            self.reward, self.source = None, rl_episodes.EpisodeSource(cfg, self.train_prompts, device)
            self.eval_source = rl_episodes.EpisodeSource(cfg, self.eval_prompts, device)
        else:
            self.reward = Reward(cfg.reward, cfg.response_len, device)
            self.train_prompts, self.eval_prompts = load_prompts(cfg.prompts, cfg.data)
            self.source = PromptSource(cfg, self.train_prompts, self.reward)
            check(cfg, algo, len(self.train_prompts))
        self.optimizer = torch.optim.Adam(self.models.trainable(), lr=cfg.train.lr, fused=device.type in ("cpu", "cuda"))
        self.kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon, cfg.adaptive_kl)
        self.run = run
        what = f"episodes of {cfg.env.name}, {cfg.env.turns} turns, from" if cfg.env.name else ""
        run.say(f"{cfg.algorithm}: policy {cfg.policy} ({policy.kind}, lr {cfg.train.lr:g}), {what} {len(self.train_prompts)} "
                f"training prompts, {len(self.eval_prompts)} held-out prompts")

    def begin(self, run: runner.Run) -> dict | None:
        self.samples = samples_so_far(run.dir, self.cfg, run.done) if run.main else ""
        first = None
        if run.main and self.cfg.eval_every and run.done == 0:  # before sharding: the main process samples alone
            first = {"eval/reward": self._held_out(), "time/train_s": 0.0}
        self.models.wrap()
        return first

    def _held_out(self) -> float:
        if self.cfg.env.name:  # the mean episode reward of held-out episodes (their seeds 0, 1, ...)
            n = min(self.cfg.prompts.max_eval, self.cfg.batch_size)
            episodes = self.eval_source.play(self.models.policy, list(range(n)), row_generators(self.cfg.seed, 0, range(n), self.run.device))
            return episodes.episode_reward(self.cfg.env.reward).mean().item()
        return held_out_reward(self.models.policy, self.reward, self.eval_prompts, self.cfg)

    def step(self, step: int) -> dict | None:
        cfg, models, t0 = self.cfg, self.models, time.time()
        self.clock = self.clock or time.perf_counter()  # a run's (or a resumed run's) first step starts it
        release_freed_memory()  # the last update's
        rollout, terms, ref_logprobs, rng, sample_s = _experience(cfg, self.algo, step, models, self.source,
                                                                  self.run.device)
        mask, total = rollout.response_mask, terms["total"]
        kl = kl_terms(cfg, rollout.logprobs, ref_logprobs, mask)
        with torch.no_grad():
            batch = self.algo.advantages(cfg, rollout, self.source.scores(terms), kl, self.kl_ctl.value)
        t1 = time.time()
        release_freed_memory()  # the decode loop's growing KV caches leave the heap in holes glibc keeps
        stats = _update(cfg, self.algo, models, self.optimizer, batch, self.kl_ctl.value, rng)
        row = _row(total, terms, kl, self.kl_ctl.value, rollout, stats, batch, self.algo.group_size(cfg)) | {
            "time/rollout_s": t1 - t0, "time/sample_s": sample_s, "sample/decode_steps": rollout.response_ids.size(1),
            "sample/prompt_len": rollout.prompt_ids.size(1), "time/update_s": time.time() - t1}
        for line in self.guards.check(step, row):  # the same rows on every process: all stop together under strict
            self.run.say(line)
        if distributed.world_size() > 1:  # 0 while every process holds the same weights, as it must
            row["dist/param_spread"] = distributed.spread(models.trainable())
        self.kl_ctl.update(row["objective/kl"], len(rollout.prompts))
        evaluating = bool(cfg.eval_every) and step % cfg.eval_every == 0
        with sharding.unsharded([models.policy] if evaluating else []):  # FSDP: the main process samples alone
            return self._logged(step, row, rollout, terms) if self.run.main else None

    def _logged(self, step: int, row: dict, rollout: Rollout, terms: dict) -> dict:
        """The row as logged (the main process): memory, held-out reward, and the samples table."""
        now = time.perf_counter()  # wall time between step ends, as benchmarks time TRL's trainer (its callbacks)
        self.train_s, self.clock = self.train_s + now - self.clock, now
        if self.cfg.eval_every and step % self.cfg.eval_every == 0:
            row |= {"eval/reward": self._held_out(), "time/train_s": self.train_s}
            self.clock += time.perf_counter() - now  # held-out evaluation is not training time
        if step == 1 or step % self.cfg.sample_every == 0:
            table = rl_episodes.sample_conversations if self.cfg.env.name else sample_table
            self.samples += table(step, rollout, terms)
            atomic_write_text(self.run.dir.samples, self.samples)
        return row | memory_report(self.modules(), self.optimizer)

    def policies(self) -> dict:
        return {"policy": self.models.policy, "value_model": self.models.value_model}

    def save(self, folder: Path) -> dict:
        moments = self.reward.moments.state() if self.reward is not None and self.reward.moments else None
        return super().save(folder) | {"kl_coef": self.kl_ctl.value, "reward_moments": moments,
                                       "guards": self.guards.state()}

    def load(self, folder: Path, state: dict) -> None:
        super().load(folder, state)
        self.kl_ctl.value = float(state["kl_coef"])
        self.guards.load(state.get("guards"))
        if self.reward is not None and self.reward.moments is not None and state.get("reward_moments"):
            self.reward.moments = RunningMoments(**state["reward_moments"])

    def resumed(self, changed: dict) -> None:
        """--kl_coef given on resume restarts the KL controller from it (the checkpoint holds where it had got to)."""
        if "kl_coef" in changed:
            self.kl_ctl.value = self.cfg.kl_coef

    def end(self) -> None:
        self.models.train_policy = self.models.train_critic = None

    def modules(self) -> list:
        return [self.models.policy, self.models.ref, self.models.value_model]

    def finish(self, run: runner.Run) -> dict:
        training_plots(run.metrics, run.dir, self.algo.critic)
        if self.cfg.env.name:
            results = evaluate_episodes(self.models.policy, self.models.ref, self.eval_source.make, self.cfg,
                                        self.cfg.prompts.max_eval, seed=self.cfg.seed)
        else:
            results = evaluate_policy(self.models.policy, self.models.ref, self.reward, self.eval_prompts, self.cfg,
                                      seed=self.cfg.seed)
        return results | ({"health": self.guards.fired} if self.cfg.guards != "off" else {})

    def report(self, run: runner.Run, results: dict) -> None:
        (episode_report if self.cfg.env.name else rl_report)(run.dir, results, self.cfg)
        run.say(f"held-out reward: reference {results['reward_reference']:.3f} -> policy "
                f"{results['reward_policy']:.3f}, win rate {results['win_rate']:.2f}, KL {results['kl']:.2f} nats; "
                "memory: " + ", ".join(f"{k.split('/')[1]} {v:.1f} MB" for k, v in results["memory"].items()))


def _row(total, terms, kl, kl_coef, rollout: Rollout, stats: dict, batch: Batch, group_size: int) -> dict:
    mask = rollout.response_mask
    tokens = mask.sum(1)
    row = {"reward/mean": total.mean().item(), "reward/std": total.std().item() if len(total) > 1 else 0.0,
           **{f"reward/{k}": v.mean().item() for k, v in terms.items() if k != "total" and not k.startswith("_")},
           "objective/kl": kl.k1.mean().item(), "objective/kl_coef": kl_coef,
           "objective/entropy": masked_mean(rollout.entropy, mask).item(), **stats,
           "response/length": tokens.float().mean().item(), "response/ended": rollout.ended.float().mean().item(),
           "response/distinct_2": distinct_n(rollout.texts, 2),
           "response/ref_ppl": perplexity(response_nll(kl.ref_logprobs, mask), tokens)}
    if group_size > 1:  # groups whose responses all scored the same: the group baseline leaves them no advantage
        groups = total.view(-1, group_size)  # (B / G, G)
        row["reward/flat_groups"] = (groups.max(1).values - groups.min(1).values <= 1e-6).float().mean().item()
    if batch.returns is not None:
        row["value/explained_var"] = explained_variance(batch.old_values, batch.returns, mask)
    return row


def train(cfg: RLConfig, resume: str | Path | None = None, overwrite: bool = False) -> Path | None:
    """Rollout, score, KL against the reference, advantages, clipped updates; returns the run directory (None on
    the other processes under torchrun). `resume` continues a run from its last checkpoint."""
    return runner.run(RLJob(cfg), cfg, resume, overwrite)
