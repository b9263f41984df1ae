"""RL on multi-turn episodes (`--env NAME`): where the loop (rl.py) gets its experience from. Held-out episodes
are evaluated in evaluate.py.

`EpisodeSource` is the loop's source of experience when an environment is set (`PromptSource` in rl.py when not):
it draws one seed per group (GRPO's and RLOO's groups are episodes from the same seed: the same opening and, for
`constraints`, the same instructions), plays the episodes with the policy (models/episodes.py), and turns the
environment's per-turn rewards into the scores the algorithm reads: each turn's reward over the number of turns
on that turn's last token (`--env.turn_credit=turn`; they add up to the episode's mean) or the episode's reward on
its last token (`episode`).
"""

from __future__ import annotations

import torch

from minirlhf import ConfigError
from minirlhf.stages.evaluate import conversation_md
from minirlhf.envs.base import env_factory
from minirlhf.models.episodes import Episodes, sample_episodes


def check(cfg, policy) -> None:
    """What an episode run needs beyond its fields' ranges."""
    cfg.env.check()
    if getattr(policy, "kind", "") != "causal_lm" or not getattr(policy, "chat", False):
        raise ConfigError(f"--env {cfg.env.name} needs a chat model policy (a causal LM with a chat template, e.g. "
                          f"--policy smollm2); {cfg.policy} is not one")


class EpisodeSource:
    """Episodes of an environment as the loop's experience."""

    def __init__(self, cfg, prompts: list[str], device):
        self.cfg, self.make = cfg, env_factory(cfg.env, prompts, cfg.seed, device)

    def draw(self, rng, n_groups: int) -> list[int]:
        """One episode seed per group, from the step's stream (a resumed run draws the same)."""
        return [rng.randrange(2 ** 31) for _ in range(n_groups)]

    def play(self, policy, seeds: list[int], generators) -> Episodes:
        return sample_episodes(policy, [self.make() for _ in seeds], seeds, self.cfg.env.turns, self.cfg.response_len,
                               generators)

    def sample(self, policy, seeds: list[int], generators):
        """(rollout, terms): terms (B,) tensors, `total` the episode reward, and `_rewards`, `_reached` (B, K)."""
        episodes = self.play(policy, seeds, generators)
        return episodes.rollout, episode_terms(episodes, self.cfg.env.reward)

    def score(self, policy, rollout, terms: dict) -> dict:
        return terms  # the environment scored every turn as the episode went

    def scores(self, terms: dict) -> torch.Tensor:
        """What the algorithm reads (B, K) or (B, 1), on the whole batch."""
        if self.cfg.env.turn_credit == "episode":
            return terms["total"].unsqueeze(1)
        reached = terms["_reached"].float()
        return terms["_rewards"] * reached / reached.sum(1, keepdim=True).clamp(min=1)


def episode_terms(episodes: Episodes, how: str) -> dict:
    """The logged terms of a batch of episodes: the episode reward, each turn's, and (where the environment says
    whether every instruction held, as `constraints` does) the share of episodes in which all held at every turn."""
    terms = {"total": episodes.episode_reward(how), "_rewards": episodes.rewards, "_reached": episodes.reached}
    terms |= {f"turn_{k + 1}": episodes.rewards[:, k] for k in range(episodes.rewards.size(1))}
    if all("all" in info for infos in episodes.infos for info in infos):
        terms["all_turns"] = torch.tensor([float(all(i["all"] for i in infos)) for infos in episodes.infos])
    return terms


def sample_conversations(step: int, rollout, terms: dict, n: int = 2) -> str:
    """samples.md's section for a step: the first n episodes, whole, with their episode rewards."""
    parts = [f"\n## step {step}\n"]
    for messages, total in zip((rollout.messages or [])[:n], terms["total"][:n].tolist()):
        parts += [f"episode reward {total:+.2f}", "", conversation_md(messages), ""]
    return "\n".join(parts)
