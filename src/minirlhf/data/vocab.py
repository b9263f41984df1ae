"""Word-level tokenizer and vocabulary for the LSTM generator."""

from __future__ import annotations

import html
import re
from collections import Counter
from pathlib import Path

from minirlhf import DataError
from minirlhf.checkpoint import load_json, save_json

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIALS = [PAD, UNK, BOS, EOS]

_URL = re.compile(r"https?://\S+|www\.\S+")
_USER = re.compile(r"@\w+")
_HTML = re.compile(r"<br\s*/?>|<[^>]{1,20}>")
# words (with inner apostrophes: don't, it's), numbers, placeholders, or single ASCII punctuation
# marks but "_"; anything else (emoji, mis-decoded bytes) is dropped, which keeps a small vocabulary clean
_TOKEN = re.compile(r"<url>|@user|[a-z0-9]+(?:'[a-z]+)?|[!-/:-@\[-^`{-~]")


def tokenize(text: str) -> list[str]:
    """Lower-case words and single punctuation marks; URLs and @mentions become placeholders."""
    text = _HTML.sub(" ", html.unescape(text))
    text = _URL.sub(" <url> ", text)
    text = _USER.sub(" @user ", text)
    return _TOKEN.findall(text.lower().replace("\u2019", "'"))


def detokenize(tokens: list[str]) -> str:
    """Join tokens into readable text: no space before punctuation or after an opening bracket."""
    text = " ".join(tokens)
    text = re.sub(r" ([.,!?;:%)\]}])", r"\1", text)
    text = re.sub(r"([(\[{#$]) ", r"\1", text)
    return text


class Vocab:
    def __init__(self, itos: list[str]):
        if itos[: len(SPECIALS)] != SPECIALS:
            raise DataError(f"vocabulary must start with {SPECIALS}; the vocab file is damaged")
        self.itos = list(itos)
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    pad_id, unk_id, bos_id, eos_id = 0, 1, 2, 3

    @classmethod
    def build(cls, texts, min_freq: int = 2, max_size: int = 10000) -> "Vocab":
        """The `max_size` most frequent words seen at least `min_freq` times (specials included)."""
        counts = Counter(tok for t in texts for tok in tokenize(t))
        words = [w for w, c in sorted(counts.items(), key=lambda wc: (-wc[1], wc[0])) if c >= min_freq and w not in SPECIALS]
        return cls(SPECIALS + words[: max_size - len(SPECIALS)])

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str, bos: bool = True, eos: bool = True) -> list[int]:
        ids = [self.stoi.get(tok, self.unk_id) for tok in tokenize(text)]
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids, skip_special: bool = True) -> str:
        toks = []
        for i in ids:
            i = int(i)
            if i == self.eos_id and skip_special:
                break
            if skip_special and i in (self.pad_id, self.bos_id):
                continue
            toks.append(self.itos[i])
        return detokenize(toks)

    def save(self, path: Path) -> None:
        save_json({"itos": self.itos}, path)

    @classmethod
    def load(cls, path: Path) -> "Vocab":
        data = load_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("itos"), list):
            raise DataError(f"{path} is not a minirlhf vocabulary file (expected {{\"itos\": [...]}})")
        return cls(data["itos"])
