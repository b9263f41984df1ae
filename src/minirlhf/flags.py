"""Configs on the command line: `describe` lists every field with its docstring, choices, bounds and resume rule (the
`--help` of every command); `add_flags` makes an argparse argument of each field of a flat config dataclass (a command
that trains nothing) and `from_args` builds the config back from them, typed and checked as a stage's config is
(config.py)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import typing
from typing import Any

from minirlhf import ConfigError
from minirlhf.config import Raw, build, choices, rule_text, rules_of


def flag_name(cls: type, name: str) -> str:
    """How a tool config's field is written on the command line: `--max-new-tokens`, `-n`, or `run_dir`."""
    meta = rules_of(cls).get(name, {})
    return name if meta.get("positional") else meta.get("flag") or "--" + name.replace("_", "-")


def add_flags(parser, cls: type) -> None:
    """An argparse argument per field of the flat config `cls` of a tool (a command that trains nothing), its help
    the field's docstring with its choices, bounds and default; values are read and checked by `from_args`."""
    defaults, hints = cls(), typing.get_type_hints(cls)
    docs = {key: doc for key, _, doc in describe(defaults)}
    for name, meta in ((f.name, rules_of(cls).get(f.name, {})) for f in dataclasses.fields(cls)):
        shown = "" if meta.get("required") or meta.get("positional") else f" (default: {getattr(defaults, name)!r})"
        kw = {"help": (docs[name] + shown).replace("%", "%%"), "metavar": meta.get("metavar")}
        if meta.get("positional"):
            parser.add_argument(name, nargs=meta.get("nargs"), **kw)
            continue
        if hints[name] is bool:
            kw = {"help": kw["help"], "action": "store_const", "const": True}
        elif typing.get_origin(hints[name]) is list:
            kw["action"] = "append"
        parser.add_argument(flag_name(cls, name), dest=name, default=argparse.SUPPRESS,
                            required=meta.get("required", False), **kw)


def from_args(cls: type, args):
    """The tool config `cls` from parsed flags (those not given keep their defaults), typed and checked as a stage's
    config is; an error names the flag as typed (`--top-p must be (0, 1], got 2.0`)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: Raw(v) if isinstance(v, str) else v for k, v in vars(args).items() if k in names}
    try:
        return build(cls, values, prefix="")
    except ConfigError as e:
        if e.key not in names:
            raise
        raise ConfigError(key=flag_name(cls, e.key), problem=e.problem) from None


def describe(cfg, prefix: str = "", fixed: bool = False) -> list[tuple[str, Any, str]]:
    """(dotted key, value, docstring with its choices, bounds and resume rule) for every field of a config instance,
    for `--help`; `fixed`: the section is fixed on resume."""
    docs, rules, hints = _field_docs(type(cfg)), rules_of(type(cfg)), typing.get_type_hints(type(cfg))
    rows = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            rows += describe(value, prefix + f.name + ".", fixed or rules.get(f.name, {}).get("fixed_on_resume", False))
            continue
        rule = rules.get(f.name, {}) | ({"fixed_on_resume": True} if fixed else {})
        limits = [f"one of {', '.join(map(str, choices(hints[f.name])))}" if choices(hints[f.name]) else None,
                  rule_text(rule), "fixed on --resume" if rule.get("fixed_on_resume") else None]
        doc = "; ".join(x for x in [docs.get(f.name, "")] + [x for x in limits if x])
        rows.append((prefix + f.name, value, doc))
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
