"""Verifiable instructions (IFEval-style): each kind is a pure check `(text, **params) -> bool`, a sentence a user
would say, a way to draw its parameters, and the kinds it cannot be given together with.

The rules are small and exact, so a reward built from them is never a judgement call, and the parameters are sized
for a short reply (about 40 tokens) from a small chat model: word limits of 15..40, 1..3 sentences, 2..4 bullets, and
words drawn from short lists of common words.

Shared definitions, used by every check:
  * a *word* is a run of ASCII letters and digits, inner apostrophes kept: `don't` is one word, `rock-and-roll` three,
    `3.5` two (`words()` below); letters outside ASCII split words;
  * words are compared case-insensitively (the instructions quote them in lowercase);
  * a reply with no words satisfies nothing: an instruction is kept by an answer, not by silence (otherwise an empty
    reply would earn the reward of "no commas", "lowercase", "at most N words" and "do not use X").
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable

WORD = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z0-9]+)*")

INCLUDE_WORDS = ("sun", "friend", "water", "happy", "home", "music", "light", "simple", "today", "small")
"""words a reply must use: common, and fitting almost any topic"""
AVOID_WORDS = ("very", "really", "good", "great", "just", "also")
"""words a reply must not use: ones a chat model reaches for without thinking, so avoiding them takes care"""
START_WORDS = ("sure", "yes", "well", "okay", "hello", "first")
END_PHRASES = ("hope this helps", "that is all", "thank you", "the end", "see you soon", "have a nice day")
"""the four lists share no word, so no drawn pair of instructions can ask for a word and forbid it"""


def words(text: str) -> list[str]:
    """The words of `text` in order (see the module docstring for what a word is)."""
    return WORD.findall(text)


def _lower_words(text: str) -> list[str]:
    return [w.lower() for w in words(text)]


def max_words(text: str, n: int) -> bool:
    """At least one and at most `n` words."""
    return 1 <= len(words(text)) <= n


def lowercase(text: str) -> bool:
    """Some words, and no uppercase letter anywhere (any alphabet: `str.isupper` per character)."""
    return bool(words(text)) and not any(c.isupper() for c in text)


def no_commas(text: str) -> bool:
    """Some words, and no ASCII comma ","."""
    return bool(words(text)) and "," not in text


def include_word(text: str, word: str) -> bool:
    """`word` appears as a whole word, any case: "Sun" counts for "sun", "sunny" and "sun's" do not."""
    return word.lower() in _lower_words(text)


def no_word(text: str, word: str) -> bool:
    """Some words, and `word` never appears as a whole word, any case ("very" forbids "Very", not "every")."""
    found = _lower_words(text)
    return bool(found) and word.lower() not in found


def start_with(text: str, word: str) -> bool:
    """The first word is `word`, any case; what comes before it that is not a word (spaces, quotes, "**", "- ") is
    ignored, so "Sure! ..." and "**Sure**, ..." both start with "sure"."""
    found = _lower_words(text)
    return bool(found) and found[0] == word.lower()


def end_with(text: str, phrase: str) -> bool:
    """The reply ends with `phrase`, any case, its words separated by any whitespace, starting at a word boundary
    ("the end" is not ended by "bathe end"), followed by nothing but a run of . ! ? and whitespace: "... Hope this
    helps!" ends with "hope this helps"; "... hope this helps :)" and "... hope this helps, Tom." do not."""
    body = r"\s+".join(re.escape(w) for w in phrase.split())
    return bool(phrase.strip()) and re.search(rf"(?<![A-Za-z0-9']){body}[.!?]*\s*\Z", text, re.IGNORECASE) is not None


def sentences(text: str, n: int) -> bool:
    """Exactly `n` sentences. The text is cut after every run of . ! ? that is followed by whitespace or the end
    ("3.5" and "e.g.x" are not cut; "e.g. this" is), and a piece is a sentence if it has a word, so a last sentence
    without a final mark counts and "..." alone does not. Line breaks do not end sentences."""
    pieces = re.split(r"[.!?]+(?=\s|\Z)", text)
    return sum(1 for piece in pieces if WORD.search(piece)) == n


def bullets(text: str, n: int) -> bool:
    """Exactly `n` bullet items: lines that, after leading spaces, start with "- " or "* " and hold a word. Other
    lines (an opening or closing sentence) are allowed; "•" and numbered lines are not items."""
    items = [line for line in text.splitlines() if re.match(r"\s*[-*] ", line) and WORD.search(line)]
    return len(items) == n


def uppercase_word(text: str) -> bool:
    """At least one word with two or more letters, all of them capitals ("NOW", "OK", "I'M"; not "I" or "A1")."""
    return any(sum(c.isalpha() for c in w) >= 2 and w == w.upper() for w in words(text))


@dataclass(frozen=True)
class Kind:
    """One kind of instruction: its check, how its parameters are drawn, and how a user says it."""

    check: Callable[..., bool]
    draw: Callable[[random.Random], dict]
    phrase: Callable[[dict], str]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


KINDS: dict[str, Kind] = {
    "max_words": Kind(max_words, lambda r: {"n": r.choice((15, 20, 25, 30, 40))},
                      lambda p: f"Answer in at most {p['n']} words."),
    "lowercase": Kind(lowercase, lambda r: {},
                      lambda p: "Write your whole answer in lowercase letters, with no capital letters."),
    "no_commas": Kind(no_commas, lambda r: {}, lambda p: "Do not use any commas."),
    "include_word": Kind(include_word, lambda r: {"word": r.choice(INCLUDE_WORDS)},
                         lambda p: f'Use the word "{p["word"]}" somewhere in your answer.'),
    "no_word": Kind(no_word, lambda r: {"word": r.choice(AVOID_WORDS)},
                    lambda p: f'Do not use the word "{p["word"]}".'),
    "start_with": Kind(start_with, lambda r: {"word": r.choice(START_WORDS)},
                       lambda p: f'Start your answer with the word "{p["word"]}".'),
    "end_with": Kind(end_with, lambda r: {"phrase": r.choice(END_PHRASES)},
                     lambda p: f'End your answer with the words "{p["phrase"]}".'),
    "sentences": Kind(sentences, lambda r: {"n": r.randint(1, 3)},
                      lambda p: f"Answer in exactly {_plural(p['n'], 'sentence')}."),
    "bullets": Kind(bullets, lambda r: {"n": r.randint(2, 4)},
                    lambda p: f"Answer with a list of exactly {_plural(p['n'], 'bullet point')}, each on its own "
                              f'line starting with "- ".'),
    "uppercase_word": Kind(uppercase_word, lambda r: {},
                           lambda p: "Write at least one word in all capital letters."),
}
"""every kind by name; the dict's order is the order candidates are drawn from, so keep it fixed"""

CONFLICTS = frozenset({frozenset({"lowercase", "uppercase_word"}), frozenset({"sentences", "bullets"})})
"""pairs of kinds never given in one episode: a capital word cannot be lowercase, and a list's items have no sentence
count a user could agree on. Other pairs hold together by the rules above: start/end words match in any case, so they
sit with "lowercase"; bullets are at most 4 items, so they fit in the smallest word limit (15); the word lists are
disjoint, so "use X" and "do not use Y" never clash; and each kind is given at most once per episode, so there are
never two word limits or two endings."""


def conflicts(a: str, b: str) -> bool:
    """Whether kinds `a` and `b` may not be given in the same episode (a kind also conflicts with itself)."""
    return a == b or frozenset({a, b}) in CONFLICTS


@dataclass(frozen=True)
class Instruction:
    """A drawn instruction: its kind, the parameters of its check, and the sentence the user says."""

    kind: str
    params: dict
    text: str

    def check(self, reply: str) -> bool:
        """Whether `reply` keeps this instruction."""
        return KINDS[self.kind].check(reply, **self.params)

    @property
    def clause(self) -> str:
        """The instruction as part of a sentence ("Do not use any commas." -> "do not use any commas"), for the
        follow-up turns' "Now answer again, and this time ...". Every phrasing starts with a verb, so lowering its
        first letter is safe."""
        return self.text[0].lower() + self.text[1:].removesuffix(".")


def make(kind: str, **params) -> Instruction:
    """The instruction of `kind` with these parameters, phrased as a user says it."""
    if kind not in KINDS:
        raise KeyError(f"unknown instruction kind {kind!r}; known: {', '.join(KINDS)}")
    return Instruction(kind, dict(params), KINDS[kind].phrase(params))


def draw(rng: random.Random, given: list[str] | tuple[str, ...] = (), kinds=None) -> Instruction | None:
    """A new instruction whose kind is among `kinds` (default: all), neither in `given` nor in conflict with any kind
    there, drawn with `rng`; None when no kind is left."""
    candidates = [k for k in KINDS if (kinds is None or k in kinds) and not any(conflicts(k, g) for g in given)]
    if not candidates:
        return None
    kind = rng.choice(candidates)
    return make(kind, **KINDS[kind].draw(rng))
