"""Iterated RLHF in one command: `minirlhf loop --policy P --rounds R --labels N [--method ppo|grpo|dpo]
[--annotator web|simulate:JUDGE]`.

Each round, in its own folder `round-K/` of the run:
  1. pairs: two samples of the current policy per prompt, served on the feedback page (`round-K/feedback.sqlite`;
     after the first round, with `select=uncertain`, the pairs the last reward model is least sure about first);
  2. labels: N judgements, from people (`web`: the admin link is printed and the round waits) or from the
     simulated annotator (`simulate:JUDGE`), which judges through the same page over HTTP;
  3. reward model: retrained on every label so far, starting from the last round's (a warm start); a share of each
     round's labels (by prompt) is held out to measure it;
  4. policy: trained from where it is, against the reference fixed at the first round's policy: RL against the new
     reward model, or (`dpo`) online DPO on the round's new pairs;
  5. a row of report.md: labels so far, the reward model's held-out accuracy, the gold judge's reward (the
     simulated annotator's judge, or `gold`), KL from the reference, win rate against the previous round.

With `--env constraints|judge [--env.turns=T]` the rounds are on whole episodes: pairs are two conversations from one
opening, judged whole, the reward model learns from conversations, and the policy's RL plays episodes of that
environment scored by the round's reward model (loop_episodes.py says how).

A round is a step of the shared runner: the checkpoint after each holds the rows so far. Each sub-stage is a run of
its own that resumes from its own checkpoint, so `--resume` after a crash picks up at the round and step reached.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from minirlhf import ConfigError, RunError, runner
from minirlhf.rl import registry
from minirlhf.stages import dpo
from minirlhf.stages.reward_model import RewardModelConfig, RewardModelModelConfig, RewardModelTrainConfig
from minirlhf.stages.reward_model import train as train_reward_model
from minirlhf.report import md_cell, table, write_report
from minirlhf.stages.evaluate import evaluate_policy
from minirlhf.checkpoint import atomic_write_text, load_json
from minirlhf.config import DataConfig, TrainingRunConfig, load_config, setting
from minirlhf.data.preferences import read_pairs, split_pairs
from minirlhf.data.prompts import PromptConfig, load_prompts
from minirlhf.envs.base import EnvConfig
from minirlhf.feedback import loop_episodes
from minirlhf.feedback.episode_pairs import make_pool
from minirlhf.feedback.loop_stages import POLICY_ROUNDS, rl_stage, run_settings
from minirlhf.feedback.pairs import AnnotatorConfig, PageConfig, Sampling, Source
from minirlhf.feedback.simulate import judge_agreement, reward_of, simulate
from minirlhf.feedback.store import Store, export_jsonl
from minirlhf.models.judge import load_judge
from minirlhf.models.load import PolicyOptions, load_policy, load_reference
from minirlhf.rundir import RoundDir, RunDir


@dataclass
class LoopConfig(PageConfig, AnnotatorConfig, TrainingRunConfig):
    policy: str = setting("", fixed_on_resume=True)
    """the first round's policy, and every round's reference: a generator run, an RL/DPO/SFT run, a causal LM
    folder or hub name, or `smollm2`"""
    policy_options: PolicyOptions = setting(default_factory=PolicyOptions, fixed_on_resume=True)
    """how a causal LM policy is set up"""
    rounds: int = setting(3, ge=1)
    """rounds of pairs, labels, reward model and policy training"""
    labels: int = setting(100, ge=2)
    """judgements collected per round"""
    method: str = "ppo"
    """how the policy learns: an RL algorithm against the reward model (ppo, grpo, rloo, a2c, dr-grpo), or `dpo`
    (online DPO on the round's new pairs)"""
    annotator: str = "web"
    """`web` (people on the page: the round prints the admin link and waits) or `simulate:JUDGE` (the simulated
    annotator, JUDGE a classifier run, a reward-model run or module:function)"""
    gold: str = ""
    """the judge whose reward report.md gives (default: the simulated annotator's judge; none for `web`)"""
    temperature: float = setting(1.0, gt=0)
    """sampling temperature of the pairs"""
    response_len: int = setting(16, ge=1)
    """tokens per response at most (pairs, RL and evaluation)"""
    heldout_fraction: float = setting(0.2, gt=0, le=0.5)
    """share of each round's labels, by prompt, held out to measure the reward model"""
    steps: int = setting(20, ge=1)
    """policy steps per round"""
    kl_coef: float | None = None
    """the strength of the KL constraint: RL's kl_coef or DPO's beta (None: the method's default)"""
    policy_args: list[str] = field(default_factory=list)
    """more settings of the policy stage, e.g. [--batch_size=16, --train.lr=1e-5]"""
    reward_model: RewardModelModelConfig = field(default_factory=RewardModelModelConfig)
    """the reward model (its `init` is set by the loop)"""
    reward_model_train: RewardModelTrainConfig = field(default_factory=RewardModelTrainConfig)
    """how each round's reward model is trained"""
    ensemble: int = setting(1, ge=1, le=16, fixed_on_resume=True)
    """members of each round's reward model (`train-reward-model --ensemble`); the policy stage combines them as
    policy_args say (e.g. [--reward.ensemble=uwo]; default their mean)"""
    data: DataConfig = setting(default_factory=DataConfig, fixed_on_resume=True)
    """the corpus whose texts' first words are the prompts (unless prompts.file is set)"""
    prompts: PromptConfig = setting(default_factory=PromptConfig, fixed_on_resume=True)
    """training prompts answer the pairs and train the policy; held-out prompts evaluate it"""
    env: EnvConfig = field(default_factory=EnvConfig)
    """`--env constraints|judge`: rounds on whole episodes (loop_episodes.py); `response_len` is then per turn"""
    eval_batch_size: int = setting(32, ge=1)
    """responses sampled at once when evaluating"""
    port: int = 0
    """the port the page listens on (0: a free one, printed)"""
    wait_s: float = setting(86400.0, gt=0)
    """how long a round waits for its labels, in seconds"""
    save_every: int = 1


def _judge_spec(cfg: LoopConfig) -> str:
    return cfg.annotator.split(":", 1)[1] if cfg.annotator.startswith("simulate:") else ""


def check(cfg: LoopConfig) -> None:
    if not cfg.policy:
        raise ConfigError("loop needs --policy (a generator run, a causal LM, or smollm2)")
    if cfg.method != "dpo":
        try:
            registry.get(cfg.method)  # an RL algorithm, spelt as its command (dr-grpo) or as its config (dr_grpo)
        except ConfigError as e:
            raise ConfigError(f"--method must be dpo or an RL algorithm: {e}") from e
    if cfg.annotator != "web" and not _judge_spec(cfg):
        raise ConfigError(f"--annotator must be web or simulate:JUDGE, got {cfg.annotator!r}")
    if cfg.env.name:
        loop_episodes.check(cfg)
    stage = dpo.DPOConfig if cfg.method == "dpo" else registry.get(cfg.method).config
    try:  # now, not after the first round's labels
        load_config(stage, overrides=cfg.policy_args)
    except ConfigError as e:
        raise ConfigError(f"--policy_args: {e}") from e


def run_stage(train, stage_cfg, folder: Path) -> Path:
    """A sub-stage run in `folder`: started, or resumed from its checkpoint after a crash, or left as it is when
    it has finished."""
    found = RunDir.find(folder)
    if found is not None and found.results.is_file():
        return folder
    return Path(train(dataclasses.replace(stage_cfg, out=str(folder)), resume=folder if found is not None else None))


@dataclass(frozen=True)
class Round(RoundDir):
    """Round k: its files (RunDir.round) and what it starts from."""

    k: int
    policy: str
    """the policy the round samples pairs from and trains further"""
    previous_rm: str
    """the last round's reward model ("" in the first round)"""


def _ab_labels(store: Store) -> int:
    counts = store.counts()
    return counts["a"] + counts["b"]


class LoopJob:
    """The loop as a job of the shared runner: one round per step; no optimizer of its own."""

    stage, name, algorithm = "loop", "loop", None
    optimizer = scheduler = None
    progress_keys = {"gold": "gold/reward", "kl": "kl"}

    def __init__(self, cfg: LoopConfig):
        self.cfg, self.base, self.steps = cfg, cfg.policy, cfg.rounds
        self.rows: list[dict] = []
        self.policy, self.reward_model = cfg.policy, ""

    def setup(self, run: runner.Run) -> None:
        cfg, self.run = self.cfg, run
        check(cfg)
        judge = _judge_spec(cfg)
        self.judge = load_judge(judge, run.device) if judge else None
        gold = cfg.gold or judge  # episodes are scored whole, by the judge itself; replies by it as a reward
        score = (lambda spec: load_judge(spec, run.device)) if cfg.env.name else \
            (lambda spec: reward_of(spec, cfg.response_len, run.device))
        self.gold = score(gold) if gold else None
        self.train_prompts, self.eval_prompts = loop_episodes.openings(cfg) if cfg.env.name else \
            load_prompts(cfg.prompts, cfg.data)
        self.reference = load_reference(cfg.policy, run.device, **cfg.policy_options.as_kwargs())
        run.say(f"loop: {cfg.rounds} round(s) of {cfg.labels} labels ({cfg.annotator}), reward model then "
                f"{cfg.method}, from {cfg.policy}" + (f" on {loop_episodes.describe(cfg.env)}" if cfg.env.name else "")
                + f"; {len(self.train_prompts)} training prompts, "
                f"{len(self.eval_prompts)} held-out prompts" + (f"; gold judge {gold}" if gold else ""))

    def begin(self, run: runner.Run) -> dict | None:
        return None

    def step(self, step: int) -> dict:
        t0 = time.time()
        r = Round(self.run.dir.round(step).folder, step, self.policy, self.reward_model)
        r.folder.mkdir(exist_ok=True)
        self.run.say(f"round {step} of {self.cfg.rounds}: pairs from {r.policy}")
        agreement = self._collect(r)
        n_labels, held = self._split(r)
        rm_results = self._train_reward_model(r)
        self.policy = str(self._train_policy(r))
        self.reward_model = str(r.reward_model)
        row = {"round": step, "labels": n_labels, "rm/accuracy": rm_results["eval_accuracy"], "rm/heldout_pairs": held,
               "rm/length_baseline": rm_results["length_baseline"], **self._evaluate(r.policy, self.policy, step),
               "time/round_s": round(time.time() - t0, 1)}
        if agreement is not None:
            row["annotator/agreement"] = agreement
        self.rows.append(row)
        self._write_report()
        return row

    # ---------------------------------------------------------------- 1-2: pairs and labels on the page
    def _collect(self, r: Round) -> float | None:
        """The round's labels, from the page; the simulated annotator's agreement with its judge (None: people)."""
        cfg, store = self.cfg, Store(r.db)
        store.set_meta("round", r.k)  # carried by every exported label
        have = _ab_labels(store)
        if have < cfg.labels:
            from minirlhf.feedback.app import Page  # flask and waitress are needed for serving only

            select = cfg.select if r.previous_rm else "random"  # the first round has no reward model to be unsure
            source = Source(r.policy, None, self.train_prompts, options={"chat_template": cfg.policy_options.chat_template},
                            episodes=loop_episodes.describe(cfg.env) if cfg.env.name else "")
            pool = make_pool(cfg.env if cfg.env.name else None, store, source,
                             Sampling(cfg.response_len, cfg.temperature, seed=cfg.seed * 1009 + r.k), cfg.ahead,
                             overlap=0.0, device=self.run.device, select=select,
                             reward_models=[r.previous_rm] if select == "uncertain" else [])
            page = Page(store, pool, cfg.host, cfg.port)
            page.start()
            try:
                if self.judge is not None:
                    simulate(page.url, page.admin_token, self.judge, cfg.labels - have, cfg.beta, cfg.annotators,
                             seed=cfg.seed * 100_003 + r.k * 1009 + have, timeout_s=cfg.wait_s,
                             check=lambda: _raise(pool.error))
                else:
                    self._wait_for_people(r, page, store)
            finally:
                page.stop()
        return judge_agreement(store, self.judge) if self.judge is not None else None

    def _wait_for_people(self, r: Round, page, store: Store) -> None:
        cfg = self.cfg
        self.run.say(f"round {r.k}: {cfg.labels} judgements wanted; admin link (add annotators there, or judge "
                     f"yourself): {page.admin_link}")
        deadline, last = time.monotonic() + cfg.wait_s, -1
        while (n := _ab_labels(store)) < cfg.labels:
            _raise(page.pool.error)
            if time.monotonic() > deadline:
                raise RunError(f"round {r.k} has {n} of {cfg.labels} judgements after {cfg.wait_s:.0f} s; "
                               "`minirlhf loop --resume RUN_DIR` waits again (the judgements are kept)")
            if n != last:
                self.run.say(f"round {r.k}: {n} of {cfg.labels} judgements")
                last = n
            time.sleep(1.0)

    # ---------------------------------------------------------------- 3: the reward model on every label so far
    def _split(self, r: Round) -> tuple[int, int]:
        """The round's labels split by prompt into training and held-out pairs; then every round's so far, joined
        for the reward model. Returns (labels so far, held-out pairs so far)."""
        export_jsonl(r.db, r.labels)
        train, held = split_pairs(read_pairs(r.labels), self.cfg.heldout_fraction, seed=self.cfg.seed + r.k)
        write_pairs(r.train_pairs, train)
        write_pairs(r.heldout_pairs, held)
        rounds = [self._round(k) for k in range(1, r.k + 1)]
        all_train = [p for x in rounds for p in read_pairs(x.train_pairs)]
        all_held = [p for x in rounds for p in read_pairs(x.heldout_pairs)]
        write_pairs(r.rm_train, all_train)
        write_pairs(r.rm_heldout, all_held)
        return len(all_train) + len(all_held), len(all_held)

    def _train_reward_model(self, r: Round) -> dict:
        cfg = self.cfg
        rm_cfg = RewardModelConfig(
            preferences=str(r.rm_train), eval_file=str(r.rm_heldout),
            model=dataclasses.replace(cfg.reward_model, init=r.previous_rm), train=cfg.reward_model_train,
            ensemble=cfg.ensemble, seed=cfg.seed, **run_settings(cfg))
        return load_json(RunDir(run_stage(train_reward_model, rm_cfg, r.reward_model)).results)

    # ---------------------------------------------------------------- 4: the policy, from where it is
    def _train_policy(self, r: Round) -> Path:
        train, stage_cfg = POLICY_ROUNDS.get(self.cfg.method, rl_stage)(self.cfg, r)
        return run_stage(train, stage_cfg, r.policy_run)

    # ---------------------------------------------------------------- 5: the round's row
    def _evaluate(self, previous: str, current: str, k: int) -> dict:
        """Gold reward (or, without a gold judge, the round's reward model's), KL from the reference and win rates
        against the reference and the previous round, on the held-out prompts (or episodes)."""
        cfg, device = self.cfg, self.run.device
        key = "gold" if self.gold is not None else "rm"
        options = {"chat_template": cfg.policy_options.chat_template}
        policy = load_policy(current, device, value_head=False, **options)
        compare = self._comparison()
        start = compare(policy, self.reference)
        row = {f"{key}/reward": start["reward_policy"], f"{key}/reward_start": start["reward_reference"],
               "kl": start["kl"], "win_rate/vs_start": start["win_rate"], "win_rate/vs_previous": start["win_rate"]}
        if k > 1:
            row["win_rate/vs_previous"] = compare(policy, load_reference(previous, device, **options))["win_rate"]
        return row

    def _comparison(self):
        """(policy, ref) -> figures: single replies to the held-out prompts, or (--env) held-out episodes scored
        whole, by the gold judge or the round's reward model."""
        cfg, device = self.cfg, self.run.device
        if cfg.env.name:
            judge = self.gold or load_judge(self.reward_model, device)
            return lambda policy, ref: loop_episodes.evaluate(policy, ref, cfg.env, self.eval_prompts, judge,
                                                              len(self.eval_prompts), cfg.eval_batch_size,
                                                              cfg.response_len, cfg.seed)
        reward = self.gold or reward_of(self.reward_model, cfg.response_len, device)
        shape = SimpleNamespace(batch_size=cfg.eval_batch_size, response_len=cfg.response_len)
        return lambda policy, ref: evaluate_policy(policy, ref, reward, self.eval_prompts, shape, seed=cfg.seed)

    def _round(self, k: int) -> Round:
        """Round k's files, as a finished round reads them."""
        return Round(self.run.dir.round(k).folder, k, "", "")

    # ---------------------------------------------------------------- the runner's side
    def save(self, folder: Path) -> dict:
        """The rows so far and where the next round starts; `policy_run` (relative) lets `--policy LOOP_RUN` work."""
        return {"rows": self.rows, "policy": self.policy, "reward_model": self.reward_model,
                "policy_run": str(self._round(len(self.rows)).policy_run.relative_to(self.run.dir.path))}

    def load(self, folder: Path, state: dict) -> None:
        self.rows, self.policy, self.reward_model = state["rows"], state["policy"], state["reward_model"]

    def end(self) -> None:
        return None

    def modules(self) -> list:
        return [self.reference]

    def finish(self, run: runner.Run) -> dict:
        key = "gold" if self.gold is not None else "rm"
        run.metrics.plot(run.dir.plot("reward"), [f"{key}/reward", "rm/accuracy", "win_rate/vs_previous"],
                         "per round: reward, reward-model accuracy, win rate", x="round")
        run.metrics.plot(run.dir.plot("kl"), ["kl"], "KL from the reference per response (nats)", x="round")
        return {"rounds": self.rows, "policy": self.policy, "reward_model": self.reward_model}

    def report(self, run: runner.Run, results: dict) -> None:
        last = self.rows[-1]
        key = "gold" if self.gold is not None else "rm"
        run.say(f"after {len(self.rows)} round(s), {last['labels']} labels: reward-model accuracy "
                f"{last['rm/accuracy']:.3f}, {key} reward {last[f'{key}/reward_start']:.3f} -> {last[f'{key}/reward']:.3f}, "
                f"KL {last['kl']:.2f} nats; policy {self.policy}; report {run.dir.report}")

    def _write_report(self) -> None:
        loop_report(self.run.dir, self.cfg, self.rows, self.gold is not None)


def _raise(error: BaseException | None) -> None:
    if error is not None:
        raise error


def write_pairs(path: Path, pairs) -> None:
    atomic_write_text(path, "".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected},
                                               ensure_ascii=False) + "\n" for p in pairs))


def loop_report(run_dir, cfg: LoopConfig, rows: list[dict], gold: bool) -> Path:
    """report.md of a loop: how each round is scored, and a row per finished round."""
    key = "gold" if gold else "rm"
    what = "gold judge's reward" if gold else "round's reward model's reward (no gold judge)"
    scored = (f"held-out {loop_episodes.describe(cfg.env)} (one per held-out prompt, seeds 0..n-1), each scored "
              "whole") if cfg.env.name else "one response per held-out prompt"
    header = ["round", "labels", "RM held-out accuracy (pairs)", "length baseline", "reward (start)", "KL",
              "win vs previous", "win vs start", "annotator agreement", "seconds"]
    table_rows = [[row["round"], row["labels"], f"{row['rm/accuracy']:.3f} ({row['rm/heldout_pairs']})",
                   f"{row['rm/length_baseline']:.3f}", f"{row[f'{key}/reward']:.3f} ({row[f'{key}/reward_start']:.3f})",
                   f"{row['kl']:.2f}", f"{row['win_rate/vs_previous']:.2f}", f"{row['win_rate/vs_start']:.2f}",
                   "" if row.get("annotator/agreement") is None else f"{row['annotator/agreement']:.2f}",
                   f"{row['time/round_s']:.0f}"] for row in rows]
    return write_report(
        run_dir, f"minirlhf loop: {cfg.method} from {md_cell(cfg.policy)}",
        f"{cfg.labels} labels a round from `{md_cell(cfg.annotator)}`"
        + (f" (beta {cfg.beta})" if cfg.annotator != "web" else "") + f"; pairs served {cfg.select} first after "
        f"round 1; {cfg.steps} policy steps a round; the reference is the first policy throughout.",
        f"Reward: the {what} of {scored} (the first policy: its `start` column). KL: per "
        f"{'episode' if cfg.env.name else 'response'}, in nats, from the reference. Win rates: against the "
        "reference and the previous round's policy, ties half.",
        table(header, table_rows))


def train(cfg: LoopConfig, resume: str | Path | None = None, overwrite: bool = False) -> Path:
    """Run the rounds (from RUN_DIR's last finished round with `resume`); returns the run directory."""
    return runner.run(LoopJob(cfg), cfg, resume, overwrite)
