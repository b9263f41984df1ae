"""`hf:NAME[:split]` data sources, read with `datasets.load_dataset`: a hub dataset, or a local folder or data file.

Every reader (preference pairs, sentiment texts, prompts) gets the same rows a JSON Lines file gives it, as
(`where`, row) with `where` = `hf:NAME:split[i]`, so a bad row is reported as precisely as a bad line.
Without the hub (offline, or HF_HUB_OFFLINE=1, which the CLI sets when the hub does not answer) a hub name is a
one-line error that says how to save the dataset as a file where there is a network, and pass that file instead.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from minirlhf import DataError

PREFIX = "hf:"
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow",
            ".txt": "text"}
"""datasets' loader for each kind of local data file (a folder needs none: datasets infers it)"""


class HubUnreachable(DataError):
    """A hub dataset asked for while the hub cannot be reached."""


def is_hub(source) -> bool:
    return isinstance(source, str) and source.startswith(PREFIX)


def parse(source: str) -> tuple[str, str | None]:
    """(name, split) of `hf:NAME[:split]`; the split may be a slice, `train[:1000]`."""
    name, _, split = source[len(PREFIX):].partition(":")
    if not name:
        raise DataError(f"{source!r} names no dataset; write hf:NAME or hf:NAME:SPLIT, e.g. hf:Anthropic/hh-rlhf:test")
    return name, split or None


def load_splits(source: str, flag: str, wanted: tuple[str, ...] | None = None) -> dict[str, list[tuple[str, dict]]]:
    """{split: [(where, row), ...]} of `hf:NAME[:split]`: the split named, the dataset's only split, or of a dataset
    with several, those in `wanted` (all if None; then it must have a `train` split)."""
    name, split = parse(source)
    data = _load(name, split, flag)
    parts = {split: data} if split is not None else dict(data)
    if len(parts) > 1 and wanted is not None:
        if "train" not in parts:
            raise DataError(f"{source} has the splits {', '.join(parts)} and none is 'train'; pick one with "
                            f"{source}:SPLIT")
        parts = {s: rows for s, rows in parts.items() if s in wanted}
    return {s: [(f"{PREFIX}{name}:{s}[{i}]", dict(row)) for i, row in enumerate(rows)] for s, rows in parts.items()}


def load_rows(source: str, flag: str) -> list[tuple[str, dict]]:
    """The rows of one split: the one named, else `train`, else the dataset's only split."""
    rows = next(iter(load_splits(source, flag, ("train",)).values()))
    if not rows:
        raise DataError(f"{source}: the dataset is empty")
    return rows


def _load(name: str, split: str | None, flag: str):
    """`datasets.load_dataset` of a hub name, a local folder or a local data file; failures as one-line errors."""
    try:
        import datasets  # heavy (pyarrow, pandas): only for hf: sources
    except ImportError as e:
        raise DataError(f"hf:{name} needs the datasets package ({e}); run `pip install datasets`") from e
    path = Path(name).expanduser()
    if not path.exists() and name.startswith(("/", ".", "~")):  # a path, not a hub name: no network can help
        raise DataError(f"hf:{name}: no such folder or file; give an existing folder or data file, or a hub name")
    if path.is_file() and path.suffix.lower() not in BUILDERS:
        raise DataError(f"hf:{name}: unknown file type {path.suffix!r}; give a folder or a {'/'.join(BUILDERS)} file")
    try:
        if path.is_file():  # datasets reads a folder by itself, a single file through the loader of its kind
            return datasets.load_dataset(BUILDERS[path.suffix.lower()], data_files=str(path), split=split)
        return datasets.load_dataset(str(path) if path.exists() else name, split=split)
    except Exception as e:  # datasets and huggingface_hub raise many kinds; all are one line to the user
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        if path.exists():
            raise DataError(f"cannot read hf:{name} with datasets ({reason}); check the files in {name}") from e
        if _offline(e):
            raise HubUnreachable(_offline_message(name, split, flag)) from e
        raise DataError(f"cannot load {name!r} from the Hugging Face hub ({reason}); check the name and split") from e


def _hub_offline() -> bool:
    from huggingface_hub import constants  # installed with datasets

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")


def _offline(e: Exception) -> bool:
    """Whether a failed hub load is the network's doing (rather than a wrong name or split)."""
    kinds = " ".join(t.__name__ for t in type(e).__mro__)
    return _hub_offline() or isinstance(e, ConnectionError) or re.search(r"Connect|Timeout|Offline", kinds) is not None


def _offline_message(name: str, split: str | None, flag: str) -> str:
    why = "HF_HUB_OFFLINE=1" if _hub_offline() else "no network"
    split = split or "train"
    file = re.sub(r"[^\w.-]+", "_", f"{name.split('/')[-1]}-{split}").strip("_") + ".jsonl"
    return (f"cannot load {name!r} from the Hugging Face hub ({why}); where you are online, save it as a file with "
            f"`python -c \"import datasets; datasets.load_dataset('{name}', split='{split}').to_json('{file}')\"` "
            f"and pass {flag}={file} instead")
