"""Annotators and their links: a name, the SHA-256 of a secret token (the token itself is never stored), when the
token stops working (`expires`, seconds since the epoch) and whether it was revoked.

A link stops working when it expires (`feedback serve --token-days`, 30 days by default), when it is revoked (the admin
page, or `minirlhf feedback revoke NAME`), or when the same name is given a new link. Revoking keeps every judgement;
a new link for the name brings the annotator back with them.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path

from minirlhf import UserError
from minirlhf.checkpoint import atomic_write_text

TOKEN_DAYS = 30.0
"""how long a new link works, in days"""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def token_hash(token: str) -> str:
    # surrogatepass: a token taken from a URL or cookie may hold anything; hashing it must not raise
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def day(epoch: float | None) -> str:
    return "never" if epoch is None else datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def refusal(row: sqlite3.Row | None) -> str | None:
    """Why the token of `row` (from `Annotators.lookup`) opens nothing; None when it works."""
    if row is None:
        return ("this page needs your personal link (...?token=...), with cookies allowed for this site; ask whoever "
                "runs the feedback server")
    if row["revoked"] is not None:
        return "this link was revoked; ask whoever runs the feedback server for a new link"
    if row["expires"] is not None and row["expires"] <= time.time():
        return f"this link expired on {day(row['expires'])}; ask whoever runs the feedback server for a new link"
    return None


class Annotators:
    """The annotator half of `store.Store` (mixed into it): links made, looked up, refreshed and revoked."""

    def set_annotator(self, name: str, is_admin: bool = False, days: float = TOKEN_DAYS) -> str:
        """A new secret token for `name`, working for `days`; `name` is created, or their old token stops working
        (and a revoked name works again, with every judgement it gave)."""
        token = secrets.token_urlsafe(24)
        with self.write() as c:
            c.execute("INSERT INTO annotators (name, token_sha256, is_admin, created, expires) VALUES (?, ?, ?, ?, ?) "
                      "ON CONFLICT(name) DO UPDATE SET token_sha256 = excluded.token_sha256, "
                      "expires = excluded.expires, revoked = NULL",
                      (name, token_hash(token), int(is_admin), now(), time.time() + days * 86400))
        return token

    def lookup(self, token: str) -> sqlite3.Row | None:
        """The annotator whose token this is, whether or not it still works (see `refusal`)."""
        return self.conn.execute("SELECT id, name, is_admin, expires, revoked FROM annotators WHERE token_sha256 = ?",
                                 (token_hash(token),)).fetchone()

    def annotator(self, token: str) -> sqlite3.Row | None:
        """The annotator whose token this is, if it still works."""
        row = self.lookup(token)
        return row if refusal(row) is None else None

    def admin_token(self, file: Path, days: float = TOKEN_DAYS) -> str:
        """The admin's token, kept in a 0600 file beside the database so that the admin link survives restarts; each
        start gives it another `days`. A revoked admin token is replaced (whoever can read the file is the admin)."""
        if file.is_file():
            token = file.read_text(encoding="utf-8").strip()
            row = self.lookup(token)
            if row is not None and row["is_admin"] and row["revoked"] is None:
                with self.write() as c:
                    c.execute("UPDATE annotators SET expires = ? WHERE id = ?", (time.time() + days * 86400, row["id"]))
                return token
        token = self.set_annotator("admin", is_admin=True, days=days)
        atomic_write_text(file, token + "\n")  # mkstemp makes it 0600; chmod says so
        os.chmod(file, 0o600)
        return token

    def revoke(self, name: str) -> bool:
        """Stop `name`'s link (their judgements stay); False if it was revoked already. The pair on their screen goes
        back to the others."""
        with self.write() as c:
            row = c.execute("SELECT id, revoked FROM annotators WHERE name = ?", (name,)).fetchone()
            if row is None:
                names = [r[0] for r in c.execute("SELECT name FROM annotators WHERE name NOT LIKE 'import:%' "
                                                 "ORDER BY id")]
                raise UserError(f"no annotator named {name!r} in {self.path}; the names are: "
                                f"{', '.join(names) or 'none yet'}")
            if row["revoked"] is not None:
                return False
            c.execute("UPDATE annotators SET revoked = ? WHERE id = ?", (now(), row["id"]))
            c.execute("DELETE FROM assignments WHERE annotator_id = ?", (row["id"],))
        return True

    def annotator_table(self) -> list[dict]:
        """Per annotator: name, admin, created, expiry, state, and live judgements by choice."""
        choices = ("a", "b", "tie", "skip")
        rows = self.conn.execute(
            "SELECT a.name, a.is_admin, a.created, a.expires, a.revoked, COUNT(j.id) AS total, "
            + ", ".join(f"SUM(j.choice = '{c}') AS {c}" for c in choices)
            + " FROM annotators a LEFT JOIN judgements j ON j.annotator_id = a.id AND j.undone IS NULL "
            "GROUP BY a.id ORDER BY a.id").fetchall()
        table = []
        for r in rows:
            row = {k: (r[k] or 0) if k in choices else r[k] for k in r.keys()}
            state = refusal(r)
            row["state"] = "revoked" if r["revoked"] else "expired" if state else "active"
            row["expires_on"] = day(r["expires"])
            table.append(row)
        return table
