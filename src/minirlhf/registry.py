"""Every kind of run, by name: the one table that RunDir, the CLI, the runner and model cards read.

A stage is a file (stages/sft.py: a config dataclass and `train(cfg, resume=None, overwrite=False) -> run folder`)
plus one `Stage` entry here. The entry names its config and its job as "module:attribute" strings, so this base
module imports none of them: a stage is loaded only when its command runs. RL is one stage whose algorithms have a
registry of their own (rl/registry.py): each gets its own command.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    """what run.json records as the run's "stage"; also the default run folder's prefix"""
    noun: str
    """how messages name one of its runs ("an SFT" run)"""
    method: str
    """how its model card names the training method"""
    config: str = ""
    """"module:Class" of its config dataclass"""
    train: str = ""
    """"module:function": train(cfg, resume=None, overwrite=False) -> the run folder (None on other processes)"""
    command: str = ""
    """its `minirlhf` sub-command ("": none of its own: RL has one per algorithm, the demo is composite)"""
    help: str = ""
    """the command's one line in `minirlhf --help`"""
    done: str = ""
    """what the run wrote, printed after it ({run} is its folder)"""
    policy: bool = False
    """its run is a policy that a later stage starts from (`--policy RUN`)"""

    def load_config(self) -> type:
        return _attribute(self.config)

    def load_train(self):
        return _attribute(self.train)


def _attribute(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


_S = "minirlhf.stages."
_POLICY_DONE = "report.md, results.json, loss.png; checkpoint/policy: `minirlhf generate {run}`, or --policy {run} for "
STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("classifier", "a classifier", "supervised fine-tuning on labelled sentiment texts",
          _S + "classifier:ClassifierConfig", _S + "classifier:train", "train-classifier",
          "stage 1: fine-tune an encoder as sentiment classifier", "plots: loss.png, accuracy.png; model: model/"),
    Stage("generator", "a generator", "language modelling on the corpus texts", _S + "generator:GeneratorConfig",
          _S + "generator:train", "train-generator", "stage 3: train the word-level LSTM language model",
          "plots: loss.png, perplexity.png; samples: samples.md", policy=True),
    Stage("reward_model", "a reward-model", "Bradley-Terry reward modelling on preference pairs",
          _S + "reward_model:RewardModelConfig", _S + "reward_model:train", "train-reward-model",
          "a Bradley-Terry reward model from preference pairs (--preferences FILE.jsonl)",
          "results.json, plots; model/: `minirlhf eval-reward-model {run} --preferences FILE`, or the RLHF reward "
          "term --reward.reward_model={run}"),
    Stage("sft", "an SFT", "supervised fine-tuning (SFT)", _S + "sft:SFTConfig", _S + "sft:train", "sft",
          "supervised fine-tuning of a policy on given responses (--policy smollm2|MODEL|RUN --data FILE.jsonl)",
          _POLICY_DONE + "a later stage", policy=True),
    Stage("dpo", "a DPO", "DPO", _S + "dpo:DPOConfig", _S + "dpo:train", "dpo",
          "DPO/IPO from preference pairs, no reward model (--policy GENERATOR_RUN|smollm2|MODEL --preferences "
          "FILE.jsonl)", _POLICY_DONE.replace("loss.png", "plots") + "a later stage", policy=True),
    Stage("rl", "an RL", "reinforcement learning from a reward", train=_S + "rl:train", policy=True,
          done="report.md, results.json, samples.md, plots; checkpoint/: `minirlhf generate {run}`, "
               "`minirlhf evaluate {run}`, `--resume {run}`"),
    Stage("loop", "a loop", "iterated RLHF (rounds of labels, reward model and policy)",
          "minirlhf.feedback.loop:LoopConfig", "minirlhf.feedback.loop:train", "loop",
          "iterated RLHF: rounds of pairs on the feedback page, labels (people or --annotator simulate:JUDGE), "
          "reward model, policy (--policy P --rounds R --labels N --method ppo|grpo|dpo)",
          "report.md (a row per round), results.json, plots; round-K/: its page's database, labels, reward_model/, "
          "policy/; --policy {run} starts from its last policy"),
    Stage("demo", "a demo", "the demo pipeline", "minirlhf.pipeline:DemoConfig"),
)}


def register(stage: Stage) -> Stage:
    """Add a stage (a plugin's, or a test's): RunDir, the CLI and model cards know it from then on."""
    if stage.name in STAGES:
        raise ValueError(f"a stage named {stage.name!r} is registered already")
    STAGES[stage.name] = stage
    return stage


def noun(stage: str | None) -> str:
    """ "an SFT" for "sft"; an unknown name as it is."""
    found = STAGES.get(stage or "")
    return found.noun if found else str(stage)


def method(name: str) -> str:
    """A model card's method for a stage name; anything else (an RL algorithm's title) as it is."""
    found = STAGES.get(name)
    return found.method if found else name
