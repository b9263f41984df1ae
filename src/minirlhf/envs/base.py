"""The environment protocol, its config, and the one place environments are looked up by name.

An environment is any object with two methods (the shape of TRL's and verl's multi-turn environments):

    reset(seed: int) -> list[dict]
        the opening conversation, [{"role": "user", "content": ...}] (a system message may come first);
    step(messages: list[dict]) -> (message: str | None, reward: float, done: bool, info: dict)
        called after every assistant turn with the whole conversation so far (the policy's reply last): the
        reply's reward, and the user's next message, or done.

Built-ins are listed in `ENVIRONMENTS`; `--env module:Class` loads a user's own class (a module importable from
here, or MODULE.py in the working directory). A class is built with the keyword arguments its `__init__` names
among `prompts` (the requests of this split), `turns`, `seed` and `config` (the whole EnvConfig).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Literal, Protocol

from minirlhf import ConfigError
from minirlhf.config import DataConfig, setting
from minirlhf.data.prompts import PromptConfig, load_prompts
from minirlhf.envs import requests
from minirlhf.envs.constraints import ConstraintsEnv
from minirlhf.envs.judge import JudgeEnv
from minirlhf.models.judge import load_judge
from minirlhf.models.judge import load_function


class Environment(Protocol):
    def reset(self, seed: int) -> list[dict]: ...

    def step(self, messages: list[dict]) -> tuple[str | None, float, bool, dict]: ...


@dataclass
class EnvConfig:
    """What an episode is; an empty `name` keeps RL on single replies to prompts."""

    name: str = ""
    """the environment: `constraints` (a scripted user adds a verifiable instruction each turn), `judge` (each turn
    scored by the run's reward), or `module:Class` (your own); empty: single replies"""
    turns: int = setting(3, ge=1)
    """assistant turns per episode at most (the environment may end it sooner)"""
    reward: Literal["last", "mean"] = "mean"
    """the episode's reward from its turns' rewards: their `mean`, or the `last` turn's"""
    turn_credit: Literal["turn", "episode"] = "turn"
    """where rewards sit: each turn's reward on that turn's last token (`turn`; the return of turn 1 is then the
    episode reward) or the episode's reward on its last token (`episode`)"""
    max_instructions: int = setting(0, ge=0)
    """constraints: instructions a user gives at most (0: one per turn)"""
    kinds: str = ""
    """constraints: the instruction kinds a user draws from, comma-separated (empty: all of envs/verifiers.KINDS)"""
    judge: str = ""
    """judge: what scores each turn, a reward-model run, a classifier run or module:function"""

    def check(self) -> None:
        """What the field ranges cannot say."""
        if self.turn_credit == "turn" and self.reward == "last":
            raise ConfigError("--env.turn_credit=turn gives each turn its own reward, so an episode's reward is their "
                              "mean; use --env.reward=mean, or --env.turn_credit=episode to score the last turn only")


ENVIRONMENTS = {"constraints": ConstraintsEnv, "judge": JudgeEnv}
"""the built-in environments by name (each file imports nothing from here, so this is the one place naming them)"""


def env_class(name: str):
    """The class of a built-in environment name or of `module:Class`; an unknown name stops with one line."""
    if ":" in name:
        return load_function(name, what="environment class", flag="--env", form="module:Class (e.g. my_env:Echo)")
    if name not in ENVIRONMENTS:
        raise ConfigError(f"unknown environment {name!r}; use one of {', '.join(ENVIRONMENTS)} or module:Class")
    return ENVIRONMENTS[name]


def make_env(cfg: EnvConfig, prompts: list[str], seed: int = 0, **extra) -> Environment:
    """An environment over `prompts`, built with the arguments its class's __init__ names."""
    cls = env_class(cfg.name)
    offered = {"prompts": prompts, "turns": cfg.turns, "seed": seed, "config": cfg, **extra}
    params = inspect.signature(cls).parameters
    takes_all = any(p.kind is p.VAR_KEYWORD for p in params.values())
    env = cls(**{k: v for k, v in offered.items() if takes_all or k in params})
    for method in ("reset", "step"):
        if not callable(getattr(env, method, None)):
            raise ConfigError(f"environment {cfg.name!r} has no {method}() method; see minirlhf.envs.base for the protocol")
    return env


def env_prompts(env: EnvConfig, prompts: PromptConfig, data: DataConfig) -> tuple[list[str], list[str]]:
    """(training, held-out) openings of a run's episodes: --prompts.file where given; for `constraints` its shipped
    requests, split; otherwise the corpus's prompts, as single-reply RL takes them."""
    if prompts.file is None and env.name == "constraints":
        return requests.split(requests.REQUESTS, seed=data.split_seed)
    return load_prompts(prompts, data)


def env_factory(cfg: EnvConfig, prompts: list[str], seed: int, device="cpu") -> Callable[[], Environment]:
    """A maker of fresh environments over `prompts` (one per episode), its judge loaded once; building one here
    makes a bad environment stop before anything runs."""
    extra = {"judge": load_judge(cfg.judge, device)} if cfg.judge else {}
    make = lambda: make_env(cfg, prompts, seed, **extra)  # noqa: E731
    make()
    return make
