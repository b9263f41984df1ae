"""The feedback store: one SQLite file in WAL mode, shared by the web server's threads and the pair generator.

- meta: the CSRF secret, what the database was made for (purpose.py) and, for a `minirlhf loop` round, its round;
- annotators: names and their links (tokens.py);
- pairs: a prompt, two responses in the order shown (A, B), and the model and sampling settings behind each
  response as JSON (provenance_a, provenance_b); `wanted` is how many people should judge it (2 for overlap). A pair
  of two episodes also keeps each whole conversation as a JSON message list (conversation_a, conversation_b; NULL for
  a pair of single replies), its text columns still filled: the prompt is the shared opening as HH text, each
  response the rest of its conversation as layouts.rest_text renders it, so what reads text reads the conversation;
- judgements: one row per choice (a, b, tie or skip); undo marks the row `undone`, and a partial UNIQUE index
  keeps one live judgement per annotator and pair, so a double submit can never count twice;
- assignments: the pair each annotator has on screen. Only that pair can be judged, so a form for a pair never shown,
  or shown and since judged by enough others, changes nothing.

Each thread opens its own connection; writes take the lock up front (BEGIN IMMEDIATE) and wait for it.
"""

from __future__ import annotations

import json
import math
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from minirlhf import MachineError, UserError
from minirlhf.checkpoint import atomic_write_text
from minirlhf.data.preferences import read_pairs
from minirlhf.feedback import purpose as purposes
from minirlhf.feedback.conversations import exported, split_episodes
from minirlhf.feedback.figures import policy_score
from minirlhf.feedback.tokens import TOKEN_DAYS, Annotators, now, token_hash

CHOICES = ("a", "b", "tie", "skip")
ASSIGNMENT_TTL_S = 600.0
"""a pair shown to someone who does not judge it within this time may be shown to someone else"""
JUDGED, ALREADY_JUDGED, NOT_SHOWN, NOT_NEEDED = "judged", "already judged", "not shown", "not needed"
"""what `Store.judge` made of a judgement"""

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS annotators (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, token_sha256 TEXT NOT NULL UNIQUE,
    is_admin INTEGER NOT NULL DEFAULT 0, created TEXT NOT NULL, expires REAL, revoked TEXT);
CREATE TABLE IF NOT EXISTS pairs (
    id INTEGER PRIMARY KEY, prompt TEXT NOT NULL, response_a TEXT NOT NULL, response_b TEXT NOT NULL,
    provenance_a TEXT NOT NULL, provenance_b TEXT NOT NULL, wanted INTEGER NOT NULL DEFAULT 1, created TEXT NOT NULL,
    priority REAL NOT NULL DEFAULT 0, conversation_a TEXT, conversation_b TEXT);
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

MIGRATIONS = (  # columns a database made by an older minirlhf lacks
    ("pairs", "priority", "REAL NOT NULL DEFAULT 0", None),
    ("annotators", "expires", "REAL", f"UPDATE annotators SET expires = {{now}} + {TOKEN_DAYS * 86400} "
                                      "WHERE name NOT LIKE 'import:%'"),  # links made before expiry: 30 days more
    ("annotators", "revoked", "TEXT", None),
    ("pairs", "conversation_a", "TEXT", None),  # pairs of episodes; NULL: single replies
    ("pairs", "conversation_b", "TEXT", None),
)

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
_ASSIGN = ("INSERT INTO assignments VALUES (?, ?, ?) ON CONFLICT(annotator_id) DO UPDATE SET "
           "pair_id = excluded.pair_id, since = excluded.since")


class Failure(MachineError):
    """Not the user's input but the machine's: the database (locked, disk full) or the pair generator failed."""


LOWEST = float("-inf")
"""the priority a pair gets when its computed one is NaN or infinite (a diverged reward model): served last"""


def priority_of(value) -> float:
    value = float(value)
    return value if math.isfinite(value) else LOWEST


class Store(Annotators):
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
            self._migrate()
        except sqlite3.OperationalError:
            raise  # locked, unreadable, disk full: the environment's, not the file's (commands.py reports it)
        except sqlite3.DatabaseError as e:
            raise UserError(f"{self.path} is not a feedback database ({e}); give another --db path") from e

    def _migrate(self) -> None:
        with self.write() as c:
            for table, column, kind, then in MIGRATIONS:
                if column not in {row["name"] for row in c.execute(f"PRAGMA table_info({table})")}:
                    c.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
                    if then:
                        c.execute(then.format(now=time.time()))

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
        """One transaction: committed when the block ends, rolled back when the block or the COMMIT fails (a failed
        COMMIT, e.g. SQLITE_BUSY or a deferred constraint, leaves it open), so the connection is never left inside
        one."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # some errors (a full disk) roll back by themselves
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:  # the error being raised says more; a fresh connection starts clean
                    conn.close()
                    self._local.conn = None
            raise

    def secret(self) -> bytes:
        """The server's secret (created once): the key of the CSRF tokens, which then survive restarts."""
        if self._secret is None:
            with self.write() as c:
                c.execute("INSERT OR IGNORE INTO meta VALUES ('csrf_secret', ?)", (secrets.token_hex(32),))
                self._secret = bytes.fromhex(c.execute("SELECT value FROM meta WHERE key = 'csrf_secret'").fetchone()[0])
        return self._secret

    def meta(self, key: str):
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def set_meta(self, key: str, value) -> None:
        with self.write() as c:
            c.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                      (key, json.dumps(value)))

    def claim(self, wanted: dict, mix: bool = False) -> None:
        """Record that this database holds pairs for `wanted` (purpose.purpose); one holding pairs made for something
        else stops with one line, unless `mix`. Until a pair is sampled into it, nothing is mixed: the last claim wins.
        A database from before this record is judged by its pairs' provenance."""
        with self.write() as c:
            sampled = {purposes.side_of(json.loads(p)) for row in c.execute("SELECT provenance_a, provenance_b FROM pairs")
                       for p in row} - {None}
            row = c.execute("SELECT value FROM meta WHERE key = 'made_for'").fetchone()
            made_for = json.loads(row[0]) if row and sampled else []
            if not row and sampled and not sampled <= purposes.sides(wanted):
                made_for = [{"policy": "other models or settings (a database from before minirlhf recorded them)"}]
            if made_for and wanted not in made_for and not mix:
                raise UserError(
                    f"{self.path} holds pairs made for other settings ({purposes.differences(made_for[0], wanted)})"
                    "; give --db ANOTHER.sqlite for a database of their own, or --mix to add these pairs to it "
                    "on purpose")
            if wanted not in made_for:
                c.execute("INSERT INTO meta VALUES ('made_for', ?) ON CONFLICT(key) DO UPDATE SET value = "
                          "excluded.value", (json.dumps(made_for + [wanted]),))

    # --- pairs and judgements ---

    def add_pair(self, prompt: str, response_a: str, response_b: str, provenance_a: dict, provenance_b: dict,
                 wanted: int = 1, priority: float = 0.0, conversations: tuple[list, list] | None = None) -> int:
        """A new pair; among fresh pairs, the one with the highest `priority` is served first (then the oldest). A NaN
        or infinite priority is stored as the lowest. `conversations`: a pair of episodes' whole message lists (A, B)
        (`add_episodes` fills the text columns from them)."""
        a, b = (None, None) if conversations is None else (json.dumps(c, ensure_ascii=False) for c in conversations)
        with self.write() as c:
            cur = c.execute("INSERT INTO pairs (prompt, response_a, response_b, provenance_a, provenance_b, wanted, "
                            "created, priority, conversation_a, conversation_b) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (prompt, response_a, response_b, json.dumps(provenance_a), json.dumps(provenance_b),
                             wanted, now(), priority_of(priority), a, b))
        return cur.lastrowid

    def add_episodes(self, conversation_a: list[dict], conversation_b: list[dict], provenance_a: dict,
                     provenance_b: dict, wanted: int = 1, priority: float = 0.0) -> int:
        """A pair of two episodes from the same opening, each a whole conversation (opening first); the text columns
        hold the opening as HH text and each rest as layouts.rest_text renders it, for what reads text."""
        prompt, response_a, response_b = split_episodes(conversation_a, conversation_b).texts()
        return self.add_pair(prompt, response_a, response_b, provenance_a, provenance_b, wanted, priority,
                             (conversation_a, conversation_b))

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
                c.execute(_ASSIGN, (me, row["id"], time.time()))
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
            c.executemany("UPDATE pairs SET priority = ? WHERE id = ?",
                          [(priority_of(v), k) for k, v in priorities.items()])

    def judge(self, me: int, pair_id: int, choice: str) -> str:
        """Record `me`'s choice on the pair on their screen: JUDGED; or, recording nothing, ALREADY_JUDGED (a repeat:
        a second tab, a resubmit), NOT_SHOWN (not the pair on their screen, or no such pair) or NOT_NEEDED (others gave
        it every label it wanted meanwhile; it leaves their screen)."""
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {CHOICES}, got {choice!r}")
        with self.write() as c:
            if c.execute("SELECT 1 FROM judgements WHERE pair_id = ? AND annotator_id = ? AND undone IS NULL",
                         (pair_id, me)).fetchone():
                return ALREADY_JUDGED
            if not c.execute("SELECT 1 FROM assignments WHERE annotator_id = ? AND pair_id = ?", (me, pair_id)).fetchone():
                return NOT_SHOWN
            c.execute("DELETE FROM assignments WHERE annotator_id = ? AND pair_id = ?", (me, pair_id))
            labels, wanted = c.execute(
                "SELECT (SELECT COUNT(*) FROM judgements j WHERE j.pair_id = p.id AND j.undone IS NULL "
                "AND j.choice != 'skip'), p.wanted FROM pairs p WHERE p.id = ?", (pair_id,)).fetchone()
            if labels >= wanted:
                return NOT_NEEDED
            c.execute("INSERT INTO judgements (pair_id, annotator_id, choice, created) VALUES (?, ?, ?, ?)",
                      (pair_id, me, choice, now()))
        return JUDGED

    def undo(self, me: int) -> int | None:
        """Take back `me`'s latest live judgement and put its pair back on their screen; its pair id."""
        with self.write() as c:
            row = c.execute("SELECT id, pair_id FROM judgements WHERE annotator_id = ? AND undone IS NULL "
                            "ORDER BY id DESC LIMIT 1", (me,)).fetchone()
            if row is None:
                return None
            c.execute("UPDATE judgements SET undone = ? WHERE id = ?", (now(), row["id"]))
            c.execute(_ASSIGN, (me, row["pair_id"], time.time()))
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


def export_jsonl(db: str | Path, out: str | Path) -> int:
    """Write every live a/b judgement as {"prompt", "chosen", "rejected"} with its provenance, atomically: the
    model, role, step, sampling settings and seed behind each side (chosen_provenance, rejected_provenance), who judged
    it (annotator, annotator_id) and when (judged_at), the pair's id, and the `minirlhf loop` round (or null).

    Pairs of single replies are strings. Where the file holds pairs of episodes, every row is in TRL's conversational
    layout (one file, one layout, as data/layouts.py reads it): "prompt" the opening's messages, "chosen" and
    "rejected" the messages after it (a single reply: one assistant message)."""
    store = Store(db, create=False)
    rows = store.conn.execute(
        "SELECT p.*, j.choice, j.created AS judged_at, a.name AS annotator, a.id AS annotator_id FROM judgements j "
        "JOIN pairs p ON p.id = j.pair_id JOIN annotators a ON a.id = j.annotator_id "
        "WHERE j.undone IS NULL AND j.choice IN ('a', 'b') ORDER BY j.id").fetchall()
    if not rows:
        raise UserError(f"{db} has no A/B judgements yet (ties and skips are not exported); judge some pairs first")
    round_k = store.meta("round")
    conversational = any(row["conversation_a"] is not None for row in rows)
    lines = []
    for row in rows:
        sides = (row["provenance_a"], row["provenance_b"])[::1 if row["choice"] == "a" else -1]
        lines.append(json.dumps(exported(row, row["choice"], conversational) | {
            "chosen_provenance": json.loads(sides[0]), "rejected_provenance": json.loads(sides[1]),
            "annotator": row["annotator"], "annotator_id": row["annotator_id"], "judged_at": row["judged_at"],
            "pair_id": row["id"], "round": round_k}, ensure_ascii=False))
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
