"""What the feedback pairs compare, and the thread that keeps them coming.

An RL run (with a checkpoint) is put against its reference, the policy it started from,
on its own held-out prompts: the judgements then give the policy's win rate as people see it. Any other policy
(a generator run, a model folder or name, `smollm2`, the default) is put against itself: two samples for the same
prompt, the raw material of a preference data set. Which response is A is a coin flip per pair; every response keeps
the model and sampling settings that produced it, with its own seed, so it can be reproduced.

Each policy has a database of its own by default (`default_db`): an RL run's beside it, in RUN_DIR/feedback.sqlite,
any other's under runs/feedback/, named after it.
"""

from __future__ import annotations

import dataclasses
import random
import re
import threading
from dataclasses import dataclass, field
from typing import Literal
from pathlib import Path

import torch

from minirlhf import ConfigError, ModelError
from minirlhf.stages.evaluate import rl_run
from minirlhf.config import DataConfig, setting
from minirlhf.data.dialogue import dialogue_text
from minirlhf.data.prompts import PromptConfig, first_words, load_prompts, read_prompts
from minirlhf.data.sentiment import load_splits
from minirlhf.feedback.purpose import purpose
from minirlhf.models.load import load_policy, policy_folder, policy_kind
from minirlhf.models.policy import SamplingConfig, sample_with
from minirlhf.models.pretrained import SMOLLM2
from minirlhf.models.reward_model import RewardModel
from minirlhf.rundir import RunDir

DEFAULT_POLICY = SMOLLM2
"""what `feedback serve` compares without --policy: two samples of it (an RL run is served only when named)"""
CORPUS_TEMPLATE = 'Write a short tweet that starts with "{prompt}".'
"""how a chat model is asked about the corpus's first words (an LSTM just continues them)"""


@dataclass
class Sampling(SamplingConfig):
    """How the responses of the pairs are sampled; each response records these, with its own seed."""

    seed: int = 0
    """seeds the stream each response's own seed is drawn from (with the number of pairs stored: a restart goes on)"""


@dataclass
class PageConfig:
    """How the page serves pairs: what `feedback serve` and `loop` share."""

    host: str = "127.0.0.1"
    """where the page listens: 0.0.0.0 shares it on your network (tokens still needed)"""
    select: Literal["random", "uncertain"] = "random"
    """which fresh pair is served first: `random` (the oldest) or `uncertain` (the one the reward model(s) are least
    sure about; `loop`: the last round's, from its second round)"""
    ahead: int = setting(16, ge=1)
    """fresh pairs kept ready (with select=uncertain: the candidates the most uncertain is served from)"""


@dataclass
class AnnotatorConfig:
    """The simulated annotators: what `feedback simulate` and `loop --annotator simulate:JUDGE` share."""

    beta: float = setting(1.0, ge=0)
    """the simulated annotator prefers A with probability sigmoid(beta (r_A - r_B)): higher agrees with the judge
    more often"""
    annotators: int = setting(1, ge=1)
    """simulated annotators, taking turns"""


@dataclass
class Source:
    """A policy and, for an RL run, its reference; and the prompts both answer."""

    policy: str
    """what load_policy reads: a run directory, a model folder or a model name"""
    reference: str | None
    """an RL run's starting policy; None for two samples of `policy`"""
    prompts: list[str]
    step: int | None = None
    """the RL checkpoint's step"""
    options: dict = field(default_factory=dict)
    """causal LM options the run was trained with (chat_template)"""
    prompts_from: str = "given"
    """where the prompts came from, as a database records it: a file, or the run's or the corpus's own"""
    episodes: str = ""
    """what each side of a pair is when it is a whole episode (episode_pairs.py), e.g. "constraints episodes of 3
    turns"; empty: a single reply"""

    def describe(self) -> str:
        on = f"{len(self.prompts)} {'openings' if self.episodes else 'prompts'}"
        if self.reference is None:
            return f"two {self.episodes or 'samples'} of {self.policy} on {on}"
        return (f"RL run {self.policy} (step {self.step}) against its reference {self.reference} "
                f"on {len(self.prompts)} held-out prompts" + (f", as {self.episodes}" if self.episodes else ""))


def corpus_prompts(template: str) -> list[str]:
    """The first words of the default corpus's texts, as RL training uses them, put in `template`."""
    splits = load_splits(DataConfig())
    words = first_words([t for t, _ in splits.train + splits.val], PromptConfig().words)
    return [template.replace("{prompt}", w) for w in words]


def resolve_source(policy: str, prompts_file: str | None) -> Source:
    """--policy and --prompts, checked before serving: an RL run against its reference, else two samples."""
    found = RunDir.find(policy)
    if found is not None and found.stage == "rl":
        return run_source(found.path, prompts_file)
    if prompts_file is not None:
        return Source(policy, None, read_prompts(prompts_file), prompts_from=_spec(prompts_file))
    is_lstm = policy_kind(policy_folder(policy)) == "lstm"
    return Source(policy, None, corpus_prompts("{prompt}" if is_lstm else CORPUS_TEMPLATE), prompts_from="corpus")


def run_source(path: Path, prompts_file: str | None) -> Source:
    """An RL run against its reference on its held-out prompts (or --prompts), templated as in training."""
    run, cfg = rl_run(path)
    prompt_cfg = dataclasses.replace(cfg.prompts, max_eval=10 ** 9)
    if prompts_file is not None:
        prompt_cfg = dataclasses.replace(prompt_cfg, eval_file=prompts_file)
    _, held = load_prompts(prompt_cfg, cfg.data)
    return Source(str(path), cfg.ref_policy or cfg.policy, held, run.checkpoint_step(),
                  {"chat_template": cfg.policy_options.chat_template},
                  _spec(prompts_file) if prompts_file is not None else "the run's held-out")


def default_db(policy: str, root: Path = Path("runs")) -> Path:
    """The database of `policy` when --db is not given: an RL run's RUN_DIR/feedback.sqlite, else
    runs/feedback/NAME.sqlite, NAME the policy as given (a path: relative to here where it is inside) made safe."""
    found = RunDir.find(policy)
    if found is not None and found.stage == "rl":
        return found.feedback
    name = policy
    if Path(policy).exists():
        here, path = Path.cwd().resolve(), Path(policy).resolve()
        name = str(path.relative_to(here)) if path.is_relative_to(here) else str(path)
    return root / "feedback" / f"{re.sub(r'[^A-Za-z0-9._-]+', '-', name).strip('.-')[:120] or 'policy'}.sqlite"


def made_for(source: Source, sampling: Sampling) -> dict:
    """What a database of these pairs is for (purpose.py): the models as provenance names them, the prompts and the
    sampling settings."""
    return purpose(_spec(source.policy), _spec(source.reference) if source.reference else None, source.step,
                   source.prompts_from, dataclasses.asdict(sampling))


def _spec(spec: str) -> str:
    """A model spec as provenance: a path made absolute, so it still names the model from elsewhere."""
    return str(Path(spec).resolve()) if Path(spec).exists() else spec


SELECT = ("random", "uncertain")
"""which fresh pair is served first: the oldest, or the one the reward model(s) are least sure about"""


def check_selection(select: str, reward_models: list[str]) -> None:
    if select not in SELECT:
        raise ConfigError(f"--select must be one of {', '.join(SELECT)}, got {select!r}")
    if select == "uncertain" and not reward_models:
        raise ConfigError("--select uncertain needs a reward model to be unsure: add --reward-model RM_RUN "
                          "(one or more; several make an ensemble)")
    for spec in reward_models:
        found = RunDir.find(spec)
        if found is None or found.stage != "reward_model":
            raise ConfigError(f"--reward-model {spec} is not a reward-model run; train one with "
                              "`minirlhf train-reward-model`")


def uncertainty(reward_models: list, prompts: list[str], responses_a: list[str], responses_b: list[str]) -> list[float]:
    """How unsure the reward models are which response is better, per pair: with one model 0.5 - |P(A) - 0.5|, where
    P(A) = sigmoid(r_A - r_B) is its Bradley–Terry probability that A is preferred; with several (an ensemble), the
    standard deviation of their P(A) (how much they disagree). Higher is served sooner."""
    probs = torch.stack([torch.sigmoid(rm.score([dialogue_text(p, a) for p, a in zip(prompts, responses_a)])
                                       - rm.score([dialogue_text(p, b) for p, b in zip(prompts, responses_b)]))
                         for rm in reward_models])  # (models, pairs)
    if len(reward_models) == 1:
        return (0.5 - (probs[0] - 0.5).abs()).tolist()
    return probs.std(0).tolist()


class PairPool(threading.Thread):
    """Keeps `ahead` fresh pairs in the store, in batches of `batch_size` (0: 16 for an LSTM, 2 for a causal LM, so
    that a stop waits for little); `overlap` of them are wanted twice. With `select="uncertain"` each pair gets its
    `uncertainty` under `reward_models` (run directories) as its priority: the `ahead` fresh pairs are the
    candidates that the most uncertain is served from.

    `state` is "loading", "running" or "failed" (then `error` holds why; serve's main thread raises it)."""

    def __init__(self, store, source: Source, sampling: Sampling, ahead: int = 16, overlap: float = 0.2,
                 device="cpu", batch_size: int = 0, select: str = "random", reward_models: tuple[str, ...] = ()):
        super().__init__(daemon=True, name="minirlhf-pairs")
        self.store, self.source, self.sampling, self.device = store, source, sampling, device
        self.ahead, self.overlap, self.batch_size = ahead, overlap, batch_size
        self.select, self.reward_model_runs, self.reward_models = select, list(reward_models), []
        self.state, self.error = "loading", None
        self.generated = self.identical = 0
        self.halt = threading.Event()

    def run(self) -> None:
        try:
            self._load()
            self.state = "running"
            while not self.halt.is_set():
                missing = self.ahead - self.store.fresh()
                if missing <= 0:
                    self.halt.wait(0.25)
                    continue
                self._add_batch(min(missing, self.batch_size))
        except BaseException as e:  # noqa: BLE001 (handed to the main thread, which reports it)
            self.error, self.state = e, "failed"

    def _load(self) -> None:
        src = self.source
        self.policy = load_policy(src.policy, self.device, value_head=False, **src.options)
        self.reference = None if src.reference is None else \
            load_policy(src.reference, self.device, value_head=False, **src.options)
        self.batch_size = self.batch_size or (16 if self.policy.kind == "lstm" else 2)
        if self.select == "uncertain":
            self.reward_models = [member for run in self.reward_model_runs  # an ensemble run: each member
                                  for member in RewardModel.from_run(run, self.device).as_members()]
        # Seeded by the seed and the pairs already stored: a restart continues with new samples, not repeats.
        self.rng = random.Random(f"{self.sampling.seed}-{self.store.counts()['pairs']}")

    def _sample(self, model, prompts: list[str]) -> list[tuple[str, int]]:
        """(response, seed) per prompt; one generator per row, so each response depends on its seed alone."""
        seeds = [self.rng.randrange(2 ** 31) for _ in prompts]
        generators = [torch.Generator(device=self.device).manual_seed(seed) for seed in seeds]
        rollout = sample_with(model, prompts, self.sampling, generators)
        return list(zip(rollout.texts, seeds))

    def _provenance(self, role: str, seed: int) -> dict:
        s, src = self.sampling, self.source
        return {"model": _spec(src.reference if role == "reference" else src.policy), "role": role,
                "step": src.step if role == "policy" else None, "temperature": s.temperature, "top_p": s.top_p,
                "top_k": s.top_k, "max_new_tokens": s.max_new_tokens, "seed": seed}

    def _add_batch(self, n: int) -> None:
        prompts = [self.rng.choice(self.source.prompts) for _ in range(n)]
        if self.reference is None:  # two samples of one policy: one batch of 2n rows
            both = self._sample(self.policy, prompts + prompts)
            first, second, roles = both[:n], both[n:], ("sample", "sample")
        else:
            first, second = self._sample(self.policy, prompts), self._sample(self.reference, prompts)
            roles = ("policy", "reference")
        priorities = uncertainty(self.reward_models, prompts, [t for t, _ in first], [t for t, _ in second]) \
            if self.reward_models else [0.0] * n  # symmetric in A and B: computed before the sides are shuffled
        for prompt, (text1, seed1), (text2, seed2), priority in zip(prompts, first, second, priorities):
            if text1.strip() == text2.strip():  # nothing to choose between
                self.identical += 1
                continue
            sides = [(text1, self._provenance(roles[0], seed1)), (text2, self._provenance(roles[1], seed2))]
            self.rng.shuffle(sides)
            wanted = 2 if self.rng.random() < self.overlap else 1
            self.store.add_pair(prompt, sides[0][0], sides[1][0], sides[0][1], sides[1][1], wanted, priority)
            self.generated += 1
        if self.generated == 0 and self.identical >= 50:
            raise ModelError(f"the two responses were identical {self.identical} times; sample more freely "
                            "(raise --temperature or --top-p) or give a policy that has changed")
