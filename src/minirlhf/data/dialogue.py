"""Dialogue prompts: one canonical string form, the Anthropic HH-RLHF text.

A prompt is always a string. A conversation is held as HH text, `"\\n\\nHuman: hi\\n\\nAssistant: hello\\n\\nHuman:
and?\\n\\nAssistant:"`, ending with the empty assistant turn the policy writes; `{"messages": [...]}` prompts are
converted to it on reading, so stores, exports and reward models see one format. A chat policy renders the parsed
turns with its own chat template; a plain LM reads the text as it is; a reward model reads the whole dialogue,
the response included (`dialogue_text`).
"""

from __future__ import annotations

import re

from minirlhf import DataError

ROLES = {"system": "System", "user": "Human", "assistant": "Assistant"}
_SPEAKER = re.compile(r"\n\n(Human|Assistant|System):")
_NAMES = {v: k for k, v in ROLES.items()}


def is_dialogue(prompt: str) -> bool:
    """Whether a prompt is HH text: it opens with a Human (or System) turn and has an Assistant turn."""
    head = prompt.lstrip(" ")
    return (head.startswith("\n\nHuman:") or head.startswith("\n\nSystem:") or head.startswith("Human:")) \
        and "\n\nAssistant:" in prompt


def to_messages(prompt: str) -> list[dict]:
    """[{"role", "content"}, ...] of a prompt: the turns of HH text (the final empty assistant turn dropped), or
    one user message for a plain prompt."""
    if not is_dialogue(prompt):
        return [{"role": "user", "content": prompt}]
    text = prompt if prompt.lstrip(" ").startswith("\n\n") else "\n\n" + prompt.lstrip(" ")
    parts = _SPEAKER.split(text)  # ['', 'Human', ' hi', 'Assistant', ' hello', ...]
    turns = [{"role": _NAMES[name], "content": body.strip()} for name, body in zip(parts[1::2], parts[2::2])]
    if turns and turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
        turns.pop()
    return turns


def from_messages(messages: list, where: str = "messages") -> str:
    """HH text of a conversation that ends with a user turn (the assistant's reply is what is asked for)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
    out = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: each message needs a role (system, user or assistant) and a string "
                            f"content, got {m!r}")
        out.append(f"\n\n{ROLES[m['role']]}: {m['content'].strip()}")
    if messages[-1]["role"] != "user":
        raise DataError(f"{where}: the last message must be the user's (the policy writes the assistant's reply)")
    return "".join(out) + "\n\nAssistant:"


def prompt_of(obj: dict, where: str) -> str:
    """The canonical prompt string of a JSON object with "prompt" (a string or a message list) or "messages"."""
    value = obj.get("messages", obj.get("prompt"))
    if isinstance(value, list):
        return from_messages(value, where)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: \"prompt\" must be a non-empty string or a list of messages, got {value!r}")
    return value


def dialogue_text(prompt: str, response: str) -> str:
    """What a reward model reads: the whole conversation in HH text, the response as the last assistant turn.
    A plain prompt becomes a single Human turn, so plain and dialogue prompts are scored alike."""
    head = prompt if is_dialogue(prompt) else f"\n\nHuman: {prompt.strip()}\n\nAssistant:"
    head = head.rstrip()
    if not head.endswith("Assistant:"):
        head += "\n\nAssistant:"
    return f"{head} {response.strip()}"
