"""The human-feedback store and web page: real SQLite, a real server subprocess, real HTTP from many threads."""

import dataclasses
import html
import json
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.cookiejar import CookieJar
from pathlib import Path

import pytest

from minirlhf import UserError
from minirlhf.data.preferences import read_pairs
from minirlhf.feedback.figures import agreement, policy_score, win_rate
from minirlhf.feedback.store import (ALREADY_JUDGED, ASSIGNMENT_TTL_S, JUDGED, NOT_NEEDED, NOT_SHOWN, Store,
                                     export_jsonl, import_jsonl)

HH = "\n\nHuman: hi there\n\nAssistant: hello! how can I help?\n\nHuman: name a fruit\n\nAssistant:"


def _prov(role: str) -> dict:
    return {"model": "m", "role": role, "step": 3 if role == "policy" else None, "temperature": 1.0, "top_p": 1.0,
            "top_k": 0, "max_new_tokens": 48, "seed": 7}


def show(store: Store, me: int, pair_id: int) -> None:
    """Put a pair on `me`'s screen, as serving it to them does (the store takes judgements of such pairs only)."""
    store.conn.execute("INSERT OR REPLACE INTO assignments VALUES (?, ?, ?)", (me, pair_id, time.time()))


def test_export_carries_provenance_and_reads_back_as_pairs(tmp_path):
    store = Store(tmp_path / "f.sqlite")
    store.set_meta("round", 2)  # as `minirlhf loop` records its round
    alice, bob = (store.annotator(store.set_annotator(n))["id"] for n in ("alice", "bob"))
    sides = [(_prov("policy") | {"seed": i}, _prov("reference") | {"seed": 100 + i}) for i in range(4)]
    ids = [store.add_pair(p, f"A{i}", f"B{i}", *sides[i]) for i, p in enumerate(["plain prompt", HH, "third", "fourth"])]
    for pair_id, choice in zip(ids, ["a", "b", "tie", "skip"]):
        show(store, alice, pair_id)
        assert store.judge(alice, pair_id, choice) == JUDGED
    show(store, bob, ids[0])
    assert store.judge(bob, ids[0], "b") == NOT_NEEDED  # wanted once, labelled by alice: bob's is not recorded
    store.conn.execute("UPDATE pairs SET wanted = 2 WHERE id = ?", (ids[0],))
    show(store, bob, ids[0])
    assert store.judge(bob, ids[0], "b") == JUDGED and store.undo(bob) == ids[0]  # undone: not exported
    out = tmp_path / "prefs.jsonl"
    assert export_jsonl(tmp_path / "f.sqlite", out) == 2
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: r[k] for k in ("prompt", "chosen", "rejected", "annotator", "annotator_id", "pair_id", "round")}
            for r in rows] == [
        {"prompt": "plain prompt", "chosen": "A0", "rejected": "B0", "annotator": "alice", "annotator_id": alice,
         "pair_id": ids[0], "round": 2},
        {"prompt": HH, "chosen": "B1", "rejected": "A1", "annotator": "alice", "annotator_id": alice,
         "pair_id": ids[1], "round": 2}]
    # each side's model, role, step, sampling settings and seed, chosen and rejected the right way round
    assert rows[0]["chosen_provenance"] == sides[0][0] and rows[0]["rejected_provenance"] == sides[0][1]
    assert rows[1]["chosen_provenance"] == sides[1][1] and rows[1]["rejected_provenance"] == sides[1][0]
    assert rows[1]["chosen_provenance"]["role"] == "reference" and rows[1]["chosen_provenance"]["seed"] == 101
    judged = store.conn.execute("SELECT created FROM judgements WHERE pair_id = ? AND annotator_id = ?",
                                (ids[1], alice)).fetchone()[0]
    assert rows[1]["judged_at"] == judged and judged.startswith(str(time.gmtime().tm_year))
    assert [(p.prompt, p.chosen, p.rejected) for p in read_pairs(out)] == [("plain prompt", "A0", "B0"), (HH, "B1", "A1")]

    messages = {"messages": [{"role": "user", "content": "hi"}], "chosen": "yes", "rejected": "no"}
    out.write_text(out.read_text() + json.dumps(messages) + "\n")
    assert import_jsonl([str(out)], tmp_path / "g.sqlite") == (3, 0)
    assert import_jsonl([str(out)], tmp_path / "g.sqlite") == (0, 3)  # again: nothing new
    again = tmp_path / "again.jsonl"
    export_jsonl(tmp_path / "g.sqlite", again)
    back = [json.loads(line) for line in again.read_text().splitlines()]
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in back] == \
        [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] + [("\n\nHuman: hi\n\nAssistant:", "yes", "no")]
    assert {r["annotator"] for r in back} == {"import:prefs.jsonl"} and {r["round"] for r in back} == {None}
    assert back[0]["chosen_provenance"] == {"source": "import", "file": str(out), "role": "chosen"}


def test_a_judgement_counts_only_for_the_pair_on_your_screen(tmp_path):
    store = Store(tmp_path / "f.sqlite")
    me, other = (store.annotator(store.set_annotator(n))["id"] for n in ("alice", "bob"))
    pair = store.add_pair("p", "x", "y", _prov("sample"), _prov("sample"))
    never_shown = store.add_pair("q", "x", "z", _prov("sample"), _prov("sample"))
    assert store.judge(me, pair, "a") == NOT_SHOWN  # not yet served to her
    assert store.next_pair(me)["id"] == pair
    assert store.judge(me, never_shown, "a") == NOT_SHOWN and store.judge(me, 10 ** 17, "a") == NOT_SHOWN
    assert store.judge(me, pair, "a") == JUDGED
    assert store.judge(me, pair, "b") == ALREADY_JUDGED  # a second tab's repeat: the first choice stands
    assert store.undo(me) == pair and store.judge(me, pair, "b") == JUDGED  # undo puts it back on her screen
    rows = sqlite3.connect(tmp_path / "f.sqlite").execute(
        "SELECT pair_id, choice, undone IS NULL FROM judgements ORDER BY id").fetchall()
    assert rows == [(pair, "a", 0), (pair, "b", 1)]
    with pytest.raises(sqlite3.IntegrityError):  # the partial UNIQUE index itself, not only the code
        store.conn.execute("INSERT INTO judgements (pair_id, annotator_id, choice, created) VALUES (?, ?, 'a', 'x')",
                           (pair, me))

    # Shown to bob, left open past the assignment's lifetime, then given to alice, who judges it: bob's late
    # choice is not recorded, and his screen moves on.
    assert store.next_pair(other)["id"] == never_shown
    store.conn.execute("UPDATE assignments SET since = since - ? WHERE annotator_id = ?", (ASSIGNMENT_TTL_S + 1, other))
    assert store.next_pair(me)["id"] == never_shown and store.judge(me, never_shown, "tie") == JUDGED
    assert store.judge(other, never_shown, "a") == NOT_NEEDED
    assert store.counts(other)["a"] == 0 and store.next_pair(other) is None


def test_assignment_spreads_fresh_pairs_and_prefers_a_second_label(tmp_path):
    store = Store(tmp_path / "f.sqlite")
    alice, bob, carol, dave = (store.annotator(store.set_annotator(n))["id"] for n in ("alice", "bob", "carol", "dave"))
    once = store.add_pair("p1", "x", "y", _prov("sample"), _prov("sample"))
    twice = store.add_pair("p2", "x", "z", _prov("sample"), _prov("sample"), wanted=2)
    assert store.next_pair(alice)["id"] == once and store.next_pair(alice)["id"] == once  # a reload: same pair
    assert store.next_pair(bob)["id"] == twice  # not the one on alice's screen
    assert store.next_pair(carol)["id"] == twice  # wanted twice: two people may have it
    assert store.next_pair(dave) is None and store.fresh() == 0  # all taken; the generator is behind
    for who, choice in ((alice, "a"), (bob, "b"), (carol, "b")):
        assert store.judge(who, store.next_pair(who)["id"], choice) == JUDGED
    assert store.waiting(dave) == 0 and store.next_pair(dave) is None

    fresh = store.add_pair("p3", "x", "w", _prov("sample"), _prov("sample"))
    second = store.add_pair("p4", "x", "v", _prov("sample"), _prov("sample"), wanted=2)
    show(store, alice, second)
    assert store.fresh() == 1 and store.judge(alice, second, "tie") == JUDGED and store.fresh() == 1
    assert store.next_pair(bob)["id"] == second  # needs a second label: before the older fresh pair
    assert store.next_pair(alice)["id"] == fresh and store.waiting(dave) == 2


def test_a_failed_write_rolls_back_and_the_connection_writes_again(tmp_path):
    store = Store(tmp_path / "f.sqlite")
    me = store.annotator(store.set_annotator("alice"))["id"]
    with pytest.raises(sqlite3.IntegrityError):  # the body fails: a CHECK constraint after a good insert
        with store.write() as c:
            c.execute("INSERT INTO pairs (prompt, response_a, response_b, provenance_a, provenance_b, created) "
                      "VALUES ('lost', 'a', 'b', '{}', '{}', 'now')")
            c.execute("INSERT INTO judgements (pair_id, annotator_id, choice, created) VALUES (1, ?, 'maybe', 'x')",
                      (me,))
    assert not store.conn.in_transaction and store.counts()["pairs"] == 0
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):  # the COMMIT fails (a deferred check)
        with store.write() as c:
            c.execute("PRAGMA defer_foreign_keys = ON")
            c.execute("INSERT INTO judgements (pair_id, annotator_id, choice, created) VALUES (999, ?, 'a', 'x')",
                      (me,))
    assert not store.conn.in_transaction  # a failed COMMIT leaves the transaction open unless it is rolled back
    pair = store.add_pair("p", "x", "y", _prov("sample"), _prov("sample"))  # this thread's connection writes again
    assert store.next_pair(me)["id"] == pair and store.judge(me, pair, "a") == JUDGED
    assert sqlite3.connect(tmp_path / "f.sqlite").execute("SELECT COUNT(*) FROM judgements").fetchone() == (1,)


def test_a_database_serves_one_purpose_unless_mixed_on_purpose(tmp_path):
    from minirlhf.feedback.purpose import purpose

    sampling = {"temperature": 0.7, "top_p": 0.9, "top_k": 0, "max_new_tokens": 48, "seed": 0}
    mine = purpose("/m/policy", None, None, "corpus", sampling)
    hotter = purpose("/m/policy", None, None, "corpus", sampling | {"temperature": 1.0})
    side = {"model": "/m/policy", "role": "sample", "step": None, "temperature": 0.7, "top_p": 0.9, "top_k": 0,
            "max_new_tokens": 48, "seed": 5}
    store = Store(tmp_path / "f.sqlite")
    store.claim(hotter)
    store.claim(mine)  # nothing sampled into it yet: nothing to mix, the last claim wins
    assert store.meta("made_for") == [mine]
    store.add_pair("p", "x", "y", side, side)
    store.claim(mine)  # a restart
    with pytest.raises(UserError) as e:
        store.claim(hotter)
    assert "temperature 0.7 there, 1.0 now" in str(e.value) and "--db" in str(e.value) and "--mix" in str(e.value)
    store.claim(hotter, mix=True)
    store.claim(hotter)  # mixed on purpose once: both are its purposes now
    assert store.meta("made_for") == [mine, hotter]

    # A database from before purposes were recorded is judged by its pairs' provenance.
    old = Store(tmp_path / "old.sqlite")
    old.add_pair("p", "x", "y", side, side)
    old.add_pair("q", "x", "y", {"source": "import", "role": "chosen"}, {"source": "import", "role": "rejected"})
    with pytest.raises(UserError, match="other models or settings"):
        old.claim(hotter)
    old.claim(mine)
    assert old.meta("made_for") == [mine]


def test_agreement_and_win_rate_by_hand(tmp_path):
    # Four doubly-labelled pairs: p_o = 2/4; first labels a,b,a,tie and second a,b,b,a give
    # p_e = (2*2 + 1*2 + 1*0) / 16 = 0.375, so kappa = (0.5 - 0.375) / (1 - 0.375) = 0.2.
    got = agreement([["a", "a"], ["b", "b"], ["a", "b"], ["tie", "a"], ["skip-free"]])
    assert got["n"] == 4 and got["agreement"] == pytest.approx(0.5) and got["kappa"] == pytest.approx(0.2)
    three = agreement([["a", "a", "b"]])  # every two labels of a pair: (a,a) (a,b) (a,b)
    assert three["n"] == 3 and three["agreement"] == pytest.approx(1 / 3)
    assert agreement([["a", "a"]])["kappa"] is None and agreement([])["agreement"] is None

    assert policy_score(_prov("policy"), _prov("reference"), "a") == 1.0
    assert policy_score(_prov("reference"), _prov("policy"), "a") == 0.0
    assert policy_score(_prov("reference"), _prov("policy"), "tie") == 0.5
    assert policy_score(_prov("sample"), _prov("sample"), "a") is None
    assert policy_score(_prov("policy"), _prov("reference"), "skip") is None
    assert policy_score({}, {"role": "policy"}, "a") is None  # imported or hand-made pairs have other roles

    store = Store(tmp_path / "f.sqlite")
    people = [store.annotator(store.set_annotator(n))["id"] for n in ("alice", "bob")]
    ab = store.add_pair("p", "pol", "ref", _prov("policy"), _prov("reference"), wanted=2)
    ba = store.add_pair("q", "ref", "pol", _prov("reference"), _prov("policy"))
    store.conn.execute("UPDATE pairs SET wanted = 2")
    for who, pair, choice in ((0, ab, "a"), (1, ab, "tie"), (0, ba, "a"), (1, ba, "skip")):
        show(store, people[who], pair)  # policy wins, half, reference wins, not counted
        assert store.judge(people[who], pair, choice) == JUDGED
    assert win_rate(store.policy_scores()) == {"n": 3, "win_rate": pytest.approx(0.5), "wins": 1, "ties": 1,
                                               "losses": 1}
    assert store.labels_per_pair() == [["a", "tie"]]


def test_bad_files_exit_2_with_one_line(cli, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p", "chosen": "x"}\n')
    r = cli("feedback", "import", "bad.jsonl", "--db", "f.sqlite")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "bad.jsonl:1" in r.stderr and "'rejected'" in r.stderr
    assert not (tmp_path / "f.sqlite").exists()  # validated before anything is written
    r = cli("feedback", "export", "--db", "missing.sqlite", "--out", "x.jsonl")
    assert r.returncode == 2 and "no feedback database" in r.stderr and not (tmp_path / "x.jsonl").exists()
    (tmp_path / "junk.sqlite").write_text("not a database at all " * 100)
    r = cli("feedback", "export", "--db", "junk.sqlite", "--out", "x.jsonl")
    assert r.returncode == 2 and "not a feedback database" in r.stderr, r.stderr
    r = cli("feedback", "export", "--out", "x.jsonl")  # no --db: the default policy's database, which is not there
    assert r.returncode == 2 and "runs/feedback/smollm2.sqlite" in r.stderr and "--db" in r.stderr, r.stderr

    store = Store(tmp_path / "f.sqlite")
    me = store.annotator(store.set_annotator("alice"))["id"]
    pair = store.add_pair("p", "x", "y", _prov("sample"), _prov("sample"))
    assert store.next_pair(me)["id"] == pair and store.judge(me, pair, "a") == JUDGED
    (tmp_path / "kept.jsonl").write_text("my own labels\n")
    r = cli("feedback", "export", "--db", "f.sqlite", "--out", "kept.jsonl")
    assert r.returncode == 2 and "--force" in r.stderr and (tmp_path / "kept.jsonl").read_text() == "my own labels\n"
    r = cli("feedback", "export", "--db", "f.sqlite", "--out", "kept.jsonl", "--force")
    assert r.returncode == 0 and json.loads((tmp_path / "kept.jsonl").read_text())["chosen"] == "x", r.stderr


def test_page_escapes_model_text_and_health_waits_for_the_generator(tiny_generator, tmp_path):
    from minirlhf.feedback.app import create_app
    from minirlhf.feedback.pairs import PairPool, Sampling, Source

    store = Store(tmp_path / "f.sqlite")
    pool = PairPool(store, Source(str(tiny_generator), None, ["hi"]), Sampling())  # not started: still "loading"
    client = create_app(store, pool, "http://127.0.0.1:1").test_client()
    assert client.get("/healthz").status_code == 503
    token = store.set_annotator("alice")
    first = client.get(f"/?token={token}")
    assert first.status_code == 303 and first.headers["Location"] == "/"
    cookie = first.headers["Set-Cookie"]
    assert "SameSite=Strict" in cookie and "HttpOnly" in cookie and "Secure" not in cookie
    waiting = client.get("/")
    assert b"Loading the model" in waiting.data and b'http-equiv="refresh"' in waiting.data
    store.add_pair(HH, "<script>alert(1)</script> & <b>", "fine", _prov("sample"), _prov("sample"))
    assert client.get("/healthz").status_code == 200
    page = client.get("/")
    text = page.data.decode()
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &lt;b&gt;" in text and "<script>alert" not in text
    assert "name a fruit" in text and text.count('class="turn ') == 3
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert token not in text and "token=" not in text  # forms, assets and links carry no token
    assert client.get("/static/style.css").status_code == 200  # the cookie alone
    client.delete_cookie("minirlhf_token")
    assert client.get("/static/style.css").status_code == 403


def test_a_policy_that_cannot_load_stops_serve_with_one_line(cli):
    r = cli("feedback", "serve", "--policy", "no-such-model", "--port", "0", "--db", "f.sqlite", timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "no-such-model" in r.stderr


# --- a real server ---

class Server:
    """`minirlhf feedback serve` as a subprocess; its output is read on a thread, so the pipe never fills."""

    def __init__(self, *args: str, cwd: Path):
        self.proc = subprocess.Popen([sys.executable, "-u", "-m", "minirlhf", "feedback", "serve", "--port", "0", *args],
                                     cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.cwd = cwd
        threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")), daemon=True).start()
        try:
            self.admin_url = self.wait_for(r"http://\S+/admin\?token=\S+")
        except BaseException:  # no one else holds the process to end it
            self.proc.kill()
            raise
        self.base = self.admin_url.split("/admin")[0]

    def wait_for(self, pattern: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if m := re.search(pattern, line):
                    return m.group(0)
            assert self.proc.poll() is None, f"the server exited while we waited for {pattern!r}:\n" + "".join(self.lines)
            time.sleep(0.05)
        raise AssertionError(f"waited {timeout:g} s for the server to print {pattern!r}; it printed:\n"
                             + "".join(self.lines))

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("the server did not stop within 30 s of Ctrl-C:\n" + "".join(self.lines)) from None
        assert code == 0, "".join(self.lines)
        return "".join(self.lines)


def request(url: str, data: dict | bytes | None = None, headers: dict | None = None,
            via: urllib.request.OpenerDirector | None = None) -> tuple[int, str]:
    """(status, body) of a GET, or of a POST of `data` (a dict is urlencoded); `via` an opener with a cookie jar."""
    body = urllib.parse.urlencode(data).encode() if isinstance(data, dict) else data
    try:
        with (via or urllib.request.build_opener()).open(urllib.request.Request(url, body, headers or {}),
                                                         timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class _Stay(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def first_response(url: str, headers: dict | None = None):
    """The response itself (status, headers), redirects not followed."""
    try:
        with urllib.request.build_opener(_Stay()).open(urllib.request.Request(url, headers=headers or {})) as r:
            return r.status, r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.headers


def sign_in(link: str) -> tuple[urllib.request.OpenerDirector, str]:
    """A browser's cookie jar that opened `link` (its token now in the cookie), and the page it landed on."""
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
    status, page = request(link, via=browser)
    assert status == 200, page
    return browser, page


def field(page: str, name: str) -> str | None:
    m = re.search(rf'name="{name}" value="([^"]*)"', page)
    return html.unescape(m.group(1)) if m else None


def add_annotator(server: Server, name: str) -> str:
    admin, page = sign_in(server.admin_url)
    status, page = request(f"{server.base}/admin", {"name": name, "csrf": field(page, "csrf")}, via=admin)
    assert status == 200, page
    return html.unescape(re.search(r'id="new-link" readonly value="([^"]+)"', page).group(1))


def judge_many(link: str, n: int, choices: list, errors: list) -> None:
    """One annotator's session: load the page, judge its pair, repeat; every fifth submit is sent twice, as by a
    second tab: the repeat answers 409 "Already judged" with the page, and is not stored."""
    try:
        done, deadline = 0, time.monotonic() + 120
        browser, page = sign_in(link)
        action = link.split("/?")[0] + "/judge"
        while done < n:
            assert time.monotonic() < deadline, f"{done} of {n} judged in 120 s"
            pair_id = field(page, "pair_id")
            if pair_id is None:  # the "generating" page: wait as its refresh would
                time.sleep(0.2)
                status, page = request(link.split("?")[0], via=browser)
                continue
            form = {"pair_id": pair_id, "choice": choices[done % len(choices)], "csrf": field(page, "csrf")}
            status, page = request(action, form, via=browser)
            assert status == 200, page
            if done % 5 == 0:
                status, page = request(action, form, via=browser)
                assert status == 409 and "Already judged" in page, (status, page)
            done += 1
    except BaseException as e:  # noqa: BLE001 (reported by the test)
        errors.append(e)


@pytest.fixture
def server(tiny_generator, tmp_path):
    s = Server("--policy", str(tiny_generator), "--db", "fb/f.sqlite", "--overlap", "0.3", "--max-new-tokens", "12",
               "--ahead", "24", cwd=tmp_path)
    yield s
    if s.proc.poll() is None:
        s.proc.kill()


def test_eight_annotators_at_once_lose_and_duplicate_nothing(server, tiny_generator, tmp_path):
    links = [add_annotator(server, f"annotator {i}") for i in range(8)]
    errors: list = []
    threads = [threading.Thread(target=judge_many, args=(link, 50, ["a", "b"] if i % 2 else ["a", "b", "tie", "skip"], errors))
               for i, link in enumerate(links)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 240
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "waited 240 s for the 8 annotators to finish judging"
    assert not errors, errors
    db = sqlite3.connect(tmp_path / "fb" / "f.sqlite")
    assert db.execute("SELECT COUNT(*), COUNT(DISTINCT pair_id || '-' || annotator_id) FROM judgements").fetchone() \
        == (400, 400)
    per_person = db.execute("SELECT a.name, COUNT(*) FROM judgements j JOIN annotators a ON a.id = j.annotator_id "
                            "GROUP BY a.id").fetchall()
    assert sorted(per_person) == [(f"annotator {i}", 50) for i in range(8)]
    provenance = json.loads(db.execute("SELECT provenance_a FROM pairs LIMIT 1").fetchone()[0])
    assert provenance["role"] == "sample" and provenance["model"] == str(Path(tiny_generator).resolve())
    assert provenance["max_new_tokens"] == 12 and isinstance(provenance["seed"], int)

    _, page = sign_in(server.admin_url)
    doubled = Store(tmp_path / "fb" / "f.sqlite").labels_per_pair()
    figures = agreement(doubled)
    assert figures["n"] > 0  # pairs wanted twice went to a second person
    assert f'{100 * figures["agreement"]:.0f}%' in page and "annotator 7" in page
    assert export_jsonl(tmp_path / "fb" / "f.sqlite", tmp_path / "out.jsonl") > 0
    out = server.stop()
    assert "stopping" in out and "judgements: 400" in out


def test_tokens_csrf_and_origin_are_checked(server):
    link = add_annotator(server, "eve")
    for url in (f"{server.base}/", f"{server.base}/admin", f"{server.base}/static/style.css",
                f"{server.base}/?token=wrong"):
        assert request(url)[0] == 403, url
    eve, page = sign_in(link)
    assert request(f"{server.base}/admin", via=eve)[0] == 403  # an annotator's cookie opens no admin page
    server.wait_for(r"pairs: [1-9]")  # "model ready" comes before the first pairs are stored
    _, page = request(f"{server.base}/", via=eve)
    judge, form = f"{server.base}/judge", {"pair_id": field(page, "pair_id"), "choice": "a"}
    assert request(judge, form, via=eve)[0] == 403  # no CSRF token
    assert request(judge, form | {"csrf": "0" * 64}, via=eve)[0] == 403
    good = form | {"csrf": field(page, "csrf")}
    assert request(judge, good, {"Origin": "http://evil.example"}, via=eve)[0] == 403
    assert request(judge, good, {"Referer": "http://evil.example/page"}, via=eve)[0] == 403
    assert request(judge, good, {"Sec-Fetch-Site": "cross-site"}, via=eve)[0] == 403
    assert request(judge, good, {"Origin": "http://[::1"}, via=eve)[0] == 403  # a broken Origin: refused, not 500
    assert request(f"{server.base}/undo", {}, via=eve)[0] == 403
    assert request(judge, good)[0] == 403  # the CSRF token alone is no login
    assert request(link.replace("/?", "/judge?"), good)[0] == 403  # nor is a token in a POST's address
    assert request(judge, good, {"Origin": server.base}, via=eve)[0] == 200
    assert request(f"{server.base}/healthz")[0] == 200
    server.stop()


def test_malformed_ids_csrf_and_bodies_get_400_not_500(server):
    mallory, page = sign_in(add_annotator(server, "mallory"))
    server.wait_for(r"pairs: [1-9]")
    _, page = request(f"{server.base}/", via=mallory)
    judge, csrf, pair_id = f"{server.base}/judge", field(page, "csrf"), field(page, "pair_id")
    form = f"csrf={csrf}&choice=a&pair_id="
    for body, kind in ((form + "%C2%B2", None),  # pair_id=² (str.isdigit says yes, int() says no)
                       (form + "9" * 40, None),  # beyond SQLite's integers
                       (form + "-1", None), (form + "1e3", None), (form + "%ff", None),  # not UTF-8
                       (f"csrf=%C3%A9t%C3%A9&choice=a&pair_id={pair_id}", None),  # a non-ASCII CSRF value
                       (f"csrf={csrf}".encode() + "&choice=a&pair_id=\u00e9".encode("latin-1"), None),  # raw 8-bit
                       (form + f"{pair_id}&pair_id={pair_id}", None),  # a field twice
                       (form + f"{pair_id}&&x", None),  # not urlencoded fields
                       (json.dumps({"csrf": csrf, "pair_id": pair_id, "choice": "a"}), "application/json"),
                       ((form + pair_id).encode(), "text/plain"),
                       (b"--b\r\nContent-Disposition: form-data; name=\"csrf\"\r\n\r\n" + csrf.encode(),
                        "multipart/form-data; boundary=b")):
        data = body if isinstance(body, bytes) else body.encode("utf-8")
        headers = {"Content-Type": kind or "application/x-www-form-urlencoded"}
        status, answer = request(judge, data, headers, via=mallory)
        assert status == 400 and answer.startswith("400 Bad Request: ") and answer.count("\n") == 1, (body, answer)
    assert request(f"{server.base}/nowhere", via=mallory)[0] == 404  # werkzeug's errors: one plain line too
    db = sqlite3.connect(server.cwd / "fb" / "f.sqlite")
    assert db.execute("SELECT COUNT(*) FROM judgements").fetchone() == (0,)
    assert request(judge, (form + pair_id).encode(), via=mallory)[0] == 200  # the well-formed one counts
    assert db.execute("SELECT COUNT(*) FROM judgements").fetchone() == (1,)
    server.stop()


def test_judgements_only_for_the_pair_served_and_a_second_tab_is_told(server):
    browser, page = sign_in(add_annotator(server, "tabs"))
    server.wait_for(r"pairs: ([2-9]|\d\d+)")
    _, tab1 = request(f"{server.base}/", via=browser)
    _, tab2 = request(f"{server.base}/", via=browser)  # a second tab: the same pair, the same form
    assert field(tab1, "pair_id") == field(tab2, "pair_id")
    judge = f"{server.base}/judge"
    shown = int(field(tab1, "pair_id"))
    db = sqlite3.connect(server.cwd / "fb" / "f.sqlite")
    never = db.execute("SELECT MIN(id) FROM pairs WHERE id != ?", (shown,)).fetchone()[0]
    status, page = request(judge, {"csrf": field(tab1, "csrf"), "pair_id": str(never), "choice": "a"}, via=browser)
    assert status == 409 and "was not shown to you" in page and f'value="{shown}"' in page
    status, page = request(judge, {"csrf": field(tab1, "csrf"), "pair_id": str(shown), "choice": "b"}, via=browser)
    assert status == 200 and "you judged <b id=\"judged\">1</b>" in page
    status, page = request(judge, {"csrf": field(tab2, "csrf"), "pair_id": str(shown), "choice": "a"}, via=browser)
    assert status == 409 and "Already judged" in page and "you judged <b id=\"judged\">1</b>" in page
    assert db.execute("SELECT pair_id, choice FROM judgements").fetchall() == [(shown, "b")]  # the first choice
    server.stop()


def test_the_first_visit_moves_the_token_into_a_cookie(server):
    link = add_annotator(server, "carol")
    token = link.split("token=")[1]
    status, headers = first_response(link.replace("/?", "/?lang=en&"))
    assert status == 303 and headers["Location"] == "/?lang=en"  # the same address, other parameters kept
    cookie = headers["Set-Cookie"]
    assert f"minirlhf_token={token}" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert "Secure" not in cookie  # plain http here; see the proxy test for https
    max_age = int(re.search(r"Max-Age=(\d+)", cookie).group(1))
    assert 29 * 86400 < max_age <= 30 * 86400  # until the link expires
    server.wait_for(r"pairs: [1-9]")
    carol, page = sign_in(link)
    assert token not in page and "token=" not in page and 'name="pair_id"' in page
    assets = re.findall(r'(?:href|src)="(/static/[^"]+)"', page)
    assert len(assets) == 3 and all("token" not in a for a in assets)
    for asset in assets:
        assert request(server.base + asset, via=carol)[0] == 200  # the cookie alone
        assert request(server.base + asset)[0] == 403
    _, admin_page = sign_in(server.admin_url)
    assert server.admin_url.split("token=")[1] not in admin_page
    # A link clicked on another site: browsers hold back the Strict cookie for the rest of that navigation, so the
    # clean address lands on a page that reloads itself from this site (with the cookie).
    status, landing = request(f"{server.base}/", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"})
    assert status == 200 and 'http-equiv="refresh" content="0"' in landing and "pair_id" not in landing
    assert request(f"{server.base}/", headers={"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "navigate"})[0] == 403
    server.stop()


def test_revoked_and_expired_links_get_403_and_keep_their_judgements(server, cli):
    link = add_annotator(server, "dave")
    server.wait_for(r"pairs: [1-9]")
    dave, page = sign_in(link)
    form = {"csrf": field(page, "csrf"), "pair_id": field(page, "pair_id"), "choice": "a"}
    assert request(f"{server.base}/judge", form, via=dave)[0] == 200
    out = cli("feedback", "revoke", "dave", "--db", "fb/f.sqlite")  # while the server runs
    assert out.returncode == 0 and "judgements are kept" in out.stdout, out.stderr
    status, answer = request(f"{server.base}/", via=dave)
    assert status == 403 and "revoked" in answer and "new link" in answer
    assert request(link)[0] == 403
    assert cli("feedback", "revoke", "dave", "--db", "fb/f.sqlite").stdout.count("revoked already") == 1
    wrong = cli("feedback", "revoke", "nobody", "--db", "fb/f.sqlite")
    assert wrong.returncode == 2 and "dave" in wrong.stderr and "Traceback" not in wrong.stderr

    again = add_annotator(server, "dave")  # a new link brings dave back, with the judgement he gave
    _, page = sign_in(again)
    assert "you judged <b id=\"judged\">1</b>" in page
    db = sqlite3.connect(server.cwd / "fb" / "f.sqlite")
    with db:
        db.execute("UPDATE annotators SET expires = ? WHERE name = 'dave'", (time.time() - 60,))
    status, answer = request(again)
    assert status == 403 and "expired" in answer and "new link" in answer

    erin = add_annotator(server, "erin")  # and the admin page revokes too
    admin, page = sign_in(server.admin_url)
    assert "Revoke" in page and "until " in page
    status, page = request(f"{server.base}/admin", {"csrf": field(page, "csrf"), "revoke": "erin"}, via=admin)
    assert status == 200 and "judgements are kept" in page and request(erin)[0] == 403
    assert db.execute("SELECT COUNT(*) FROM judgements j JOIN annotators a ON a.id = j.annotator_id "
                      "WHERE a.name = 'dave'").fetchone() == (1,)
    server.stop()


def test_a_trusted_proxy_is_believed_and_others_are_not(server, tiny_generator, tmp_path):
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "feedback.example"}
    link = add_annotator(server, "frank")
    status, headers = first_response(link, forwarded)
    assert status == 303 and "Secure" not in headers["Set-Cookie"]  # no --trusted-proxy: the headers mean nothing
    server.wait_for(r"pairs: [1-9]")
    frank, page = sign_in(link)
    form = {"csrf": field(page, "csrf"), "pair_id": field(page, "pair_id"), "choice": "a"}
    assert request(f"{server.base}/judge", form, forwarded | {"Origin": "https://feedback.example"}, via=frank)[0] == 403
    server.stop()

    behind = Server("--policy", str(tiny_generator), "--db", "proxied.sqlite", "--max-new-tokens", "12",
                    "--trusted-proxy", cwd=tmp_path)
    try:
        assert not any("clear text" in line for line in behind.lines)
        admin = urllib.request.build_opener()
        # The proxy speaks https to the browser and plain http to us; the cookie must be Secure, and the browser
        # then sends it only over https: to the proxy, which adds the X-Forwarded-* headers again.
        status, headers = first_response(behind.admin_url, forwarded)
        assert status == 303 and "Secure" in headers["Set-Cookie"]
        admin.addheaders = [(k, v) for k, v in forwarded.items()]
        token = behind.admin_url.split("token=")[1]
        admin.addheaders.append(("Cookie", f"minirlhf_token={token}"))
        status, page = request(f"{behind.base}/admin", via=admin)
        status, page = request(f"{behind.base}/admin", {"csrf": field(page, "csrf"), "name": "grace"},
                               {"Origin": "https://feedback.example"}, via=admin)
        assert status == 200, page  # an https Origin behind the proxy is this site
        new_link = html.unescape(re.search(r'id="new-link" readonly value="([^"]+)"', page).group(1))
        assert new_link.startswith("https://feedback.example/?token=")  # the address the browser uses
    finally:
        behind.stop()


def test_serving_off_this_machine_over_http_warns_of_clear_text(tiny_generator, tmp_path):
    shared = Server("--policy", str(tiny_generator), "--db", "f.sqlite", "--host", "0.0.0.0", cwd=tmp_path)
    out = shared.stop()
    warning = [line for line in out.splitlines() if "clear text" in line]
    assert len(warning) == 1 and "--trusted-proxy" in warning[0] and "ssh -L" in warning[0]
    assert out.splitlines()[0].startswith(f"feedback: two samples of {tiny_generator}")


def test_serve_defaults_to_smollm2_and_serves_an_rl_run_only_when_named(tiny_generator, tmp_path, cli):
    from minirlhf.rl.ppo import PPOConfig
    from minirlhf.stages.rl import train
    from minirlhf.config import load_config
    from minirlhf.data.prompts import load_prompts

    cfg = load_config(PPOConfig, overrides=[
        f"--policy={tiny_generator}", "--reward.classifier_weight=0", "--reward.length_weight=1", "--steps=1",
        "--batch_size=4", "--minibatch_size=4", "--ppo_epochs=1", "--prompts.max_eval=8", "--data.max_train=400",
        "--data.max_eval=100", f"--out={tmp_path / 'runs' / 'ppo-tiny'}", "--device=cpu"])
    train(cfg)
    Store(tmp_path / "runs" / "feedback" / "feedback.sqlite")  # the one database of older versions
    plain = Server("--max-new-tokens", "8", "--ahead", "4", cwd=tmp_path)  # no --policy: not the newest RL run
    out = plain.stop()
    assert re.match(r"feedback: two samples of smollm2 on \d+ prompts; database runs/feedback/smollm2\.sqlite\n", out)
    assert "--db runs/feedback/feedback.sqlite continues it" in out
    assert Store(tmp_path / "runs" / "feedback" / "smollm2.sqlite").meta("made_for")[0]["policy"] == "smollm2"

    run = tmp_path / "runs" / "ppo-tiny"
    s = Server("--policy", "runs/ppo-tiny", "--max-new-tokens", "8", "--ahead", "4", cwd=tmp_path)
    try:
        assert s.lines[0].startswith("feedback: RL run runs/ppo-tiny (step 1) against its reference")
        s.wait_for("pairs: [1-9]")
        db = sqlite3.connect(run / "feedback.sqlite")  # the run's own database, beside it
        rows = db.execute("SELECT prompt, provenance_a, provenance_b FROM pairs").fetchall()
        sides = [sorted((json.loads(a), json.loads(b)), key=lambda p: p["role"]) for _, a, b in rows]
        assert all([p["role"] for p in pair] == ["policy", "reference"] for pair in sides)
        policy, reference = sides[0]
        assert policy["step"] == 1 and policy["model"] == str(run.resolve())
        assert reference["model"] == str(Path(tiny_generator).resolve()) and reference["step"] is None
        # the page's sampling defaults (for a person to judge), recorded with each response
        assert {(p["temperature"], p["top_p"], p["top_k"]) for pair in sides for p in pair} == {(0.7, 0.9, 0)}
        _, held = load_prompts(dataclasses.replace(cfg.prompts, max_eval=10 ** 9), cfg.data)
        assert {prompt for prompt, _, _ in rows} <= set(held)
        assert (run / "feedback.sqlite.admin-token").stat().st_mode & 0o777 == 0o600
        assert s.admin_url.endswith((run / "feedback.sqlite.admin-token").read_text().strip())
    finally:
        s.stop()
    with sqlite3.connect(run / "feedback.sqlite") as db:  # the admin link expired meanwhile: a restart renews it
        db.execute("UPDATE annotators SET expires = 0 WHERE is_admin = 1")
    again = Server("--policy", "runs/ppo-tiny", "--max-new-tokens", "8", "--ahead", "4", cwd=tmp_path)
    try:
        assert again.admin_url == s.admin_url.replace(s.base, again.base)  # a restart keeps the admin link
        assert sign_in(again.admin_url)[1].count("Add an annotator") == 1
    finally:
        again.stop()

    for args, says in ((["--policy", str(tiny_generator), "--db", str(run / "feedback.sqlite")], "policy "),
                       (["--policy", "runs/ppo-tiny", "--temperature", "1.0"], "temperature 0.7 there, 1.0 now")):
        r = cli("feedback", "serve", "--port", "0", *args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
        assert says in r.stderr and "--db" in r.stderr and "--mix" in r.stderr


def test_a_disk_that_fills_during_an_import_is_one_line_and_changes_nothing(cli, tmp_path):
    """RLIMIT_FSIZE fails SQLite's writes as a full disk would: one line, exit 1, and the import rolled back whole."""
    import resource

    (tmp_path / "few.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": "a", "rejected": "b"}) + "\n"
                                                for i in range(3)))
    assert cli("feedback", "import", "few.jsonl", "--db", "f.sqlite").returncode == 0
    (tmp_path / "many.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "x" * 200, "rejected": "y" * 200})
                                                 + "\n" for i in range(3000)))
    limit = 200_000  # above the database of 3 pairs, below one of 3,003
    full = subprocess.run([sys.executable, "-m", "minirlhf", "feedback", "import", "many.jsonl", "--db", "f.sqlite"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert full.returncode == 1 and full.stderr.strip().count("\n") == 0, full.stderr
    assert full.stderr.startswith("minirlhf: error: the feedback database failed") and "Traceback" not in full.stderr
    assert Store(tmp_path / "f.sqlite").counts()["pairs"] == 3
