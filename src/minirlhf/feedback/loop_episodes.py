"""`minirlhf loop --env constraints|judge`: the rounds of the loop on whole episodes instead of single replies.

What changes, step by step (loop.py's docstring has the rounds):
  1. pairs: two episodes of the round's policy from one environment seed (episode_pairs.py): for `constraints` its
     scripted user with its instructions, for `judge` the openings of --prompts.file (HH conversations or requests)
     with their later user turns, then scripted follow-ups;
  2. labels: the simulated annotator judges each conversation whole: its judge scores (the opening, the rest of the
     conversation rendered as HH text after it), so a reward-model judge reads the whole conversation as HH text, as
     the reward model being trained does (one score per conversation, not a sum over turns: a person, too, judges
     the conversation, and a sum would favour more turns);
  3. reward model: trained on the round's conversations (export writes them conversational; each side is read as the
     whole dialogue);
  4. policy: RL on episodes of the same environment whose every turn the round's reward model scores (never the
     environment's own checks): `--env judge` with `env.judge` = the round's reward model, or for `constraints`
     `JudgedConstraints` (the same user and instructions, the reward model's score as the reward). The reward model
     was trained on whole conversations, so the episode's reward is its score of the whole conversation, on the last
     token (`env.reward=last`, `env.turn_credit=episode`). The openings are the same as the pairs': for
     `constraints` the shipped requests' training and held-out parts are written to the round's requests.jsonl and
     requests_heldout.jsonl and given to the RL stage as its prompt files;
  5. the row: policy and reference (and the previous round's policy) play the same held-out episodes (seeds 0..n-1),
     scored whole by the gold judge (or the round's reward model); KL is per episode, over the assistant's tokens.

`--method dpo` is not offered with `--env`: DPO's log-probs are of a reply to a prompt, not of the turns of a
conversation whose user messages the environment wrote.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from minirlhf import ConfigError
from minirlhf.ops import response_kl
from minirlhf.stages.evaluate import win_rate
from minirlhf.checkpoint import atomic_write_text
from minirlhf.data.dialogue import from_messages
from minirlhf.envs.base import EnvConfig, env_prompts, make_env
from minirlhf.envs.constraints import ConstraintsEnv
from minirlhf.feedback.conversations import texts_of
from minirlhf.feedback.episode_pairs import check_chat_spec, no_scores
from minirlhf.models.episodes import sample_episodes

LOOP_ENVS = ("constraints", "judge")
"""the environments the loop runs rounds on: those whose episodes the round's reward model can score turn by turn"""


class JudgedConstraints(ConstraintsEnv):
    """The constraints user (its requests and its instructions, turn by turn), each reply scored by a judge (the
    round's reward model) instead of the instructions' checks, which stay in `info` (the RL run still logs how
    often every instruction held)."""

    def __init__(self, prompts: list[str] | None = None, turns: int = 3, seed: int = 0, config=None, judge=None):
        super().__init__(prompts, turns, seed, config)
        if judge is None:
            raise ConfigError("JudgedConstraints needs a judge: --env.judge RUN_DIR (the round's reward model)")
        self.judge = judge

    def step(self, messages: list[dict]) -> tuple[str | None, float, bool, dict]:
        message, kept, done, info = super().step(messages)
        score = float(self.judge([from_messages(messages[:-1])], [messages[-1]["content"]])[0])
        return message, score, done, info | {"kept": kept}


def check(cfg) -> None:
    """What `loop --env` needs: a built-in environment the reward model can score, an RL method, a chat policy."""
    if cfg.env.name not in LOOP_ENVS:
        raise ConfigError(f"loop --env takes {' or '.join(LOOP_ENVS)}, got {cfg.env.name!r}")
    if cfg.method == "dpo":
        raise ConfigError("loop --env trains the policy with RL on episodes; --method dpo is for single replies "
                          "(use ppo, grpo, rloo, a2c or dr-grpo)")
    if cfg.env.turns < 1:
        raise ConfigError(f"--env.turns must be >= 1, got {cfg.env.turns}")
    check_chat_spec(cfg.policy, cfg.env.name)


def openings(cfg) -> tuple[list[str], list[str]]:
    """(training, held-out) openings, as RL on episodes takes them (at most prompts.max_eval held out)."""
    train, held = env_prompts(cfg.env, cfg.prompts, cfg.data)
    return train, held[: cfg.prompts.max_eval]


def rl_settings(cfg, reward_model: Path, folder: Path) -> dict:
    """The RL stage's env and prompts: the loop's environment with the round's reward model scoring every turn and
    the episode rewarded by its score of the whole conversation. For `constraints`, the shipped requests' two parts
    go to `folder` (requests.jsonl, requests_heldout.jsonl) as the stage's prompt files."""
    env = dataclasses.replace(cfg.env, judge=str(reward_model), reward="last", turn_credit="episode")
    prompts = cfg.prompts
    if cfg.env.name == "constraints":
        env.name = f"{__name__}:JudgedConstraints"
        if cfg.prompts.file is None:
            files = {"file": folder / "requests.jsonl", "eval_file": folder / "requests_heldout.jsonl"}
            for (key, path), part in zip(files.items(), env_prompts(cfg.env, cfg.prompts, cfg.data)):
                atomic_write_text(path, "".join(json.dumps({"prompt": p}) + "\n" for p in part))
            prompts = dataclasses.replace(cfg.prompts, **{k: str(v) for k, v in files.items()})
    return {"env": env, "prompts": prompts}


def describe(env: EnvConfig) -> str:
    cap = f", {env.max_instructions} instructions at most" if env.max_instructions else ""
    return f"{env.name} episodes of {env.turns} turns{cap}"


@torch.no_grad()
def _play(model, ref, env: EnvConfig, prompts: list[str], judge, seeds: list[int], seed: int, response_len: int,
          with_kl: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scores (N,) of `model`'s episodes of `seeds`, each conversation scored whole by `judge`, and (with_kl) their
    KL from `ref` per episode (N,)."""
    device = next(model.parameters()).device
    gens = [torch.Generator(device=device).manual_seed(seed * 1_000_003 + s) for s in seeds]
    out = sample_episodes(model, [make_env(env, prompts, seed, judge=no_scores) for _ in seeds], seeds, env.turns,
                          response_len, gens)
    texts = [texts_of(m) for m in out.rollout.messages]  # (opening, rest) of each
    scores = judge([t[0] for t in texts], [t[1] for t in texts]).float().cpu()  # (N,)
    if not with_kl:
        return scores, None
    r = out.rollout
    return scores, response_kl(r.logprobs, ref(r, entropy=False)[0], r.response_mask).cpu()  # (N,)


def evaluate(policy, ref, env: EnvConfig, prompts: list[str], judge, n: int, batch: int, response_len: int,
             seed: int = 0) -> dict:
    """`policy` and `ref` play the same `n` held-out episodes (seeds 0..n-1, the same sampling seeds): the mean
    whole-conversation score of each, the policy's win rate and its KL from `ref` per episode."""
    ours, theirs, kl = [], [], []
    for start in range(0, n, batch):
        seeds = list(range(start, min(n, start + batch)))
        score, k = _play(policy, ref, env, prompts, judge, seeds, seed, response_len, True)
        ours.append(score)
        kl.append(k)
        theirs.append(_play(ref, ref, env, prompts, judge, seeds, seed, response_len, False)[0])
    ours, theirs = torch.cat(ours), torch.cat(theirs)
    return {"reward_policy": ours.mean().item(), "reward_reference": theirs.mean().item(),
            "win_rate": win_rate(ours, theirs), "kl": torch.cat(kl).mean().item()}
