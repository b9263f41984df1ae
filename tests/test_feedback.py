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
from pathlib import Path

import pytest

from minirlhf.feedback.store import Store, agreement, export_jsonl, import_jsonl, policy_score, win_rate

HH = "\n\nHuman: hi there\n\nAssistant: hello! how can I help?\n\nHuman: name a fruit\n\nAssistant:"


def _prov(role: str) -> dict:
    return {"model": "m", "role": role, "step": 3 if role == "policy" else None, "temperature": 1.0, "top_p": 1.0,
            "top_k": 0, "max_new_tokens": 48, "seed": 7}


def test_export_import_round_trip(tmp_path):
    store = Store(tmp_path / "f.sqlite")
    alice, bob = (store.annotator(store.set_annotator(n))["id"] for n in ("alice", "bob"))
    ids = [store.add_pair(p, f"A{i}", f"B{i}", _prov("sample"), _prov("sample"))
           for i, p in enumerate(["plain prompt", HH, "third", "fourth"])]
    for pair_id, choice in zip(ids, ["a", "b", "tie", "skip"]):
        assert store.judge(alice, pair_id, choice)
    assert store.judge(bob, ids[0], "b") and store.undo(bob) == ids[0]  # undone: not exported
    out = tmp_path / "prefs.jsonl"
    assert export_jsonl(tmp_path / "f.sqlite", out) == 2
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [{"prompt": "plain prompt", "chosen": "A0", "rejected": "B0", "annotator": "alice", "pair_id": ids[0]},
                    {"prompt": HH, "chosen": "B1", "rejected": "A1", "annotator": "alice", "pair_id": ids[1]}]

    messages = {"messages": [{"role": "user", "content": "hi"}], "chosen": "yes", "rejected": "no"}
    out.write_text(out.read_text() + json.dumps(messages) + "\n")
    assert import_jsonl([str(out)], tmp_path / "g.sqlite") == (3, 0)
    assert import_jsonl([str(out)], tmp_path / "g.sqlite") == (0, 3)  # again: nothing new
    again = tmp_path / "again.jsonl"
    export_jsonl(tmp_path / "g.sqlite", again)
    back = [json.loads(line) for line in again.read_text().splitlines()]
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in back] == \
        [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] + [("\n\nHuman: hi\n\nAssistant:", "yes", "no")]
    assert {r["annotator"] for r in back} == {"import:prefs.jsonl"}


def test_one_live_judgement_per_annotator_and_pair(tmp_path):
    store = Store(tmp_path / "f.sqlite")
    me = store.annotator(store.set_annotator("alice"))["id"]
    pair = store.add_pair("p", "x", "y", _prov("sample"), _prov("sample"))
    assert store.judge(me, pair, "a") and not store.judge(me, pair, "b")  # a double submit is ignored
    assert store.undo(me) == pair and store.judge(me, pair, "b")
    rows = sqlite3.connect(tmp_path / "f.sqlite").execute(
        "SELECT choice, undone IS NULL FROM judgements ORDER BY id").fetchall()
    assert rows == [("a", 0), ("b", 1)]
    with pytest.raises(sqlite3.IntegrityError):  # the partial UNIQUE index itself, not only the code
        store.conn.execute("INSERT INTO judgements (pair_id, annotator_id, choice, created) VALUES (?, ?, 'a', 'x')",
                           (pair, me))
    assert not store.judge(me, 999, "a")


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
        assert store.judge(who, store.next_pair(who)["id"], choice)
    assert store.waiting(dave) == 0 and store.next_pair(dave) is None

    fresh = store.add_pair("p3", "x", "w", _prov("sample"), _prov("sample"))
    second = store.add_pair("p4", "x", "v", _prov("sample"), _prov("sample"), wanted=2)
    assert store.fresh() == 2 and store.judge(alice, second, "tie") and store.fresh() == 1
    assert store.next_pair(bob)["id"] == second  # needs a second label: before the older fresh pair
    assert store.next_pair(alice)["id"] == fresh and store.waiting(dave) == 2


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
    store.judge(people[0], ab, "a")  # policy wins
    store.judge(people[1], ab, "tie")  # half
    store.judge(people[0], ba, "a")  # reference wins
    store.judge(people[1], ba, "skip")  # not counted
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


def test_page_escapes_model_text_and_health_waits_for_the_generator(tiny_generator, tmp_path):
    from minirlhf.feedback.app import create_app
    from minirlhf.feedback.pairs import PairPool, Sampling, Source

    store = Store(tmp_path / "f.sqlite")
    pool = PairPool(store, Source(str(tiny_generator), None, ["hi"]), Sampling())  # not started: still "loading"
    client = create_app(store, pool, "http://127.0.0.1:1").test_client()
    assert client.get("/healthz").status_code == 503
    token = store.set_annotator("alice")
    waiting = client.get(f"/?token={token}")
    assert b"Loading the model" in waiting.data and b'http-equiv="refresh"' in waiting.data
    cookie = waiting.headers["Set-Cookie"]
    assert "SameSite=Strict" in cookie and "HttpOnly" in cookie
    store.add_pair(HH, "<script>alert(1)</script> & <b>", "fine", _prov("sample"), _prov("sample"))
    assert client.get("/healthz").status_code == 200
    page = client.get(f"/?token={token}")
    text = page.data.decode()
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &lt;b&gt;" in text and "<script>alert" not in text
    assert "name a fruit" in text and text.count('class="turn ') == 3
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert client.get("/").status_code == 200  # the cookie alone, once the link has set it
    client.delete_cookie("minirlhf_token")
    assert client.get("/static/style.css").status_code == 403
    assert client.get(f"/static/style.css?token={token}").status_code == 200


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


def request(url: str, data: dict | None = None, headers: dict | None = None) -> tuple[int, str]:
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers or {}), timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def field(page: str, name: str) -> str | None:
    m = re.search(rf'name="{name}" value="([^"]*)"', page)
    return html.unescape(m.group(1)) if m else None


def add_annotator(server: Server, name: str) -> str:
    _, page = request(server.admin_url)
    status, page = request(server.admin_url, {"name": name, "csrf": field(page, "csrf")})
    assert status == 200, page
    return html.unescape(re.search(r'id="new-link" readonly value="([^"]+)"', page).group(1))


def judge_many(link: str, n: int, choices: list, errors: list) -> None:
    """One annotator's session: load the page, judge its pair, repeat; every fifth submit is sent twice."""
    try:
        done, deadline = 0, time.monotonic() + 120
        status, page = request(link)
        while done < n:
            assert time.monotonic() < deadline, f"{done} of {n} judged in 120 s"
            pair_id = field(page, "pair_id")
            if pair_id is None:  # the "generating" page: wait as its refresh would
                time.sleep(0.2)
                status, page = request(link)
                continue
            form = {"pair_id": pair_id, "choice": choices[done % len(choices)], "csrf": field(page, "csrf")}
            action = link.replace("/?", "/judge?")
            if done % 5 == 0:
                request(action, form)
            status, page = request(action, form)
            assert status == 200, page
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

    _, page = request(server.admin_url)
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
                f"{server.base}/?token=wrong", link.replace("/?", "/admin?")):
        assert request(url)[0] == 403, url
    server.wait_for(r"pairs: [1-9]")  # "model ready" comes before the first pairs are stored
    _, page = request(link)
    form = {"pair_id": field(page, "pair_id"), "choice": "a"}
    judge = link.replace("/?", "/judge?")
    assert request(judge, form)[0] == 403  # no CSRF token
    assert request(judge, form | {"csrf": "0" * 64})[0] == 403
    good = form | {"csrf": field(page, "csrf")}
    assert request(judge, good, {"Origin": "http://evil.example"})[0] == 403
    assert request(judge, good, {"Referer": "http://evil.example/page"})[0] == 403
    assert request(link.replace("/?", "/undo?"), {})[0] == 403
    assert request(f"{server.base}/judge", good)[0] == 403  # the CSRF token alone is no login
    assert request(judge, good, {"Origin": server.base})[0] == 200
    assert request(f"{server.base}/healthz")[0] == 200
    server.stop()


def test_no_arguments_serves_the_newest_rl_run_against_its_reference(tiny_generator, tmp_path):
    from minirlhf.algorithms.ppo import PPOConfig
    from minirlhf.algorithms.rl import train
    from minirlhf.config import load_config
    from minirlhf.data.prompts import load_prompts

    cfg = load_config(PPOConfig, overrides=[
        f"--policy={tiny_generator}", "--reward.classifier_weight=0", "--reward.length_weight=1", "--steps=1",
        "--batch_size=4", "--minibatch_size=4", "--ppo_epochs=1", "--prompts.max_eval=8", "--data.max_train=400",
        "--data.max_eval=100", f"--out={tmp_path / 'runs' / 'ppo-tiny'}", "--device=cpu"])
    train(cfg)
    s = Server("--max-new-tokens", "8", "--ahead", "4", cwd=tmp_path)  # default db under runs/feedback/
    try:
        s.wait_for("pairs: [1-9]")
        db = sqlite3.connect(tmp_path / "runs" / "feedback" / "feedback.sqlite")
        rows = db.execute("SELECT prompt, provenance_a, provenance_b FROM pairs").fetchall()
        sides = [sorted((json.loads(a), json.loads(b)), key=lambda p: p["role"]) for _, a, b in rows]
        assert all([p["role"] for p in pair] == ["policy", "reference"] for pair in sides)
        policy, reference = sides[0]
        assert policy["step"] == 1 and policy["model"] == str((tmp_path / "runs" / "ppo-tiny").resolve())
        assert reference["model"] == str(Path(tiny_generator).resolve()) and reference["step"] is None
        # the page's sampling defaults (for a person to judge), recorded with each response
        assert {(p["temperature"], p["top_p"], p["top_k"]) for pair in sides for p in pair} == {(0.7, 0.9, 0)}
        _, held = load_prompts(dataclasses.replace(cfg.prompts, max_eval=10 ** 9), cfg.data)
        assert {prompt for prompt, _, _ in rows} <= set(held)
        assert (tmp_path / "runs" / "feedback" / "feedback.sqlite.admin-token").stat().st_mode & 0o777 == 0o600
        assert s.admin_url.endswith((tmp_path / "runs/feedback/feedback.sqlite.admin-token").read_text().strip())
    finally:
        s.stop()
    again = Server("--max-new-tokens", "8", "--ahead", "4", cwd=tmp_path)  # a restart keeps the admin link
    try:
        assert again.admin_url == s.admin_url.replace(s.base, again.base)
    finally:
        again.stop()
