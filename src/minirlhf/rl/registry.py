"""The RL algorithms, by name: what the loop, the CLI, `evaluate` and `feedback` read. To add one, write its file
(see dr_grpo.py: a config, an advantage, an `Algorithm`) and list it here."""

from __future__ import annotations

from minirlhf import ConfigError
from minirlhf.rl.dr_grpo import DR_GRPO
from minirlhf.rl.grpo import GRPO
from minirlhf.rl.ppo import A2C, PPO
from minirlhf.rl.core import Algorithm
from minirlhf.rl.rloo import RLOO

ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (PPO, GRPO, RLOO, A2C, DR_GRPO)}


def get(name: str) -> Algorithm:
    """The algorithm of `name`, as the config writes it (dr_grpo) or as its command is spelt (dr-grpo)."""
    algorithm = ALGORITHMS.get(name.replace("-", "_"))
    if algorithm is None:
        raise ConfigError(f"unknown RL algorithm {name!r}; use one of "
                          f"{', '.join(n.replace('_', '-') for n in ALGORITHMS)}")
    return algorithm
