"""The feedback store: one SQLite file in WAL mode, shared by the web server's threads and the pair generator.

- annotators: a name and the SHA-256 of a secret token (the token itself is never stored);
- pairs: a prompt, two responses in the order shown (A, B), and the model and sampling settings behind each
  response as JSON (provenance_a, provenance_b); `wanted` is how many people should judge it (2 for overlap);
- judgements: one row per choice (a, b, tie or skip); undo marks the row `undone`, and a partial UNIQUE index
  keeps one live judgement per annotator and pair, so a double submit can never count twice;
- assignments: the pair each annotator has on screen, so two people are not shown the same fresh pair.

Each thread opens its own connection; writes take the lock up front (BEGIN IMMEDIATE) and wait for it.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
import threading
import time
from collections import Counter
from contextlib import contextmanager
from datetime import datetime, timezone
from itertools import combinations
from pathlib import Path

from minirlhf import UserError
from minirlhf.checkpoint import atomic_write_text
from minirlhf.data.preferences import read_pairs

CHOICES = ("a", "b", "tie", "skip")
ASSIGNMENT_TTL_S = 600.0
"""a pair shown to someone who does not judge it within this time may be shown to someone else"""

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS annotators (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, token_sha256 TEXT NOT NULL UNIQUE,
    is_admin INTEGER NOT NULL DEFAULT 0, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pairs (
    id INTEGER PRIMARY KEY, prompt TEXT NOT NULL, response_a TEXT NOT NULL, response_b TEXT NOT NULL,
    provenance_a TEXT NOT NULL, provenance_b TEXT NOT NULL, wanted INTEGER NOT NULL DEFAULT 1, created TEXT NOT NULL,
    priority REAL NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS judgements (
    id INTEGER PRIMARY KEY, pair_id INTEGER NOT NULL REFERENCES pairs(id),
    annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'skip')), created TEXT NOT NULL, undone TEXT);
CREATE UNIQUE INDEX IF NOT EXISTS one_live_judgement ON judgements(pair_id, annotator_id) WHERE undone IS NULL;
CREATE INDEX IF NOT EXISTS judgements_by_annotator ON judgements(annotator_id, id);
CREATE TABLE IF NOT EXISTS assignments (
    annotator_id INTEGER PRIMARY KEY REFERENCES annotators(id), pair_id INTEGER NOT NULL REFERENCES pairs(id),
    since REAL NOT NULL);
CREATE INDEX IF NOT EXISTS assignments_by_pair ON assignments(pair_id);
"""

# Per pair: its live labels (a, b, tie) and how many other people have it on screen now.
_CANDIDATES = """
SELECT * FROM (
    SELECT p.*,
        (SELECT COUNT(*) FROM judgements j WHERE j.pair_id = p.id AND j.undone IS NULL AND j.choice != 'skip') AS labels,
        (SELECT COUNT(*) FROM assignments s WHERE s.pair_id = p.id AND s.annotator_id != :me AND s.since > :fresh)
            AS on_screen
    FROM pairs p
    WHERE NOT EXISTS (SELECT 1 FROM judgements j WHERE j.pair_id = p.id AND j.annotator_id = :me AND j.undone IS NULL))
"""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class Store:
    """The database at `path`; `create=False` insists that it exists (export)."""

    def __init__(self, path: str | Path, create: bool = True):
        self.path = Path(path)
        if self.path.is_dir() or (not create and not self.path.is_file()):
            raise UserError(f"no feedback database at {self.path}; give the --db file `minirlhf feedback serve` wrote")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._secret: bytes | None = None
        try:
            self.conn.executescript(SCHEMA)
            columns = {row["name"] for row in self.conn.execute("PRAGMA table_info(pairs)")}
            if "priority" not in columns:  # a database from before active pair choice
                self.conn.execute("ALTER TABLE pairs ADD COLUMN priority REAL NOT NULL DEFAULT 0")
        except sqlite3.DatabaseError as e:
            raise UserError(f"{self.path} is not a feedback database ({e}); give another --db path") from e

    @property
    def conn(self) -> sqlite3.Connection:
        """This thread's connection (autocommit; `write()` groups statements into one transaction)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, nor it them
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    @contextmanager
    def write(self):
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def secret(self) -> bytes:
        """The server's secret (created once): the key of the CSRF tokens, which then survive restarts."""
        if self._secret is None:
            with self.write() as c:
                c.execute("INSERT OR IGNORE INTO meta VALUES ('csrf_secret', ?)", (secrets.token_hex(32),))
                self._secret = bytes.fromhex(c.execute("SELECT value FROM meta WHERE key = 'csrf_secret'").fetchone()[0])
        return self._secret

    # --- annotators ---

    def set_annotator(self, name: str, is_admin: bool = False) -> str:
        """A new secret token for `name`, who is created or whose old token stops working."""
        token = secrets.token_urlsafe(24)
        with self.write() as c:
            c.execute("INSERT INTO annotators (name, token_sha256, is_admin, created) VALUES (?, ?, ?, ?) "
                      "ON CONFLICT(name) DO UPDATE SET token_sha256 = excluded.token_sha256",
                      (name, token_hash(token), int(is_admin), now()))
        return token

    def annotator(self, token: str) -> sqlite3.Row | None:
        return self.conn.execute("SELECT id, name, is_admin FROM annotators WHERE token_sha256 = ?",
                                 (token_hash(token),)).fetchone()

    def admin_token(self, file: Path) -> str:
        """The admin's token, kept in a 0600 file beside the database so that the admin link survives restarts."""
        if file.is_file():
            token = file.read_text(encoding="utf-8").strip()
            row = self.annotator(token)
            if row is not None and row["is_admin"]:
                return token
        token = self.set_annotator("admin", is_admin=True)
        atomic_write_text(file, token + "\n")  # mkstemp makes it 0600; chmod says so
        os.chmod(file, 0o600)
        return token

    # --- pairs and judgements ---

    def add_pair(self, prompt: str, response_a: str, response_b: str, provenance_a: dict, provenance_b: dict,
                 wanted: int = 1, priority: float = 0.0) -> int:
        """A new pair; among fresh pairs, the one with the highest `priority` is served first (then the oldest)."""
        with self.write() as c:
            cur = c.execute("INSERT INTO pairs (prompt, response_a, response_b, provenance_a, provenance_b, wanted, "
                            "created, priority) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            (prompt, response_a, response_b, json.dumps(provenance_a), json.dumps(provenance_b),
                             wanted, now(), priority))
        return cur.lastrowid

    def next_pair(self, me: int) -> sqlite3.Row | None:
        """The pair on `me`'s screen, else the oldest that still needs a second label, else the fresh one of highest
        priority (then oldest) that nobody else has on screen; None when there is none (the generator is behind)."""
        with self.write() as c:
            row = c.execute("SELECT p.* FROM assignments s JOIN pairs p ON p.id = s.pair_id WHERE s.annotator_id = ? "
                            "AND NOT EXISTS (SELECT 1 FROM judgements j WHERE j.pair_id = p.id "
                            "AND j.annotator_id = s.annotator_id AND j.undone IS NULL)", (me,)).fetchone()
            if row is None:
                row = c.execute(_CANDIDATES + " WHERE labels + on_screen < wanted "
                                "ORDER BY labels > 0 DESC, priority DESC, id LIMIT 1",
                                {"me": me, "fresh": time.time() - ASSIGNMENT_TTL_S}).fetchone()
            if row is not None:
                c.execute("INSERT INTO assignments VALUES (?, ?, ?) ON CONFLICT(annotator_id) DO UPDATE SET "
                          "pair_id = excluded.pair_id, since = excluded.since", (me, row["id"], time.time()))
        return row

    def waiting(self, me: int) -> int:
        """Pairs that `me` could still judge."""
        return self.conn.execute(f"SELECT COUNT(*) FROM ({_CANDIDATES}) WHERE labels < wanted",
                                 {"me": me, "fresh": 0}).fetchone()[0]

    def fresh(self) -> int:
        """Pairs nobody has judged or has on screen: what the generator keeps `--ahead` of."""
        return self.conn.execute(
            "SELECT COUNT(*) FROM pairs p WHERE NOT EXISTS (SELECT 1 FROM judgements j WHERE j.pair_id = p.id "
            "AND j.undone IS NULL) AND NOT EXISTS (SELECT 1 FROM assignments s WHERE s.pair_id = p.id AND s.since > ?)",
            (time.time() - ASSIGNMENT_TTL_S,)).fetchone()[0]

    def unjudged(self) -> list[sqlite3.Row]:
        """Every pair with no live judgement yet: the candidates a new reward model can re-rank."""
        return self.conn.execute("SELECT * FROM pairs p WHERE NOT EXISTS (SELECT 1 FROM judgements j "
                                 "WHERE j.pair_id = p.id AND j.undone IS NULL) ORDER BY id").fetchall()

    def set_priorities(self, priorities: dict[int, float]) -> None:
        """New priorities by pair id (e.g. uncertainty under a reward model retrained since the pairs were made)."""
        with self.write() as c:
            c.executemany("UPDATE pairs SET priority = ? WHERE id = ?", [(v, k) for k, v in priorities.items()])

    def judge(self, me: int, pair_id: int, choice: str) -> bool:
        """Record `me`'s choice on a pair; False if the pair does not exist or `me` has judged it already."""
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {CHOICES}, got {choice!r}")
        with self.write() as c:
            if c.execute("SELECT 1 FROM pairs WHERE id = ?", (pair_id,)).fetchone() is None:
                return False
            cur = c.execute("INSERT OR IGNORE INTO judgements (pair_id, annotator_id, choice, created) "
                            "VALUES (?, ?, ?, ?)", (pair_id, me, choice, now()))
            c.execute("DELETE FROM assignments WHERE annotator_id = ? AND pair_id = ?", (me, pair_id))
        return cur.rowcount == 1

    def undo(self, me: int) -> int | None:
        """Take back `me`'s latest live judgement and put its pair back on their screen; its pair id."""
        with self.write() as c:
            row = c.execute("SELECT id, pair_id FROM judgements WHERE annotator_id = ? AND undone IS NULL "
                            "ORDER BY id DESC LIMIT 1", (me,)).fetchone()
            if row is None:
                return None
            c.execute("UPDATE judgements SET undone = ? WHERE id = ?", (now(), row["id"]))
            c.execute("INSERT INTO assignments VALUES (?, ?, ?) ON CONFLICT(annotator_id) DO UPDATE SET "
                      "pair_id = excluded.pair_id, since = excluded.since", (me, row["pair_id"], time.time()))
        return row["pair_id"]

    # --- figures ---

    def counts(self, me: int | None = None) -> dict:
        """Live judgements by choice (of `me`, or of everyone), with the number of pairs."""
        where, args = ("AND annotator_id = ?", (me,)) if me is not None else ("", ())
        rows = self.conn.execute(f"SELECT choice, COUNT(*) FROM judgements WHERE undone IS NULL {where} "
                                 "GROUP BY choice", args).fetchall()
        out = {c: 0 for c in CHOICES} | {r[0]: r[1] for r in rows}
        out["pairs"] = self.conn.execute("SELECT COUNT(*) FROM pairs").fetchone()[0]
        return out

    def annotator_table(self) -> list[dict]:
        rows = self.conn.execute(
            "SELECT a.name, a.is_admin, a.created, COUNT(j.id) AS total, "
            + ", ".join(f"SUM(j.choice = '{c}') AS {c}" for c in CHOICES)
            + " FROM annotators a LEFT JOIN judgements j ON j.annotator_id = a.id AND j.undone IS NULL "
            "GROUP BY a.id ORDER BY a.id").fetchall()
        return [{k: (r[k] or 0) if k in CHOICES else r[k] for k in r.keys()} for r in rows]

    def labels_per_pair(self) -> list[list[str]]:
        """The live a/b/tie labels of each pair that has two or more, in the order they were given."""
        rows = self.conn.execute("SELECT pair_id, choice FROM judgements WHERE undone IS NULL AND choice != 'skip' "
                                 "ORDER BY pair_id, id").fetchall()
        by_pair: dict[int, list[str]] = {}
        for pair_id, choice in rows:
            by_pair.setdefault(pair_id, []).append(choice)
        return [labels for labels in by_pair.values() if len(labels) >= 2]

    def policy_scores(self) -> list[float]:
        """1 / 0.5 / 0 per live judgement of a policy-vs-reference pair: the policy won, tied, lost."""
        rows = self.conn.execute("SELECT p.provenance_a, p.provenance_b, j.choice FROM judgements j "
                                 "JOIN pairs p ON p.id = j.pair_id WHERE j.undone IS NULL AND j.choice != 'skip'")
        scores = (policy_score(json.loads(a), json.loads(b), choice) for a, b, choice in rows)
        return [s for s in scores if s is not None]


def policy_score(provenance_a: dict, provenance_b: dict, choice: str) -> float | None:
    """How the policy fared in one judgement; None unless the pair is the policy against its reference."""
    roles = (provenance_a.get("role"), provenance_b.get("role"))
    if set(roles) != {"policy", "reference"} or choice not in ("a", "b", "tie"):
        return None
    if choice == "tie":
        return 0.5
    return 1.0 if roles["ab".index(choice)] == "policy" else 0.0


def agreement(labels_per_pair: list[list[str]]) -> dict:
    """Percent agreement and Cohen's kappa between the first and the second label of each doubly-labelled
    pair (every two labels of a pair with more). kappa = (p_o - p_e) / (1 - p_e), where p_e is the agreement
    expected by chance from the two positions' label frequencies; None where p_e = 1 (one label only)."""
    items = [pair for labels in labels_per_pair for pair in combinations(labels, 2)]
    n = len(items)
    if n == 0:
        return {"n": 0, "agreement": None, "kappa": None}
    p_o = sum(x == y for x, y in items) / n
    first, second = Counter(x for x, _ in items), Counter(y for _, y in items)
    p_e = sum(first[c] * second[c] for c in first) / n ** 2
    return {"n": n, "agreement": p_o, "kappa": (p_o - p_e) / (1 - p_e) if p_e < 1 else None}


def win_rate(scores: list[float]) -> dict:
    """The policy's win rate over judgements of policy-vs-reference pairs, ties counting half."""
    n = len(scores)
    return {"n": n, "win_rate": sum(scores) / n if n else None, "wins": scores.count(1.0),
            "ties": scores.count(0.5), "losses": scores.count(0.0)}


def export_jsonl(db: str | Path, out: str | Path) -> int:
    """Write every live a/b judgement as {"prompt", "chosen", "rejected", "annotator", "pair_id"}, atomically."""
    store = Store(db, create=False)
    rows = store.conn.execute(
        "SELECT p.id, p.prompt, p.response_a, p.response_b, j.choice, a.name FROM judgements j "
        "JOIN pairs p ON p.id = j.pair_id JOIN annotators a ON a.id = j.annotator_id "
        "WHERE j.undone IS NULL AND j.choice IN ('a', 'b') ORDER BY j.id").fetchall()
    if not rows:
        raise UserError(f"{db} has no A/B judgements yet (ties and skips are not exported); judge some pairs first")
    lines = [json.dumps({"prompt": prompt, "chosen": a if choice == "a" else b, "rejected": b if choice == "a" else a,
                         "annotator": name, "pair_id": pair_id}, ensure_ascii=False)
             for pair_id, prompt, a, b, choice, name in rows]
    atomic_write_text(Path(out), "\n".join(lines) + "\n")
    return len(lines)


def import_jsonl(paths: list[str], db: str | Path) -> tuple[int, int]:
    """Load preference files as pairs judged by `import:FILENAME`; (pairs added, pairs already there).

    Every file is validated before anything is written; importing a file again adds nothing."""
    files = [(Path(p), read_pairs(p)) for p in paths]
    store = Store(db)
    added = skipped = 0
    for path, pairs in files:
        name = f"import:{path.name}"
        with store.write() as c:
            c.execute("INSERT OR IGNORE INTO annotators (name, token_sha256, is_admin, created) VALUES (?, ?, 0, ?)",
                      (name, token_hash(secrets.token_urlsafe(24)), now()))  # a token nobody is told: no login
            me = c.execute("SELECT id FROM annotators WHERE name = ?", (name,)).fetchone()[0]
            seen = set(map(tuple, c.execute("SELECT p.prompt, p.response_a, p.response_b FROM pairs p JOIN judgements j "
                                 "ON j.pair_id = p.id WHERE j.annotator_id = ?", (me,))))
            for pair in pairs:
                if (pair.prompt, pair.chosen, pair.rejected) in seen:
                    skipped += 1
                    continue
                side = {"source": "import", "file": str(path)}
                cur = c.execute("INSERT INTO pairs (prompt, response_a, response_b, provenance_a, provenance_b, "
                                "wanted, created) VALUES (?, ?, ?, ?, ?, 1, ?)",
                                (pair.prompt, pair.chosen, pair.rejected, json.dumps(side | {"role": "chosen"}),
                                 json.dumps(side | {"role": "rejected"}), now()))
                c.execute("INSERT INTO judgements (pair_id, annotator_id, choice, created) VALUES (?, ?, 'a', ?)",
                          (cur.lastrowid, me, now()))
                added += 1
    return added, skipped
