"""A pair of two episodes as the feedback store keeps it, the page shows it and export writes it.

Both episodes are played from the same environment seed, so they open alike (the same request and, for
`constraints`, the same instructions) and part with the first assistant turn. The store keeps each whole
conversation as a message list; the opening once at the top and each side's turns after it are what people judge.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from minirlhf.data.dialogue import from_messages, to_messages
from minirlhf.data.layouts import rest_text

ROLE_LABELS = {"user": "User", "system": "System"}
"""how the page labels a turn that is not the assistant's (the assistant's: "Assistant, turn K")"""


@dataclass
class Episodes:
    """Two episodes of one opening: the opening's messages, then each side's messages after it."""

    opening: list[dict]
    rest_a: list[dict]
    rest_b: list[dict]

    def texts(self) -> tuple[str, str, str]:
        """(prompt, response A, response B) as the store's text columns hold them: the opening as HH text, each rest
        as the HH text that follows it (what a reward model and a judge read)."""
        return from_messages(self.opening), rest_text(self.rest_a), rest_text(self.rest_b)


def opening_length(messages: list[dict]) -> int:
    """Messages before the first assistant turn: an episode's opening."""
    roles = [m["role"] for m in messages]
    return roles.index("assistant") if "assistant" in roles else len(roles)


def split_episodes(a: list[dict], b: list[dict]) -> Episodes:
    """The opening and each rest of two episodes; they must open alike (the same environment seed)."""
    n = opening_length(a)
    if n == 0 or n == len(a) or a[:n] != b[:opening_length(b)] or opening_length(b) == len(b):
        raise ValueError("the two episodes of a pair must share their opening (the same environment seed) and "
                         "have an assistant turn each")
    return Episodes(a[:n], a[n:], b[n:])


def texts_of(messages: list[dict]) -> tuple[str, str]:
    """(opening as HH text, the rest as HH text after it) of one episode: what a judge scores it by."""
    found = split_episodes(messages, messages)
    return from_messages(found.opening), rest_text(found.rest_a)


def episodes_of(row) -> Episodes | None:
    """The two episodes of a stored pair; None for a pair of single replies (or a database from before episodes)."""
    if "conversation_a" not in row.keys() or row["conversation_a"] is None:
        return None
    return split_episodes(json.loads(row["conversation_a"]), json.loads(row["conversation_b"]))


def labelled(messages: list[dict]) -> list[dict]:
    """Each message with the label the page shows: "User", "System", or "Assistant, turn K" (K from 1)."""
    out, k = [], 0
    for m in messages:
        k += m["role"] == "assistant"
        label = f"Assistant, turn {k}" if m["role"] == "assistant" else ROLE_LABELS.get(m["role"], m["role"].title())
        out.append({"role": m["role"], "content": m["content"], "label": label})
    return out


def exported(row, choice: str, conversational: bool) -> dict:
    """The prompt, chosen and rejected of a judged pair: strings; or, in a file that holds episodes, TRL's
    conversational layout (the opening's messages, then each side's messages after it; a pair of single replies
    among them: one assistant message each)."""
    first = 1 if choice == "a" else -1
    if not conversational:
        chosen, rejected = (row["response_a"], row["response_b"])[::first]
        return {"prompt": row["prompt"], "chosen": chosen, "rejected": rejected}
    found = episodes_of(row)
    if found is None:
        replies = (row["response_a"], row["response_b"])[::first]
        chosen, rejected = ([{"role": "assistant", "content": text}] for text in replies)
        return {"prompt": to_messages(row["prompt"]), "chosen": chosen, "rejected": rejected}
    chosen, rejected = (found.rest_a, found.rest_b)[::first]
    return {"prompt": found.opening, "chosen": chosen, "rejected": rejected}
