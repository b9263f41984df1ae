"""The judge environment: every assistant turn scored by a judge (a reward-model run, a classifier run or a user
function `module:function`; models/judge.py), so dialogues such as HH-RLHF's train as episodes whose earlier
replies are the policy's own.

The user's follow-ups come from the data where it has them: a prompt that is a conversation (HH text) opens with
its first user message, and its later user messages follow, in order, whatever the policy replied (the data's
own assistant turns are dropped: the policy writes every one). Where the data runs out, or a prompt is a single
request, the user follows up from a scripted list, drawn with the episode's seed.
"""

from __future__ import annotations

import random

from minirlhf import ConfigError
from minirlhf.data.dialogue import from_messages, to_messages

FOLLOW_UPS = ("Can you tell me more?", "Why is that?", "Can you give me an example?", "What else should I know?",
              "Could you say that more simply?", "Thanks. What would you suggest I do next?",
              "Is there anything I should be careful about?", "Can you sum that up in one sentence?")
"""what the scripted user says after a reply when the data has nothing more"""


class JudgeEnv:
    """A user from the data (or a script) and a judge that scores each reply in its conversation."""

    def __init__(self, prompts: list[str], turns: int = 3, judge=None):
        """`prompts`: openings (plain requests or HH conversations); `judge`: (prompts, replies) -> scores (N,), the
        prompt being the conversation up to the reply as HH text (the trainer builds it from --env.judge)."""
        if judge is None:
            raise ConfigError("--env judge needs a judge: --env.judge RUN_DIR (a reward-model or classifier run) or "
                              "module:function")
        if not prompts:
            raise ConfigError("--env judge needs prompts: --prompts.file FILE (HH conversations or requests)")
        self.prompts, self.turns, self.judge = list(prompts), turns, judge
        self.user_turns: list[str] = []
        self.turn = 0

    def reset(self, seed: int) -> list[dict]:
        """The episode of `seed`: a prompt's system and first user message; its later user messages (then scripted
        follow-ups) are what the user says next."""
        rng = random.Random(seed)
        messages = [m for m in to_messages(rng.choice(self.prompts)) if m["content"]]
        users = [m["content"] for m in messages if m["role"] == "user"] or ["Hello."]
        scripted = rng.sample(FOLLOW_UPS, len(FOLLOW_UPS))
        self.user_turns = (users[1:] + scripted)[: max(0, self.turns - 1)]
        self.turn = 0
        system = [m for m in messages[:1] if m["role"] == "system"]
        return system + [{"role": "user", "content": users[0]}]

    def step(self, messages: list[dict]) -> tuple[str | None, float, bool, dict]:
        """The judge's score of the last reply given the conversation before it; the user's next message."""
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError("step() takes the conversation with the assistant's reply last")
        score = float(self.judge([from_messages(messages[:-1])], [messages[-1]["content"]])[0])
        self.turn += 1
        info = {"turn": self.turn, "score": score}
        if self.turn >= self.turns or self.turn > len(self.user_turns):
            return None, score, True, info
        return self.user_turns[self.turn - 1], score, False, info
