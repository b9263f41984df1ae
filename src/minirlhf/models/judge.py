"""A judge: what scores a reply to a prompt, for simulated annotators, the gold-judge benchmarks and the `judge`
environment. A classifier run, a reward-model run or a user function `module:function`."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Callable

import torch

from minirlhf import ConfigError
from minirlhf.data.dialogue import dialogue_text
from minirlhf.models.classifier import SentimentClassifier
from minirlhf.models.reward_model import RewardModel
from minirlhf.rundir import RunDir

Judge = Callable[[list[str], list[str]], torch.Tensor]
"""(prompts, responses) -> a score per response (N,); higher is better"""


def _import(module_name: str):
    """An importable module, or else MODULE.py in the working directory (where a user writes a reward function),
    loaded without touching sys.path."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError:
        path = Path.cwd() / f"{module_name.replace('.', '/')}.py"
        if not path.is_file():
            raise
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


def load_function(spec: str, what: str = "reward function", flag: str = "--reward.function",
                  form: str = "module:function (e.g. my_rewards:brevity)"):
    """Import `module:function` (or `module:Class`): an importable module, or a .py file in the working directory."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ConfigError(f"{flag}={spec!r} must look like {form}")
    try:
        fn = getattr(_import(module_name), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cannot load {what} {spec!r} ({e}); check the module is importable from here") from e
    if not callable(fn):
        raise ConfigError(f"{what} {spec!r} is not callable")
    return fn


def judge_kind(spec: str | None) -> str:
    """What a judge names: "classifier" or "reward_model" (a run of that stage), else "function" (module:function).
    The one place a judge, a simulated annotator or `--reward RUN` is told apart."""
    found = RunDir.find(spec)
    return found.stage if found is not None and found.stage in ("classifier", "reward_model") else "function"


def load_judge(spec: str, device="cpu", flag: str = "--judge") -> Judge:
    """A classifier run (its positive logit of the prompt followed by the response, the text as a person reads it),
    a reward-model run (its standardised score of the dialogue) or a user function `module:function`."""
    kind = judge_kind(spec)
    if kind == "classifier":
        classifier = SentimentClassifier.from_run(spec, device)
        return lambda prompts, responses: classifier.score(
            [f"{p} {r}".strip() for p, r in zip(prompts, responses)])[1]
    if kind == "reward_model":
        reward_model = RewardModel.from_run(spec, device)
        return lambda prompts, responses: reward_model.normalized(
            [dialogue_text(p, r) for p, r in zip(prompts, responses)])
    if ":" in spec and not Path(spec).exists():
        function = load_function(spec)
        return lambda prompts, responses: torch.tensor([float(v) for v in function(prompts, responses)])
    raise ConfigError(f"{flag} {spec} is neither a classifier run, a reward-model run nor module:function; "
                      "give one of those")


