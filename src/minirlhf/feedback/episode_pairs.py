"""Pairs of whole episodes: `minirlhf feedback serve --env NAME [--env-turns T]` (and `minirlhf loop --env NAME`).

Each pair is two episodes of one environment seed, so both open alike (the same request and, for `constraints`,
the same instructions): the policy plays both (two samples of it, or an RL run and its reference), each with its
own generator seed, at the page's sampling settings. People then judge the two conversations as wholes. Each side's
provenance records the model and sampling settings as for single replies, and the environment, its turns, the
episode's seed, the side's generator seed and the rewards the environment gave each turn (none for `judge`, whose
turn scores a page does not need: people are the judge).

The openings: --prompts where given; for `constraints` its shipped requests (the held-out part for an RL run, as its
single replies are compared on held-out prompts; the training part otherwise, the pairs being training data); else
the prompts single-reply pairs would answer.
"""

from __future__ import annotations

import torch

from minirlhf import ConfigError, ModelError
from minirlhf.config import DataConfig
from minirlhf.envs import requests
from minirlhf.envs.base import EnvConfig, make_env
from minirlhf.feedback.conversations import split_episodes
from minirlhf.feedback.pairs import PairPool, Sampling, Source, uncertainty
from minirlhf.models.episodes import sample_episodes
from minirlhf.models.load import policy_folder, policy_kind

NO_SCORES = "judge"
"""the environment whose per-turn rewards come from a judge: a page's pairs leave them out (people judge)"""


def no_scores(prompts: list[str], replies: list[str]) -> torch.Tensor:
    """The `judge` environment's judge on a page: every turn 0 (its follow-ups are what the pairs need)."""
    return torch.zeros(len(replies))


def env_config(args) -> EnvConfig | None:
    """serve's --env, --env-turns and --env-max-instructions as an EnvConfig (None without --env), checked before
    anything loads: episodes need a chat model, so an LSTM policy stops here."""
    if not getattr(args, "env", None):
        return None
    env = EnvConfig(name=args.env, turns=args.env_turns, max_instructions=args.env_max_instructions)
    check_chat_spec(args.policy, env.name)
    return env


def check_chat_spec(policy: str, env: str) -> None:
    """An LSTM policy (a generator run or an RL run of one) cannot play episodes: one line, before loading it."""
    if policy_kind(policy_folder(policy)) == "lstm":
        raise ConfigError(f"--env {env} needs a chat model policy (a causal LM with a chat template, e.g. smollm2); "
                          f"{policy} is an LSTM, which has no turns")


def use_episodes(source: Source, env: EnvConfig, prompts_file: str | None) -> Source:
    """The source's openings for `env` (see the module's docstring), and what the database records it is for."""
    if prompts_file is None and env.name == "constraints":
        train, held = requests.split(requests.REQUESTS, seed=DataConfig().split_seed)  # as RL runs split them
        source.prompts = held if source.reference is not None else train
        source.prompts_from = f"constraints' shipped {'held-out' if source.reference is not None else 'training'}"
    cap = f", {env.max_instructions} instructions at most" if env.max_instructions else ""
    source.episodes = f"{env.name} episodes of {env.turns} turns{cap}"
    source.prompts_from = f"{source.prompts_from} openings, played as {source.episodes}"
    make_env(env, source.prompts, 0, judge=no_scores)  # a bad environment (an unknown name) stops here
    return source


class EpisodePool(PairPool):
    """PairPool's thread, making pairs of two episodes of one environment seed (`env`)."""

    def __init__(self, store, source: Source, sampling: Sampling, ahead: int = 16, overlap: float = 0.2,
                 device="cpu", batch_size: int = 0, select: str = "random", reward_models: tuple[str, ...] = (),
                 env: EnvConfig | None = None):
        super().__init__(store, source, sampling, ahead, overlap, device, batch_size, select, reward_models)
        if env is None or not env.name:
            raise ConfigError("pairs of episodes need an environment (--env NAME)")
        self.env = env

    def _load(self) -> None:
        super()._load()
        for model in (self.policy, self.reference):
            if model is not None and (model.kind != "causal_lm" or not getattr(model, "chat", False)):
                raise ConfigError(f"--env {self.env.name} needs a chat model policy (a causal LM with a chat "
                                  f"template, e.g. smollm2); {self.source.policy} is not one")

    def _play(self, model, seeds: list[int]) -> list[tuple[list[dict], int, list[float]]]:
        """(conversation, generator seed, the environment's turn rewards) of one episode per environment seed."""
        gen_seeds = [self.rng.randrange(2 ** 31) for _ in seeds]
        generators = [torch.Generator(device=self.device).manual_seed(s) for s in gen_seeds]
        envs = [make_env(self.env, self.source.prompts, self.sampling.seed, judge=no_scores) for _ in seeds]
        s = self.sampling
        with torch.no_grad():
            out = sample_episodes(model, envs, seeds, self.env.turns, s.max_new_tokens, generators,
                                  temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
        rewards = [out.rewards[b][out.reached[b]].tolist() for b in range(len(seeds))]
        return list(zip(out.rollout.messages, gen_seeds, rewards))

    def _episode_provenance(self, role: str, played: tuple, episode_seed: int) -> dict:
        _, seed, rewards = played
        env = self.env
        extra = {"env": env.name, "turns": env.turns, "max_instructions": env.max_instructions,
                 "episode_seed": episode_seed}
        if env.name != NO_SCORES:
            extra["env_rewards"] = rewards
        return self._provenance(role, seed) | extra

    def _add_batch(self, n: int) -> None:
        seeds = [self.rng.randrange(2 ** 31) for _ in range(n)]
        if self.reference is None:  # two episodes of one policy per seed: one batch of 2n
            both = self._play(self.policy, seeds + seeds)
            first, second, roles = both[:n], both[n:], ("sample", "sample")
        else:
            first, second = self._play(self.policy, seeds), self._play(self.reference, seeds)
            roles = ("policy", "reference")
        texts = [split_episodes(one[0], two[0]).texts() for one, two in zip(first, second)]  # (prompt, A, B) each
        priorities = uncertainty(self.reward_models, *map(list, zip(*texts))) if self.reward_models else [0.0] * n
        for seed, one, two, (_, text1, text2), priority in zip(seeds, first, second, texts, priorities):
            if text1.strip() == text2.strip():  # the same conversation twice: nothing to choose between
                self.identical += 1
                continue
            sides = [(one[0], self._episode_provenance(roles[0], one, seed)),
                     (two[0], self._episode_provenance(roles[1], two, seed))]
            self.rng.shuffle(sides)
            wanted = 2 if self.rng.random() < self.overlap else 1
            self.store.add_episodes(sides[0][0], sides[1][0], sides[0][1], sides[1][1], wanted, priority)
            self.generated += 1
        if self.generated == 0 and self.identical >= 50:
            raise ModelError(f"the two episodes were identical {self.identical} times; sample more freely "
                             "(raise --temperature or --top-p) or give a policy that has changed")


def make_pool(env: EnvConfig | None, store, source: Source, sampling: Sampling, ahead: int, overlap: float,
              device, **kw) -> PairPool:
    """The pair generator: of episodes with an environment, else of single replies."""
    if env is None:
        return PairPool(store, source, sampling, ahead, overlap, device, **kw)
    return EpisodePool(store, source, sampling, ahead, overlap, device, env=env, **kw)
