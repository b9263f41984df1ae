"""The constraints environment: a scripted user asks for something with one verifiable instruction, then after each
reply asks again, adding one new instruction that holds together with the earlier ones. Each turn's reward is the
share of the instructions given so far that the reply keeps, so earlier ones must still hold: the policy learns to
follow instructions across a conversation, not only the last message.

An episode is fixed by the seed given to `reset` alone (request and every instruction are drawn there, whatever the
replies), so episodes are reproducible and the trainer's episode seeds decide them. One object runs one episode at
a time; the trainer makes one object per episode, which is cheap (the shipped requests are built once, at import).
"""

from __future__ import annotations

import random

from minirlhf import ConfigError
from minirlhf.envs.requests import REQUESTS
from minirlhf.envs.verifiers import KINDS, Instruction, draw

FOLLOW_UP = "Now answer again, and this time {clause}. Keep to what I asked before."
"""a later turn's user message when it adds an instruction"""
AGAIN = "Please answer again. Keep to what I asked before."
"""a later turn's user message when the user has no new instruction (max_instructions reached, or no compatible kind
left)"""


class ConstraintsEnv:
    """A user with one request and a growing list of verifiable instructions (see minirlhf.envs.verifiers)."""

    def __init__(self, prompts: list[str] | None = None, turns: int = 3, seed: int = 0, config=None):
        """`prompts`: the requests of this split (empty or None: the shipped ones); `turns`: assistant turns per
        episode; `seed`: kept for the protocol (episodes depend on reset's seed only); `config`: an EnvConfig, whose
        `max_instructions` (> 0) caps the instructions a user gives."""
        if turns < 1:
            raise ConfigError(f"turns must be at least 1, got {turns}")
        cap = getattr(config, "max_instructions", 0) or 0
        if cap < 0:
            raise ConfigError(f"max_instructions must be >= 0, got {cap}")
        self.prompts = list(prompts) if prompts else list(REQUESTS)
        self.turns = turns
        self.seed = seed
        self.max_instructions = min(cap, turns) if cap > 0 else turns
        self.kinds = parse_kinds(getattr(config, "kinds", "") or "")
        self.request: str | None = None
        self.plan: list[Instruction] = []
        """the instructions of the episode, plan[i] given with the user message before turn i + 1"""
        self.turn = 0
        """assistant turns scored so far in this episode"""

    def reset(self, seed: int) -> list[dict]:
        """Start the episode of `seed`: draw its request and all its instructions; the opening user message."""
        rng = random.Random(seed)
        self.request = rng.choice(self.prompts)
        self.plan = []
        while len(self.plan) < self.max_instructions:
            new = draw(rng, [i.kind for i in self.plan], self.kinds)
            if new is None:
                break
            self.plan.append(new)
        self.turn = 0
        if not self.plan:
            raise ConfigError(f"--env.kinds={','.join(self.kinds or [])} leaves no instruction to give")
        return [{"role": "user", "content": f"{self.request} {self.plan[0].text}"}]

    def given(self) -> list[Instruction]:
        """The instructions the user has given up to the current turn."""
        return self.plan[:max(self.turn, 1)]

    def step(self, messages: list[dict]) -> tuple[str | None, float, bool, dict]:
        """Score the last message (the assistant's reply) against every instruction given so far; the user's next
        message, or None and done after `turns` replies."""
        if self.request is None:
            raise RuntimeError("call reset() before step()")
        if self.turn >= self.turns:
            raise RuntimeError(f"the episode is over after {self.turns} turns; call reset() to start another")
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError("step() takes the conversation with the assistant's reply last")
        reply = messages[-1].get("content") or ""
        self.turn += 1
        given = self.given()
        satisfied = {i.kind: i.check(reply) for i in given}
        reward = sum(satisfied.values()) / len(given)
        info = {"turn": self.turn, "instructions": [i.kind for i in given], "satisfied": satisfied,
                "all": all(satisfied.values())}
        if self.turn >= self.turns:
            return None, reward, True, info
        return self.next_message(), reward, False, info

    def next_message(self) -> str:
        """The user's message before turn `self.turn + 1`: a new instruction if one is planned for it, else AGAIN."""
        if self.turn < len(self.plan):
            return FOLLOW_UP.format(clause=self.plan[self.turn].clause)
        return AGAIN


def parse_kinds(text: str) -> list[str] | None:
    """The kinds of `--env.kinds=a,b,c` (empty: every kind); an unknown one stops with one line naming the known."""
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ConfigError(f"--env.kinds: unknown instruction kind {unknown[0]!r}; use some of {', '.join(KINDS)}")
    return kinds or None
