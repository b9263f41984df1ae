"""Configuration: one dataclass per stage, layered as defaults < YAML file < dotted overrides.

A stage config is a dataclass whose fields are plain values or nested dataclasses; each field
has a docstring right below it (cleanrl style). Range and choice rules live next to the fields
in a `checks` class variable, e.g. `checks = {"lr": "> 0", "device": "{auto,cpu,cuda,mps}"}`; a subclass lists
only its own rules: those of its bases apply too (`checks_of`), and a rule of the same key replaces theirs.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, ClassVar

import yaml

from minirlhf import ConfigError, RunError
from minirlhf.checkpoint import atomic_write_text


@dataclasses.dataclass
class DataConfig:
    """Where the sentiment texts come from and how they are split."""

    source: str = "tweets"
    """corpus name (`tweets`, `imdb`), hf:NAME[:split] (a Hugging Face dataset, or a local folder or data file read
    through `datasets`, with a text or sentence column and a label column), an aclImdb-style folder, or a .jsonl/.csv
    file with text (or sentence) and label"""
    test_source: str | None = None
    """optional separate test set (same kinds as `source`; one with splits gives its test split); then `source` is
    split into train/val only"""
    val_fraction: float = 0.1
    """fraction of the labelled texts held out for validation"""
    test_fraction: float = 0.1
    """fraction held out for the final test (ignored when the source or test_source has its own test set)"""
    max_train: int | None = None
    """use at most this many training texts (None: all)"""
    max_eval: int | None = None
    """use at most this many validation and test texts each (None: all)"""
    split_seed: int = 0
    """seed of the deterministic shuffle that makes the splits"""

    checks: ClassVar[dict] = {
        "val_fraction": "(0, 0.5]",
        "test_fraction": "[0, 0.5]",
        "max_train": ">= 1",
        "max_eval": ">= 1",
    }


DEVICES = "{auto,cpu,cuda,mps}"


@dataclasses.dataclass
class RunConfig:
    """What every stage's top-level config has: where the run goes, on what device, with what seed."""

    out: str | None = None
    """run directory (default: a new folder under runs/)"""
    device: str = "auto"
    """auto (CUDA, then MPS, then CPU), cpu, cuda or mps"""
    seed: int = 0
    """seed of every random choice: initialisation, dropout, data order, sampling"""
    dtype: str = "auto"
    """arithmetic of the forward passes: auto (bf16 autocast on a CUDA card that has it, else fp32), fp32, bf16 or
    fp16 (autocast; the weights and optimizer state stay fp32)"""
    report_to: str = "none"
    """dashboards beside metrics.jsonl: tensorboard, wandb, trackio (several, comma-separated) or none"""

    checks: ClassVar[dict] = {"device": DEVICES, "dtype": "{auto,fp32,bf16,fp16}"}


@dataclasses.dataclass
class TrainingRunConfig(RunConfig):
    """A stage that trains in steps: it checkpoints, and `--resume RUN_DIR` continues it from its last checkpoint."""

    save_every: int = 200
    """checkpoint every this many steps (and at the end)"""
    keep_checkpoints: int = 2
    """checkpoints kept: the last (checkpoint/) and those before it (checkpoint-STEP/), so that one damaged or
    unwanted checkpoint still leaves an earlier one to resume from"""
    guards: str = "warn"
    """what a run does on trouble. An update whose gradients are not finite is always skipped, the weights untouched:
    warn says so at the first, counts them (`train/skipped_updates`) and stops after 10 in a row; strict stops the
    run at the first (its last checkpoint intact); off only counts. RL also runs its health checks (guards.py):
    warn prints each once, strict stops, off checks none"""
    strategy: str = "ddp"
    """how the RL and DPO policy trains under torchrun: ddp (a whole copy in every process) or fsdp (PyTorch's FSDP2:
    each process keeps 1/K of the trained weights, their gradients and Adam state); one process: no difference"""
    dist_timeout_s: float = 1800.0
    """under torchrun, how long a process waits for the others at a collective before the run stops with one line"""

    checks: ClassVar[dict] = {"save_every": ">= 1", "keep_checkpoints": ">= 1",
                              "guards": "{warn,strict,off}", "strategy": "{ddp,fsdp}", "dist_timeout_s": "> 0"}


@dataclasses.dataclass
class OptimizerConfig:
    """The optimiser, under `train.` in every stage: what RL needs of it."""

    lr: float = 1e-4
    """peak AdamW learning rate"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this"""

    checks: ClassVar[dict] = {"lr": "> 0", "max_grad_norm": "> 0"}


@dataclasses.dataclass
class OptimConfig(OptimizerConfig):
    """AdamW with linear warm-up and decay over passes of a fixed data set: what every supervised stage shares."""

    epochs: int = 3
    """passes over the training split"""
    batch_size: int = 32
    """texts per optimizer step"""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay"""
    warmup_ratio: float = 0.1
    """fraction of steps with linear warm-up; the rest decays linearly to zero"""
    log_every: int = 20
    """write the training loss to metrics.jsonl every this many steps"""

    checks: ClassVar[dict] = {"epochs": ">= 1", "batch_size": ">= 1", "weight_decay": ">= 0",
                              "warmup_ratio": "[0, 1]", "log_every": ">= 1"}


@dataclasses.dataclass
class MicroBatchOptimConfig(OptimConfig):
    """OptimConfig for stages whose step batch is read in smaller forward passes (SFT, DPO), logged every step."""

    epochs: int = 1
    micro_batch_size: int = 4
    """examples per forward pass; a step accumulates the gradients of batch_size / micro_batch_size passes"""
    weight_decay: float = 0.0
    log_every: int = 1

    checks: ClassVar[dict] = {"micro_batch_size": ">= 1"}


@dataclasses.dataclass
class SplitConfig:
    """Which examples train and which are held out: what SFT, DPO and the reward model share."""

    eval_file: str | None = None
    """held-out examples or pairs (.jsonl or hf:NAME[:split], any layout the training data takes); default: hold
    out `eval_fraction` of the prompts of the training data"""
    eval_fraction: float = 0.1
    """share of the prompts (of plain texts: of the texts) held out"""
    max_train: int | None = None
    """use at most this many training examples or pairs (None: all)"""
    max_eval: int | None = None
    """use at most this many held-out examples or pairs (None: all)"""
    split_seed: int = 0
    """seed of the shuffle that splits them by prompt"""

    checks: ClassVar[dict] = {"eval_fraction": "(0, 0.5]", "max_train": ">= 1", "max_eval": ">= 1"}


@dataclasses.dataclass
class PreferenceDataConfig(SplitConfig):
    """Preference pairs and how they are split: what DPO and the reward model share."""

    preferences: str = ""
    """preference pairs: a .jsonl file or hf:NAME[:split] (default split: train) of {"prompt", "chosen", "rejected"}
    (e.g. from `minirlhf feedback export`), Anthropic HH text {"chosen", "rejected"}, or TRL conversational /
    UltraFeedback-binarized message lists"""


# ---------------------------------------------------------------------------- loading


def load_config(cls: type, path: str | None = None, overrides: list[str] | None = None, base=None):
    """Build a `cls` instance from its defaults (or `base`), then a YAML file, then `--a.b=value` overrides."""
    values: dict = {}
    if path is not None:
        values = _read_yaml(path)
    for item in overrides or []:
        key, raw = _split_override(item)
        _set_dotted(values, key, raw)
    return _build(cls, values, prefix="", base=base)


def _read_yaml(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML ({first}); fix the file") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, not {type(data).__name__}")
    return data


def _split_override(item: str) -> tuple[str, Any]:
    """`--a.b=value`, or `--a.b` alone: a switch, true (a field that is not a boolean says so in its check)."""
    m = re.fullmatch(r"--([A-Za-z_][\w.]*)(?:=(.*))?", item, flags=re.S)
    if not m:
        raise ConfigError(f"cannot read option {item!r}; write overrides as --section.key=value")
    return m.group(1), _Raw("true" if m.group(2) is None else m.group(2))


class _Raw(str):
    """A value typed on the command line: parsed as YAML unless the field is a string."""


def _set_dotted(values: dict, key: str, raw: Any) -> None:
    node = values
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = raw


def _build(cls: type, values: dict, prefix: str, base=None):
    """Lay `values` over `base` (default: the class defaults), checking keys, types and ranges."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.')} is a section; give it a mapping, not {values!r}")
    base = cls() if base is None else base
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r}; known keys here: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, prefix + name + ".", getattr(base, name))
        else:
            kwargs[name] = _coerce(value, hint, prefix + name)
    obj = dataclasses.replace(base, **kwargs)
    _check(obj, prefix)
    return obj


def _coerce(value: Any, hint: Any, key: str):
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else (hint,)
    if isinstance(value, _Raw):
        if str in allowed:
            return str(value)
        value = yaml.safe_load(value) if value.strip() else None
    for t in allowed:
        if t is type(None) and value is None:
            return None
        if t is float and (number := _number(value)) is not None:
            if not math.isfinite(number):  # inf and nan pass every "> 0"-style range check
                raise ConfigError(f"{key} must be a finite number, got {value}")
            return number
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t in (str, bool) and isinstance(value, t):
            return value
        if typing.get_origin(t) is list and isinstance(value, list):
            return list(value)
    want = " or ".join("null" if t is type(None) else getattr(t, "__name__", str(t)) for t in allowed)
    raise ConfigError(f"{key} must be {want}, got {value!r}")


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_NOT_FINITE = re.compile(r"[-+]?\.?(inf|infinity|nan)", flags=re.I)
"""inf and nan as typed (`inf`, `-Infinity`, `NaN`; YAML's `.inf` and `.nan`), read as numbers to refuse them by name"""


def _number(value) -> float | None:
    """`value` as a float if it is a number: an int or float, or a string that spells one (YAML 1.1 reads 3e-5, with
    no dot, and 1e400 as strings)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return math.inf if isinstance(value, int) and abs(value) >= 2 ** 1024 else float(value)  # float() overflows
    text = value.strip() if isinstance(value, str) else ""
    if _FLOAT.fullmatch(text):
        return float(text)
    if _NOT_FINITE.fullmatch(text):
        return float(text.replace(".", ""))  # float() reads inf and nan, not YAML's .inf and .nan
    return None


_RANGE = re.compile(r"([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])")


def checks_of(cls: type) -> dict[str, str]:
    """The rules of `cls` and of every base it inherits, the nearest class's rule winning."""
    merged: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        merged.update(vars(klass).get("checks", {}))
    return merged


def _check(obj, prefix: str) -> None:
    for name, rule in checks_of(type(obj)).items():
        value = getattr(obj, name)
        if value is None:
            continue
        if not _passes(value, rule):
            raise ConfigError(f"{prefix}{name} must be {rule}, got {value!r}")


def _passes(value, rule: str) -> bool:
    if rule.startswith("{"):
        return value in [c.strip() for c in rule.strip("{}").split(",")]
    if m := _RANGE.fullmatch(rule):
        lo, hi = float(m.group(2)), float(m.group(3))
        above = value >= lo if m.group(1) == "[" else value > lo
        below = value <= hi if m.group(4) == "]" else value < hi
        return above and below
    op, bound = rule.split()
    return {">": value > float(bound), ">=": value >= float(bound),
            "<": value < float(bound), "<=": value <= float(bound)}[op]


# ---------------------------------------------------------------------------- output


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_yaml_dict(path: Path) -> dict:
    """A config file a run wrote, as plain nested values ({} when it is missing)."""
    return _read_yaml(str(path)) if Path(path).is_file() else {}


def load_saved(cls: type, path: Path):
    """Read a config a run wrote (`config.yaml`) back into its dataclass."""
    if not path.is_file():
        raise RunError(f"{path} is missing; is {path.parent} a run directory of this stage?")
    return _build(cls, _read_yaml(str(path)), prefix="")


def describe(cfg, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, value, docstring) for every field of a config instance, for `--help`."""
    docs = _field_docs(type(cfg))
    rows = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            rows += describe(value, prefix + f.name + ".")
        else:
            rows.append((prefix + f.name, value, docs.get(f.name, "")))
    return rows


def _field_docs(cls: type) -> dict[str, str]:
    """Read the docstring under each field from the class source (base classes first)."""
    docs = {}
    for base in reversed(cls.__mro__[1:]):
        if dataclasses.is_dataclass(base):
            docs.update(_field_docs(base))
    try:
        tree = ast.parse(inspect.getsource(cls).lstrip())
    except (OSError, TypeError, SyntaxError):
        return docs
    body = tree.body[0].body
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs
