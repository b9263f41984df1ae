"""The RLHF reward: a weighted sum of named terms, each (B,) per batch of responses.

Terms: `classifier` (the stage-1 classifier's positive logit), `reward_model` (a Bradley–Terry reward model's
score of the whole dialogue, standardised by its training statistics; an ensemble's members combined by
`ensemble`, their disagreement logged as `ensemble_std`), `unended` (1 for a response that hit the
length limit without ending), `length` (response tokens / response_len), `repetition` (share of repeated
word bigrams) and `function` (a user function given as `module:function`). Penalties are negative
weights, e.g. `--reward.unended_weight=-1`. The sequence score lands on the last real token (ops.token_rewards).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from minirlhf.config import setting
from minirlhf import ConfigError, ModelError, RunError
from minirlhf.data.dialogue import dialogue_text
from minirlhf.data.vocab import tokenize
from minirlhf.models.classifier import SentimentClassifier
from minirlhf.models.judge import load_function, load_judge
from minirlhf.models.reward_model import RewardModel, combine
from minirlhf.rundir import RunDir

TERMS = ("classifier", "reward_model", "unended", "length", "repetition", "function")


@dataclass
class RewardConfig:
    classifier: str = ""
    """run directory of a stage-1 sentiment classifier (`minirlhf train-classifier`); its positive logit is the `classifier` term"""
    train_missing: bool = False
    """train that classifier first (on `data`, with the demo's quick settings) when the directory does not exist yet
    (done by the command, before the run: a reward never trains anything)"""
    classifier_weight: float = 1.0
    """weight of the classifier's positive logit (used when `classifier` is set, or when no reward model is)"""
    reward_model: str = ""
    """run directory of a preference reward model (`minirlhf train-reward-model`); its standardised score of the
    whole dialogue, prompt and response, is the `reward_model` term"""
    reward_model_weight: float = 1.0
    """weight of the reward model's score; at 0 it is still scored and logged (reward/reward_model, and an
    ensemble's reward/ensemble_std), so a run trained on another reward can be watched by the guard"""
    ensemble: Literal["mean", "wco", "uwo", "single"] = "mean"
    """how a reward-model ensemble's (`train-reward-model --ensemble K`) standardised scores become one: `mean`,
    `wco` (worst case: their minimum) or `uwo` (uncertainty-weighted: mean - uwo_lambda x variance), Coste et al.
    (ICLR 2024), or `single` (the first member alone: one reward model, the others only watched for the
    over-optimisation guard); every step logs reward/ensemble_std, the members' disagreement on the policy's samples"""
    uwo_lambda: float = setting(1.0, ge=0)
    """the variance's weight under ensemble=uwo (standardised members: 1 costs a response as much as one std of
    reward per unit of variance)"""
    unended_weight: float = 0.0
    """weight of `unended` (1 when a response never produced end-of-text); negative penalises"""
    length_weight: float = 0.0
    """weight of `length`, the response's share of response_len"""
    repetition_weight: float = 0.0
    """weight of `repetition`, the share of the response's word bigrams seen before in it; negative penalises"""
    function: str | None = None
    """a user reward `module:function` taking (prompts, responses) lists of str, returning one float per response"""
    function_weight: float = 1.0
    """weight of the user function's value"""
    normalize: bool = False
    """divide by a running std and subtract a running mean of the total (kept across steps)"""

    monitor: str = ""
    """a judge (classifier run, reward-model run or module:function) scored on every step's samples and logged as
    reward/monitor, never added to the total: a held-out gold judge to see over-optimisation against"""


def repetition(text: str) -> float:
    """Share of word bigrams that already occurred earlier in the same text (0 for fewer than two words)."""
    words = tokenize(text)
    bigrams = list(zip(words, words[1:]))
    return 1 - len(set(bigrams)) / len(bigrams) if bigrams else 0.0


class RunningMoments:
    """Running mean and variance over every total seen so far (Chan et al.'s parallel update)."""

    def __init__(self, mean: float = 0.0, var: float = 1.0, count: int = 0):
        self.mean, self.var, self.count = mean, var, count

    def update(self, x: torch.Tensor) -> None:
        n, mean, var = x.numel(), x.mean().item(), x.var(unbiased=False).item() if x.numel() > 1 else 0.0
        total = self.count + n
        delta = mean - self.mean
        m2 = self.var * self.count + var * n + delta ** 2 * self.count * n / total
        self.mean, self.var, self.count = self.mean + delta * n / total, m2 / total, total

    def state(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}


def weighted_terms(cfg: RewardConfig) -> list[str]:
    """The terms that add to the total: a nonzero weight and something to compute them from. The classifier stands
    in when neither it nor a reward model is named (load_classifier then asks for one)."""
    sources = {"classifier": bool(cfg.classifier or not cfg.reward_model), "reward_model": bool(cfg.reward_model),
               "function": bool(cfg.function)}
    return [t for t in TERMS if getattr(cfg, f"{t}_weight") != 0 and sources.get(t, True)]


def check(cfg: RewardConfig) -> None:
    """Refuse a reward that is 0 for every response: the policy would train on nothing but the KL penalty."""
    if weighted_terms(cfg):
        return
    off = [f"classifier_weight={cfg.classifier_weight:g}" if cfg.classifier_weight == 0 else "no classifier",
           "no reward_model" if not cfg.reward_model else f"reward_model_weight={cfg.reward_model_weight:g}",
           "no function" if not cfg.function else f"function_weight={cfg.function_weight:g}",
           "unended/length/repetition weights 0"]
    raise ConfigError("the reward is 0 for every response: no term has a source and a nonzero weight "
                      f"({', '.join(off)}); pass --reward CLASSIFIER_RUN|REWARD_MODEL_RUN or "
                      "--reward.function=module:fn, or give a term a nonzero weight")


class Reward:
    """`reward(policy, rollout)` -> (total (B,) for training, {term: (B,)} raw values for logging)."""

    def __init__(self, cfg: RewardConfig, response_len: int, device):
        check(cfg)  # before the reward's models load
        self.cfg, self.response_len = cfg, response_len
        self.weights = {t: getattr(cfg, f"{t}_weight") for t in TERMS}
        self.classifier = self.function = self.reward_model = None
        if self.weights["classifier"] != 0 and (cfg.classifier or not cfg.reward_model):
            self.classifier = load_classifier(cfg, device)
        if cfg.reward_model:  # at weight 0 still scored and logged: watched, e.g. by the over-optimisation guard
            self.reward_model = RewardModel.from_run(cfg.reward_model, device, cfg.ensemble, cfg.uwo_lambda)
        if cfg.function:
            self.function = load_function(cfg.function)
        self.monitor = load_judge(cfg.monitor, device, "--reward.monitor") if cfg.monitor else None
        self.moments = RunningMoments() if cfg.normalize else None

    def terms(self, policy, rollout) -> dict[str, torch.Tensor]:
        """Each active term's raw value, (B,) on the CPU."""
        out = {}
        if self.classifier is not None:
            texts = [policy.as_text(p, r) for p, r in zip(rollout.prompts, rollout.texts)]
            out["classifier"] = self.classifier.score(texts)[1]
        if self.reward_model is not None:
            scores = self.reward_model.member_scores([dialogue_text(p, r) for p, r in zip(rollout.prompts, rollout.texts)])
            out["reward_model"] = combine(scores, self.cfg.ensemble, self.cfg.uwo_lambda)  # (B,)
            if len(scores) > 1:  # logged, not added to the total: the members' disagreement
                out["ensemble_std"] = scores.std(0, unbiased=False)
        if self.weights["unended"]:
            out["unended"] = (~rollout.ended).float().cpu()
        if self.weights["length"]:
            out["length"] = rollout.response_mask.sum(1).cpu() / self.response_len
        if self.weights["repetition"]:
            out["repetition"] = torch.tensor([repetition(t) for t in rollout.texts])
        if self.function is not None:
            out["function"] = self._call_function(rollout)
        if self.monitor is not None:  # logged, never added: not in self.weights
            out["monitor"] = self.monitor(list(rollout.prompts), list(rollout.texts)).float().cpu()
        return out

    def _call_function(self, rollout) -> torch.Tensor:
        values = self.function(list(rollout.prompts), list(rollout.texts))
        try:
            values = torch.tensor([float(v) for v in values])
        except (TypeError, ValueError) as e:
            raise ModelError(f"reward function {self.cfg.function} must return one number per response") from e
        if values.shape != (len(rollout.texts),):
            raise ModelError(f"reward function {self.cfg.function} returned {values.numel()} values for "
                            f"{len(rollout.texts)} responses; return one per response")
        return values

    def __call__(self, policy, rollout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        terms = self.terms(policy, rollout)
        weighted = [self.weights[k] * v for k, v in terms.items() if k in self.weights]
        total = sum(weighted) if weighted else torch.zeros(len(rollout.texts))
        bad = [k for k, v in terms.items() if not torch.isfinite(v).all()]
        if bad:
            raise ModelError(f"the reward term {bad[0]!r} gave a non-finite value; fix that term or set its weight to 0")
        terms["total"] = total
        return total, terms

    def normalized(self, total: torch.Tensor) -> torch.Tensor:
        """Standardise with the running moments (updated with this batch first), if normalisation is on."""
        if self.moments is None:
            return total
        self.moments.update(total)
        return (total - self.moments.mean) / math.sqrt(self.moments.var + 1e-8)


def load_classifier(cfg: RewardConfig, device) -> SentimentClassifier:
    """The classifier run `cfg.classifier`, which must exist (`train_missing` is the command's job, before)."""
    if not cfg.classifier:
        raise ConfigError("the reward needs a classifier or a reward model: pass --reward CLASSIFIER_RUN|"
                          "REWARD_MODEL_RUN (or set reward.classifier_weight=0 and use reward.function)")
    run = RunDir.find(cfg.classifier)
    if run is None or run.stage != "classifier" or not (run.model / "config.json").is_file():
        raise RunError(f"reward classifier {cfg.classifier} is not a trained classifier run; train one with "
                       f"`minirlhf train-classifier --out {cfg.classifier}`, or set reward.train_missing=true")
    return SentimentClassifier.from_run(run.path, device)
