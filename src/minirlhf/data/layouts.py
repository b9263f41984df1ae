"""Preference layouts: the shapes pair data is published in, each turned into (prompt, chosen, rejected) strings.

- pairs: {"prompt", "chosen", "rejected"} strings, as `minirlhf feedback export` writes them (the prompt may be HH
  text or a message list, and "messages" may stand in for it); the files under shared/data are of this layout;
- HH text: Anthropic HH-RLHF as published, {"chosen", "rejected"} only, each a whole transcript
  "\\n\\nHuman: ...\\n\\nAssistant: ..."; the prompt is their shared transcript up to and including the last
  "\\n\\nAssistant:", the responses the rest of each (leading space kept, so prompt + chosen is the original);
- conversational: TRL's conversational preference layout and UltraFeedback-binarized, "chosen" and "rejected" lists
  of {"role", "content"} messages ending with the assistant's reply, with or without a "prompt" (a string or a
  message list); the prompt is the conversation before that reply as HH text (the one form prompts take here, see
  data/dialogue.py: a chat policy renders it with its chat template), the responses the replies' content;
- conversational episodes (as `minirlhf feedback export` writes pairs of whole episodes): "prompt" the opening
  messages, "chosen" and "rejected" everything after it (assistant turns with the user's messages between them),
  which differ before their last message; each response is the rest of its conversation as the HH text that follows
  the opening's "\n\nAssistant:" (`rest_text`), so a reward model reading `dialogue_text(prompt, chosen)` reads the
  whole chosen conversation.

The layout is read from the first row of a file or dataset; a later row that does not fit it names its line.
"""

from __future__ import annotations

import os
from typing import Callable

from minirlhf import DataError
from minirlhf.data.dialogue import ROLES, from_messages, prompt_of

ASSISTANT = "\n\nAssistant:"
ACCEPTED = ('{"prompt", "chosen", "rejected"} strings, Anthropic HH text {"chosen", "rejected"} (whole '
            '"\\n\\nHuman: ... \\n\\nAssistant: ..." transcripts), or "chosen"/"rejected" message lists (TRL '
            'conversational, UltraFeedback-binarized)')

Converter = Callable[[dict, str], tuple[str, str, str]]


def detect(obj: dict, where: str) -> Converter:
    """The converter of the layout `obj` (the first row) is in; an unknown layout is a one-line error."""
    present = [k for k in ("chosen", "rejected") if k in obj]
    if len(present) == 1:
        missing = "rejected" if present == ["chosen"] else "chosen"
        raise DataError(f"{where}: missing field {missing!r}; each line needs \"chosen\" and \"rejected\"")
    if not present:
        fields = ", ".join(sorted(obj)[:8]) or "none"
        raise DataError(f"{where}: not a known preference layout (fields: {fields}); give {ACCEPTED}")
    if isinstance(obj["chosen"], list):
        return from_conversation
    if "prompt" in obj or "messages" in obj:
        return from_pair
    return from_hh


def _require(obj: dict, where: str, keys: tuple[str, ...]) -> None:
    for key in keys:
        if key not in obj:
            raise DataError(f"{where}: missing field {key!r}; each line of this file needs "
                            f"{', '.join(repr(k) for k in keys)}, as its first line has")


def _strings(obj: dict, where: str) -> tuple[str, str]:
    _require(obj, where, ("chosen", "rejected"))
    for key in ("chosen", "rejected"):
        if not isinstance(obj[key], str):
            raise DataError(f"{where}: field {key!r} must be a string, got {obj[key]!r}")
    return obj["chosen"], obj["rejected"]


def from_pair(obj: dict, where: str) -> tuple[str, str, str]:
    """{"prompt", "chosen", "rejected"}: the prompt as data/dialogue.py reads it, the responses as they are."""
    if "prompt" not in obj and "messages" not in obj:
        raise DataError(f"{where}: missing field 'prompt'; each line needs \"prompt\", \"chosen\" and \"rejected\"")
    chosen, rejected = _strings(obj, where)
    return prompt_of(obj, where), chosen, rejected


def from_hh(obj: dict, where: str) -> tuple[str, str, str]:
    """Two whole HH transcripts: the prompt is their common part cut back to its last "\\n\\nAssistant:"."""
    chosen, rejected = _strings(obj, where)
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(ASSISTANT)
    if cut < 0:
        raise DataError(f"{where}: no \"prompt\", and \"chosen\" and \"rejected\" are not HH transcripts sharing "
                        "the dialogue up to \"\\n\\nAssistant:\"; add a \"prompt\" field, or give " + ACCEPTED)
    end = cut + len(ASSISTANT)
    return common[:end], chosen[end:], rejected[end:]


def _reply(messages, key: str, where: str) -> str:
    """The content of the final assistant message of a "chosen" or "rejected" list."""
    last = messages[-1] if isinstance(messages, list) and messages else None
    if not isinstance(last, dict) or last.get("role") != "assistant" or not isinstance(last.get("content"), str):
        raise DataError(f"{where}: {key!r} must be a list of {{\"role\", \"content\"}} messages ending with the "
                        f"assistant's reply, got {messages!r:.120}")
    return last["content"]


def _turns(messages: list) -> list[tuple]:
    """(role, content) of each message: datasets adds the other messages' keys (as None) to every message."""
    return [(m.get("role"), m.get("content")) if isinstance(m, dict) else (None, m) for m in messages]


def from_conversation(obj: dict, where: str) -> tuple[str, str, str]:
    """Message lists: the shared conversation before the final assistant turns (or the "prompt") as HH text."""
    _require(obj, where, ("chosen", "rejected"))
    chosen, rejected = _reply(obj["chosen"], "chosen", where), _reply(obj["rejected"], "rejected", where)
    head = obj["chosen"][:-1]
    if _turns(head) != _turns(obj["rejected"][:-1]):
        return from_episodes(obj, where)
    prompt = obj.get("prompt")
    if isinstance(prompt, list) and _turns(head[: len(prompt)]) != _turns(prompt):
        head = prompt + head  # TRL's explicit prompt: "chosen" holds only what follows it
    if head:
        return from_messages(head, where), chosen, rejected
    if prompt is None:
        raise DataError(f"{where}: \"chosen\" and \"rejected\" hold only the replies and there is no \"prompt\"; "
                        "add the prompt (a string or a message list)")
    return prompt_of({"prompt": prompt}, where), chosen, rejected


def rest_text(messages: list, where: str = "conversation") -> str:
    """The messages after an opening (the assistant's turns, the user's between them) as the HH text that follows
    the opening's final "\\n\\nAssistant:", "reply 1\\n\\nHuman: more?\\n\\nAssistant: reply 2" (one reply: its
    content), so a judge given (opening, this) reads the same whole conversation a reward model does."""
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages] if isinstance(messages, list) else []
    if not roles or roles[0] != "assistant" or roles[-1] != "assistant" or not set(roles) <= {"user", "assistant"} \
            or not all(isinstance(m.get("content"), str) for m in messages):
        raise DataError(f"{where}: the conversation after the opening must be {{\"role\", \"content\"}} messages of "
                        f"the assistant and the user, first and last the assistant's, got {messages!r:.120}")
    if len(messages) == 1:
        return messages[0]["content"]
    first, *rest = messages
    return first["content"].strip() + "".join(f"\n\n{ROLES[m['role']]}: {m['content'].strip()}" for m in rest)


def _opening_length(chosen: list, rejected: list) -> int:
    """Messages the two conversations share up to their last user message before they part (0: none)."""
    shared = 0
    pairs = zip(_turns(chosen), _turns(rejected))
    while (step := next(pairs, None)) is not None and step[0] == step[1]:
        shared += 1
    users = [i for i, (role, _) in enumerate(_turns(chosen[:shared])) if role == "user"]
    return users[-1] + 1 if users else 0


def from_episodes(obj: dict, where: str) -> tuple[str, str, str]:
    """Two conversations that part before their last message (pairs of whole episodes): the opening is the
    "prompt" (messages, or a string) when "chosen" and "rejected" hold only what follows it, else the messages they
    share up to the last user message before they part; each response is the rest of its conversation
    (`rest_text`)."""
    chosen, rejected, prompt = obj["chosen"], obj["rejected"], obj.get("prompt")
    given = isinstance(prompt, list) and prompt and _turns(chosen[: len(prompt)]) != _turns(prompt)
    explicit = isinstance(prompt, str) or given
    if explicit:
        return prompt_of({"prompt": prompt}, where), rest_text(chosen, where), rest_text(rejected, where)
    n = _opening_length(chosen, rejected)
    if n == 0:
        raise DataError(f"{where}: \"chosen\" and \"rejected\" differ before their last message and share no "
                        "opening; they must hold the same conversation up to a user message (or give the opening as "
                        "\"prompt\")")
    return from_messages(chosen[:n], where), rest_text(chosen[n:], where), rest_text(rejected[n:], where)
