"""A simulated annotator that judges pairs on the real feedback page, over HTTP, as a browser does.

`minirlhf feedback simulate --url URL --token ADMIN_TOKEN --judge RUN_DIR|module:function --labels N` makes K
annotators on the admin page (`simulated-1` ... `simulated-K`, each with its own link), then each, in turn, opens
its page, reads the prompt and the two responses, and posts its choice with the page's CSRF token and an Origin
header. The store records them as it records people.

The judge scores each response; the annotator prefers A with probability sigmoid(beta (r_A - r_B)), the
Bradley–Terry model of a person whose agreement with the judge is set by beta (Gao et al., 2022, label noise of
the gold reward model). beta -> infinity always picks the judge's choice; beta = 0 is a coin. Every draw is seeded.
"""

from __future__ import annotations

import html.parser
import math
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from http.cookiejar import CookieJar
from typing import Callable

import torch

from minirlhf import ConfigError, RunError, UserError
from minirlhf.feedback.store import Store
from minirlhf.models.judge import Judge, judge_kind, load_judge
from minirlhf.models.rewards import Reward, RewardConfig
from minirlhf.training import progress

def reward_of(judge: str, response_len: int, device) -> Reward:
    """A judge (classifier run, reward-model run or module:function) as the reward that scores policies."""
    kind = judge_kind(judge)
    if kind == "function":
        return Reward(RewardConfig(function=judge, classifier_weight=0.0), response_len, device)
    return Reward(RewardConfig(**{kind: judge}), response_len, device)


def judge_agreement(store: Store, judge) -> float:
    """Share of the store's A/B judgements that pick the response the judge scores higher (a tie counts half)."""
    rows = store.conn.execute("SELECT p.prompt, p.response_a, p.response_b, j.choice FROM judgements j JOIN pairs p "
                              "ON p.id = j.pair_id WHERE j.undone IS NULL AND j.choice IN ('a', 'b')").fetchall()
    if not rows:
        return float("nan")
    a = judge([r[0] for r in rows], [r[1] for r in rows])
    b = judge([r[0] for r in rows], [r[2] for r in rows])
    picked_a = torch.tensor([r[3] == "a" for r in rows])
    agree = torch.where(a == b, 0.5, ((a > b) == picked_a).float())
    return agree.mean().item()


def prefers_a(score_a: float, score_b: float, beta: float, rng: random.Random) -> bool:
    """One Bradley–Terry draw: True with probability sigmoid(beta (score_a - score_b))."""
    z = beta * (score_a - score_b)
    p = 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))
    return rng.random() < p


def beta_for_agreement(differences: list[float], agreement: float) -> float:
    """The beta at which the simulated annotator agrees with the judge on `agreement` of pairs whose score
    differences are `differences`: mean sigmoid(beta |d|) = agreement, solved by bisection (it rises with beta)."""
    if not 0.5 < agreement < 1:
        raise ConfigError(f"agreement must be in (0.5, 1), got {agreement}")
    d = torch.tensor([abs(x) for x in differences], dtype=torch.float64)
    lo, hi = 0.0, 1.0
    while torch.sigmoid(hi * d).mean() < agreement and hi < 1e6:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if torch.sigmoid(mid * d).mean() < agreement else (lo, mid)
    return (lo + hi) / 2


@dataclass
class Shown:
    """What the annotation page shows: the pair's id, its prompt and two responses, and the form's CSRF token."""

    pair_id: int
    prompt: str
    response_a: str
    response_b: str
    csrf: str


class _PageReader(html.parser.HTMLParser):
    """Reads a page: its inputs (first value of each name), the prompt's turns, the two responses' text, and the
    admin page's new link. A `.text` div holds only text; what it belongs to is the last turn or response opened."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.inputs: dict[str, str] = {}
        self.turns: list[tuple[str, str]] = []  # (role, text) of the prompt
        self.responses: dict[str, str] = {}
        self.new_link: str | None = None
        self._owner: str | None = None  # "turn:ROLE" or "response:a|b"
        self._text: list[str] | None = None
        self._empty = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "input" and a.get("name"):
            self.inputs.setdefault(a["name"], a.get("value") or "")
        if a.get("id") == "new-link":
            self.new_link = a.get("value")
        if (a.get("id") or "").startswith("response-"):
            self._owner = "response:" + a["id"][len("response-"):]
        elif tag == "div" and "turn" in classes:
            self._owner = "turn:" + next((c for c in classes if c != "turn"), "user")
        elif tag == "div" and "text" in classes and self._owner is not None:
            self._text, self._empty = [], "empty" in classes

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag != "div" or self._text is None:
            return
        kind, name = self._owner.split(":", 1)
        text = "" if self._empty else "".join(self._text)
        if kind == "turn":
            self.turns.append((name, text))
        else:
            self.responses[name] = text
        self._text = None


def prompt_from_turns(turns: list[tuple[str, str]]) -> str:
    """The prompt as stored: a single user turn is the plain prompt, more turns are HH dialogue text."""
    if len(turns) == 1 and turns[0][0] == "user":
        return turns[0][1]
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "".join(f"\n\n{names.get(role, 'Human')}: {text}" for role, text in turns) + "\n\nAssistant:"


class Browser:
    """One annotator's browser: a cookie jar, an Origin header on every request, redirects followed. Its first request
    carries the link's token, which the page moves into a cookie (a 303 to the address without it); nothing after
    carries the token."""

    def __init__(self, url: str, token: str, timeout: float = 60.0):
        self.url, self.token, self.timeout = url.rstrip("/"), token, timeout
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
        self.signed_in, self.status = False, 0

    def open(self, path: str, form: dict | None = None, refused_ok: bool = False) -> str:
        """The page at `path` (a POST of `form` if given); with `refused_ok` a 409 (the page, with why it refused the
        form) is an answer, not an error."""
        if not self.signed_in:  # the favicon: a GET that signs in without putting a pair on this annotator's screen
            self._open("/static/favicon.svg?" + urllib.parse.urlencode({"token": self.token}), None, False)
            self.signed_in = True
        return self._open(path, form, refused_ok)

    def _open(self, path: str, form: dict | None, refused_ok: bool) -> str:
        request = urllib.request.Request(f"{self.url}{path}", headers={"Origin": self.url})
        if form is not None:
            request.data = urllib.parse.urlencode(form).encode()
        try:
            with self.opener.open(request, timeout=self.timeout) as response:
                self.status = response.status
                return response.read().decode("utf-8")
        except urllib.error.HTTPError as e:
            body = e.read().decode("utf-8", "replace").strip()
            if refused_ok and e.code == 409:
                self.status = e.code
                return body
            raise RunError(f"the feedback page at {self.url} answered {path.split('?')[0]} with {e.code}: "
                           f"{body[:200]}") from e
        except (urllib.error.URLError, OSError) as e:
            raise RunError(f"cannot reach the feedback page at {self.url} ({e}); is `minirlhf feedback serve` "
                           "running there?") from e

    def next_pair(self) -> Shown | None:
        """The pair on this annotator's page, or None while the page asks to wait."""
        page = _PageReader()
        page.feed(self.open("/"))
        if "pair_id" not in page.inputs:
            return None
        return Shown(int(page.inputs["pair_id"]), prompt_from_turns(page.turns), page.responses.get("a", ""),
                     page.responses.get("b", ""), page.inputs["csrf"])

    def judge(self, shown: Shown, choice: str) -> bool:
        """Post the choice; False if the page refused it (e.g. others labelled the pair while it was on screen)."""
        self.open("/judge", {"csrf": shown.csrf, "pair_id": str(shown.pair_id), "choice": choice}, refused_ok=True)
        return self.status != 409

    def add_annotator(self, name: str) -> str:
        """(As the admin) a new annotator's token, made on the admin page as a person would."""
        page = _PageReader()
        page.feed(self.open("/admin"))
        page_with_link = _PageReader()
        page_with_link.feed(self.open("/admin", {"csrf": page.inputs.get("csrf", ""), "name": name}))
        if page_with_link.new_link is None:
            raise RunError(f"the admin page at {self.url} made no link for {name!r}")
        return urllib.parse.parse_qs(urllib.parse.urlsplit(page_with_link.new_link).query)["token"][0]


@dataclass
class Tally:
    labels: int = 0
    agree: float = 0.0
    """labels that pick the response the judge scores higher (a tie in score counts half)"""
    waited_s: float = 0.0

    @property
    def agreement(self) -> float:
        return self.agree / max(1, self.labels)


def simulate(url: str, admin_token: str, judge: Judge, labels: int, beta: float = 1.0, annotators: int = 1,
             seed: int = 0, timeout_s: float = 600.0, show_progress: bool = True,
             check: Callable[[], None] | None = None) -> Tally:
    """Make `annotators` simulated annotators on the page and let them give `labels` A/B judgements in turn (each
    waits while the generator is behind, for `timeout_s` at most in all; `check` raises if it never will)."""
    if labels < 1 or annotators < 1 or beta < 0:
        raise ConfigError(f"--labels and --annotators must be >= 1 and --beta >= 0, got {labels}, {annotators}, {beta}")
    admin = Browser(url, admin_token)
    names = [f"simulated-{i + 1}" for i in range(annotators)]
    browsers = [Browser(url, admin.add_annotator(name)) for name in names]
    rngs = [random.Random(f"{seed}-{name}") for name in names]
    tally, deadline = Tally(), time.monotonic() + timeout_s
    bar = progress(None, "simulate", total=labels, unit="label", disable=not show_progress)
    turn = 0
    while tally.labels < labels:
        i = turn % annotators
        turn += 1
        shown = browsers[i].next_pair()
        if shown is None:
            if check is not None:
                check()
            _wait(tally, deadline, url, timeout_s)
            continue
        scores = judge([shown.prompt] * 2, [shown.response_a, shown.response_b]).tolist()
        choice = "a" if prefers_a(scores[0], scores[1], beta, rngs[i]) else "b"
        if not browsers[i].judge(shown, choice):  # not recorded (the pair had its labels meanwhile): the next one
            _wait(tally, deadline, url, timeout_s)
            continue
        tally.labels += 1
        tally.agree += 0.5 if scores[0] == scores[1] else float((scores[0] > scores[1]) == (choice == "a"))
        bar.update(1)
    bar.close()
    return tally


def _wait(tally: Tally, deadline: float, url: str, timeout_s: float) -> None:
    if time.monotonic() > deadline:
        raise RunError(f"the page at {url} had no pair to judge for {timeout_s:.0f} s; is its generator running "
                       "(see the server's output), or raise --timeout")
    time.sleep(0.2)
    tally.waited_s += 0.2


def main(args) -> int:
    """`minirlhf feedback simulate`."""
    token = args.token or dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(args.url).query)).get("token")
    if not token:
        raise UserError("--token is needed: the admin token (the `token=` of the admin link the server printed)")
    url = urllib.parse.urlunsplit(urllib.parse.urlsplit(args.url)._replace(path="", query=""))
    judge = load_judge(args.judge)
    tally = simulate(url, token, judge, args.labels, args.beta, args.annotators, args.seed, args.timeout)
    print(f"{tally.labels} judgements by {args.annotators} simulated annotator(s) at beta {args.beta}; "
          f"agreement with the judge {tally.agreement:.3f}")
    return 0
