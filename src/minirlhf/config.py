"""Configuration: one dataclass per stage, layered as defaults < YAML file < dotted overrides.

A stage config is a dataclass whose fields are plain values or nested dataclasses; each field has a docstring right
below it (cleanrl style), which is its `--help`. Choices are `Literal` types (`device: Literal["auto", "cpu"]`);
bounds, and whether a resumed run may change a field, are in its metadata through `setting` (`lr: float =
setting(1e-4, gt=0)`, `seed: int = setting(0, fixed_on_resume=True)`). A subclass that declares a field again keeps
the bounds its bases gave it, unless it gives its own (`rules_of`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from minirlhf import ConfigError, RunError
from minirlhf.checkpoint import atomic_write_text


BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def setting(default=dataclasses.MISSING, *, default_factory=dataclasses.MISSING, gt=None, ge=None, lt=None, le=None,
            fixed_on_resume: bool = False, **flag):
    """A config field with its bounds (`gt=0`: above 0; `ge=0, le=1`: in [0, 1]) and whether `--resume` refuses to
    change it (a resumed run would then no longer repeat the uninterrupted one); None bounds are left out. A tool's
    field (`add_flags`) may say how its flag is written: `flag="-n"`, `positional=True`, `nargs="+"`,
    `required=True`, `metavar="RUN_DIR"`."""
    meta = {k: v for k, v in dict(gt=gt, ge=ge, lt=lt, le=le).items() if v is not None} | flag
    if fixed_on_resume:
        meta["fixed_on_resume"] = True
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


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
    val_fraction: float = setting(0.1, gt=0, le=0.5)
    """fraction of the labelled texts held out for validation"""
    test_fraction: float = setting(0.1, ge=0, le=0.5)
    """fraction held out for the final test (ignored when the source or test_source has its own test set)"""
    max_train: int | None = setting(None, ge=1)
    """use at most this many training texts (None: all)"""
    max_eval: int | None = setting(None, ge=1)
    """use at most this many validation and test texts each (None: all)"""
    split_seed: int = 0
    """seed of the deterministic shuffle that makes the splits"""



@dataclasses.dataclass
class DeviceConfig:
    """What every command that runs a model has: the device."""

    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """auto (CUDA, then MPS, then CPU), cpu, cuda or mps"""


@dataclasses.dataclass
class RunConfig(DeviceConfig):
    """What every stage's top-level config has: where the run goes, on what device, with what seed."""

    out: str | None = setting(None, fixed_on_resume=True)
    """run directory (default: a new folder under runs/)"""
    seed: int = setting(0, fixed_on_resume=True)
    """seed of every random choice: initialisation, dropout, data order, sampling"""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """arithmetic of the forward passes: auto (bf16 autocast on a CUDA card that has it, else fp32), fp32, bf16 or
    fp16 (autocast; the weights and optimizer state stay fp32)"""
    report_to: str = "none"
    """dashboards beside metrics.jsonl: tensorboard, wandb, trackio (several, comma-separated) or none"""


@dataclasses.dataclass
class TrainingRunConfig(RunConfig):
    """A stage that trains in steps: it checkpoints, and `--resume RUN_DIR` continues it from its last checkpoint."""

    save_every: int = setting(200, ge=1)
    """checkpoint every this many steps (and at the end)"""
    keep_checkpoints: int = setting(2, ge=1)
    """checkpoints kept: the last (checkpoint/) and those before it (checkpoint-STEP/), so that one damaged or
    unwanted checkpoint still leaves an earlier one to resume from"""
    guards: Literal["warn", "strict", "off"] = "warn"
    """what a run does on trouble. An update whose gradients are not finite is always skipped, the weights untouched:
    warn says so at the first, counts them (`train/skipped_updates`) and stops after 10 in a row; strict stops the
    run at the first (its last checkpoint intact); off only counts. RL also runs its health checks (guards.py):
    warn prints each once, strict stops, off checks none"""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """how the RL and DPO policy trains under torchrun: ddp (a whole copy in every process) or fsdp (PyTorch's FSDP2:
    each process keeps 1/K of the trained weights, their gradients and Adam state); one process: no difference"""
    dist_timeout_s: float = setting(1800.0, gt=0)
    """under torchrun, how long a process waits for the others at a collective before the run stops with one line"""


@dataclasses.dataclass
class OptimizerConfig:
    """The optimiser, under `train.` in every stage: what RL needs of it."""

    lr: float = setting(1e-4, gt=0)
    """peak AdamW learning rate"""
    max_grad_norm: float = setting(1.0, gt=0)
    """clip the global gradient norm to this"""


@dataclasses.dataclass
class OptimConfig(OptimizerConfig):
    """AdamW with linear warm-up and decay over passes of a fixed data set: what every supervised stage shares."""

    epochs: int = setting(3, ge=1)
    """passes over the training split"""
    batch_size: int = setting(32, ge=1, fixed_on_resume=True)
    """texts per optimizer step"""
    weight_decay: float = setting(0.01, ge=0)
    """AdamW decoupled weight decay"""
    warmup_ratio: float = setting(0.1, ge=0, le=1)
    """fraction of steps with linear warm-up; the rest decays linearly to zero"""
    log_every: int = setting(20, ge=1)
    """write the training loss to metrics.jsonl every this many steps"""


@dataclasses.dataclass
class MicroBatchOptimConfig(OptimConfig):
    """OptimConfig for stages whose step batch is read in smaller forward passes (SFT, DPO), logged every step."""

    epochs: int = 1
    micro_batch_size: int = setting(4, ge=1, fixed_on_resume=True)
    """examples per forward pass; a step accumulates the gradients of batch_size / micro_batch_size passes"""
    weight_decay: float = 0.0
    log_every: int = 1


@dataclasses.dataclass
class SplitConfig:
    """Which examples train and which are held out: what SFT, DPO and the reward model share."""

    eval_file: str | None = setting(None, fixed_on_resume=True)
    """held-out examples or pairs (.jsonl or hf:NAME[:split], any layout the training data takes); default: hold
    out `eval_fraction` of the prompts of the training data"""
    eval_fraction: float = setting(0.1, gt=0, le=0.5, fixed_on_resume=True)
    """share of the prompts (of plain texts: of the texts) held out"""
    max_train: int | None = setting(None, ge=1, fixed_on_resume=True)
    """use at most this many training examples or pairs (None: all)"""
    max_eval: int | None = setting(None, ge=1, fixed_on_resume=True)
    """use at most this many held-out examples or pairs (None: all)"""
    split_seed: int = setting(0, fixed_on_resume=True)
    """seed of the shuffle that splits them by prompt"""


@dataclasses.dataclass
class PreferenceDataConfig(SplitConfig):
    """Preference pairs and how they are split: what DPO and the reward model share."""

    preferences: str = setting("", fixed_on_resume=True)
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
    return build(cls, values, prefix="", base=base)


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
    return m.group(1), Raw("true" if m.group(2) is None else m.group(2))


class Raw(str):
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


def build(cls: type, values: dict, prefix: str, base=None):
    """Lay `values` over `base` (default: the class defaults), checking keys, types and ranges."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.')} is a section; give it a mapping, not {values!r}")
    if "checks" in vars(cls):
        raise TypeError(f"{cls.__name__}.checks: write a field's rule where it is declared, as setting(default, ge=1) "
                        "or a Literal type")
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
            kwargs[name] = build(hint, value, prefix + name + ".", getattr(base, name))
        else:
            kwargs[name] = _coerce(value, hint, prefix + name)
    obj = dataclasses.replace(base, **kwargs)
    _check(obj, prefix)
    return obj


def _members(hint) -> tuple:
    """The types of a union (`int | None` -> int, NoneType); a plain type alone."""
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    return typing.get_args(hint) if union else (hint,)


def _coerce(value: Any, hint: Any, key: str):
    allowed = _members(hint)
    if (options := choices(hint)) is not None:
        return _choose(value, options, type(None) in allowed, key)
    if isinstance(value, Raw):
        if str in allowed:
            return str(value)
        value = yaml.safe_load(value) if value.strip() else None
    for t in allowed:
        if t is type(None) and value is None:
            return None
        if t is float and (number := _number(value)) is not None:
            if not math.isfinite(number):  # inf and nan pass every "> 0"-style range check
                raise ConfigError(key=key, problem=f"must be a finite number, got {value}")
            return number
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t in (str, bool) and isinstance(value, t):
            return value
        if typing.get_origin(t) is list and isinstance(value, list):
            return list(value)
    want = " or ".join("null" if t is type(None) else getattr(t, "__name__", str(t)) for t in allowed)
    raise ConfigError(key=key, problem=f"must be {want}, got {value!r}")


def _choose(value: Any, options: tuple, nullable: bool, key: str):
    """A `Literal` field's value: one of `options` as typed (a command line's text is taken as it stands)."""
    if nullable and (value is None or (isinstance(value, Raw) and value.strip() in ("", "null", "~"))):
        return None
    if value in options:
        return str(value) if isinstance(value, Raw) else value
    raise ConfigError(key=key, problem=f"must be one of {', '.join(map(str, options))}, got {str(value)!r}")


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


def rules_of(cls: type) -> dict[str, dict]:
    """Each field's bounds and resume rule, those a base gave it under those of the nearest class that gives any."""
    merged: dict[str, dict] = {}
    for klass in reversed(cls.__mro__):
        for name, f in vars(klass).get("__dataclass_fields__", {}).items():
            if f.metadata and name in vars(klass).get("__annotations__", {}):
                merged.setdefault(name, {}).update(f.metadata)
    return merged


def choices(hint) -> tuple | None:
    """The values a `Literal[...]` field (or `Literal[...] | None`) allows; None for any other type."""
    for t in _members(hint):
        if typing.get_origin(t) is typing.Literal:
            return typing.get_args(t)
    return None


def rule_text(meta: dict) -> str | None:
    """A field's bounds as a reader writes them: `> 0`, `>= 1`, `in [0, 1]`, `in (0, 0.5]`."""
    lo = next(((k, meta[k]) for k in ("gt", "ge") if k in meta), None)
    hi = next(((k, meta[k]) for k in ("lt", "le") if k in meta), None)
    if lo and hi:
        return f"in {'(' if lo[0] == 'gt' else '['}{lo[1]}, {hi[1]}{')' if hi[0] == 'lt' else ']'}"
    one = lo or hi
    return f"{BOUNDS[one[0]]} {one[1]}" if one else None


def _within(value, meta: dict) -> bool:
    tests = {"gt": value.__gt__, "ge": value.__ge__, "lt": value.__lt__, "le": value.__le__}
    return all(tests[k](meta[k]) for k in BOUNDS if k in meta)


def _check(obj, prefix: str) -> None:
    for name, meta in rules_of(type(obj)).items():
        value = getattr(obj, name)
        if value is not None and not _within(value, meta):
            raise ConfigError(key=prefix + name, problem=f"must be {rule_text(meta)}, got {value!r}")


def fixed_on_resume(cls: type, key: str) -> bool:
    """Whether the dotted `key` names a field, or lies in a section, that a resumed run may not change."""
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls) or part not in {f.name for f in dataclasses.fields(cls)}:
            return False
        if rules_of(cls).get(part, {}).get("fixed_on_resume"):
            return True
        cls = typing.get_type_hints(cls)[part]
    return False


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
    return build(cls, _read_yaml(str(path)), prefix="")
