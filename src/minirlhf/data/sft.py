"""Examples for supervised fine-tuning: a prompt and the response to learn, from JSON Lines or `hf:NAME[:split]` (a
Hugging Face dataset, or a local folder or data file read through `datasets`; see data/hub.py) in any of the forms
minirlhf reads elsewhere:

- {"prompt", "response"}: the prompt (a string, HH text or a message list) and its response;
- {"messages": [...]}: a conversation whose last turn, the assistant's, is the response;
- {"text"}: a plain text, all of it the response to an empty prompt;
- {"prompt", "chosen", "rejected"}: a preference pair, whose chosen side is the response.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from minirlhf import DataError
from minirlhf.data import hub
from minirlhf.data.dialogue import from_messages, prompt_of
from minirlhf.data.sentiment import jsonl_objects

FORMS = "\"prompt\" and \"response\", \"messages\", \"text\", or \"prompt\" and \"chosen\""


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str


def _example(obj: dict, where: str) -> Example:
    if "response" in obj or "chosen" in obj:
        response = obj.get("response", obj.get("chosen"))
        prompt = prompt_of(obj, where)
    elif "messages" in obj:
        turns = obj["messages"]
        if not isinstance(turns, list) or len(turns) < 2 or not isinstance(turns[-1], dict) or \
                turns[-1].get("role") != "assistant":
            raise DataError(f"{where}: \"messages\" must end with the assistant's turn, the response to learn")
        prompt, response = from_messages(turns[:-1], where), turns[-1].get("content")
    elif "text" in obj:
        prompt, response = "", obj["text"]
    else:
        raise DataError(f"{where}: each line needs {FORMS}")
    if not isinstance(response, str) or not response.strip():
        raise DataError(f"{where}: the response must be a non-empty string, got {response!r}")
    return Example(prompt, response)


def read_examples(path: str | Path, flag: str = "--data") -> list[Example]:
    """Every example of a .jsonl file or an `hf:` dataset; a bad row stops with `file:line: problem`. `flag` is the
    option that gave the source, for the offline error's advice."""
    if hub.is_hub(str(path)):
        rows = hub.load_rows(str(path), flag)
    elif not Path(path).is_file():
        raise DataError(f"SFT data {path} does not exist; give a .jsonl file of {FORMS}, or hf:DATASET[:split]")
    else:
        rows = jsonl_objects(Path(path), (), FORMS)
    return [_example(obj, where) for where, obj in rows]


def split_examples(examples: list[Example], eval_fraction: float, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(training, held-out) examples, split by prompt (plain texts, which have none, one by one) with a seeded
    shuffle, so no held-out prompt was trained on."""
    keys = sorted({e.prompt or e.response for e in examples})
    random.Random(f"{seed}-sft").shuffle(keys)
    held = set(keys[: max(1, round(len(keys) * eval_fraction))]) if len(keys) > 1 else set()
    train = [e for e in examples if (e.prompt or e.response) not in held]
    evals = [e for e in examples if (e.prompt or e.response) in held]
    if not train or not evals:
        raise DataError(f"{len(examples)} examples over {len(keys)} prompts are too few to hold some out; give more "
                        "examples, or held-out ones with eval_file")
    return train, evals
