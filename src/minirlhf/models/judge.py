"""A judge: what scores a reply to a prompt, for simulated annotators, the gold-judge benchmarks and the `judge`
environment. A classifier run, a reward-model run or a user function `module:function`."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from minirlhf import ConfigError
from minirlhf.data.dialogue import dialogue_text
from minirlhf.models.classifier import SentimentClassifier
from minirlhf.models.reward_model import RewardModel
from minirlhf.models.rewards import load_function
from minirlhf.rundir import RunDir

Judge = Callable[[list[str], list[str]], torch.Tensor]
"""(prompts, responses) -> a score per response (N,); higher is better"""


def load_judge(spec: str, device="cpu") -> Judge:
    """A classifier run (its positive logit of the prompt followed by the response, the text as a person reads it),
    a reward-model run (its standardised score of the dialogue) or a user function `module:function`."""
    found = RunDir.find(spec)
    if found is not None and found.stage == "classifier":
        classifier = SentimentClassifier.from_run(found.path, device)
        return lambda prompts, responses: classifier.score(
            [f"{p} {r}".strip() for p, r in zip(prompts, responses)])[1]
    if found is not None and found.stage == "reward_model":
        reward_model = RewardModel.from_run(found.path, device)
        return lambda prompts, responses: reward_model.normalized(
            [dialogue_text(p, r) for p, r in zip(prompts, responses)])
    if ":" in spec and not Path(spec).exists():
        function = load_function(spec)
        return lambda prompts, responses: torch.tensor([float(v) for v in function(prompts, responses)])
    raise ConfigError(f"--judge {spec} is neither a classifier run, a reward-model run nor module:function; "
                      "give one of those")


