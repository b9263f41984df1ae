"""The feedback page in a real headless Chromium (Debian's, driven by Playwright): clicks, keys, undo, escaping.

Under CI (CI=true) these tests must run; elsewhere they skip, saying why, when Chromium or Playwright is missing.
`make test` installs Chromium with apt-get where it can.
"""

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from minirlhf.feedback.store import Store

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
HH = "\n\nHuman: hi there\n\nAssistant: Hello! How can I help?\n\nHuman: what should I cook tonight?\n\nAssistant:"
EVIL = "<script>window.pwned = 1</script><b>not bold</b>\n    an indented second line"


def _need_browser():
    """Playwright's sync API, or a skip (a failure under CI) that says what is missing."""
    missing = []
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing.append("the playwright package (pip install -r requirements.txt)")
    if not Path(CHROMIUM).is_file():
        missing.append(f"{CHROMIUM} (apt-get install chromium, or `make test` as root)")
    if missing:
        why = "browser tests need " + " and ".join(missing)
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(why + "; under CI they must run")
        pytest.skip(why)
    return sync_playwright


@pytest.fixture
def served(tiny_generator, tmp_path):
    """A store holding one hand-made pair (the first served) and an annotator, and the server on it."""
    db = tmp_path / "f.sqlite"
    store = Store(db)
    first = store.add_pair(HH, EVIL, "Pasta with tomatoes and basil.", {"role": "sample"}, {"role": "sample"})
    token = store.set_annotator("browser")
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "say hi"}]}) + "\n")
    proc = subprocess.Popen([sys.executable, "-u", "-m", "minirlhf", "feedback", "serve", "--port", "0", "--db", str(db),
                             "--policy", str(tiny_generator), "--prompts", "prompts.jsonl", "--max-new-tokens", "10"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    base, deadline = None, time.monotonic() + 30
    while base is None and proc.poll() is None and time.monotonic() < deadline:
        base = next((m.group(1) for line in list(lines) if (m := re.search(r"serving on (http://\S+)", line))), None)
        time.sleep(0.05)
    if base is None:
        proc.kill()
        pytest.fail("waited 30 s for the server's 'serving on URL' line (or it exited); it printed:\n" + "".join(lines))
    yield {"db": db, "link": f"{base}/?token={token}", "first": first}
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0, "".join(lines)


def _shown(page) -> int:
    return int(page.locator('input[name="pair_id"]').get_attribute("value"))


def _act(page, do) -> int:
    """Do something that submits a form; the pair id on the page that follows."""
    with page.expect_navigation():
        do()
    page.wait_for_selector('input[name="pair_id"]', state="attached")
    return _shown(page)


def test_judge_with_clicks_and_keys_then_undo(served):
    sync_playwright = _need_browser()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        errors = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(served["link"])
        page.wait_for_selector('input[name="pair_id"]', state="attached")

        # The hand-made pair first: model text is text, never markup, and keeps its whitespace.
        assert _shown(page) == served["first"]
        assert page.locator("#response-a .text").inner_text() == EVIL
        assert page.locator("#response-a script, #response-a b").count() == 0
        assert page.evaluate("() => window.pwned") is None
        turns = page.locator(".prompt .turn").all_inner_texts()
        assert [t.split("\n")[0] for t in turns] == ["Human", "Assistant", "Human"]
        assert "what should I cook tonight?" in turns[2]

        shown = [served["first"]]
        shown.append(_act(page, lambda: page.click("button[value=a]")))
        shown.append(_act(page, lambda: page.click("button[value=b]")))
        shown.append(_act(page, lambda: page.click("button[value=tie]")))
        assert "you judged 3" in page.locator(".status").inner_text()
        after_key = _act(page, lambda: page.keyboard.press("b"))
        assert _act(page, lambda: page.keyboard.press("u")) == shown[3]  # the pair judged by key is back
        assert after_key not in shown and len(set(shown)) == 4

        page.set_viewport_size({"width": 390, "height": 844})  # a phone: A above B
        a, b = (page.locator(f"#response-{s}").bounding_box() for s in "ab")
        assert b["y"] >= a["y"] + a["height"] and b["width"] > 300
        browser.close()
    assert not errors, errors

    rows = sqlite3.connect(served["db"]).execute(
        "SELECT j.pair_id, j.choice, j.undone IS NOT NULL FROM judgements j JOIN annotators a "
        "ON a.id = j.annotator_id WHERE a.name = 'browser' ORDER BY j.id").fetchall()
    assert rows == [(shown[0], "a", 0), (shown[1], "b", 0), (shown[2], "tie", 0), (shown[3], "b", 1)]
    prompts = {r[0] for r in sqlite3.connect(served["db"]).execute("SELECT prompt FROM pairs WHERE id != ?",
                                                                    (served["first"],))}
    assert prompts == {"\n\nHuman: say hi\n\nAssistant:"}  # --prompts, conversations as HH text


def test_a_link_clicked_on_another_site_signs_in_and_a_second_tab_is_told(served):
    """The link as annotators get it, in a mail or a chat: a click from another site. The token moves into the
    cookie and out of the address bar; a second tab's choice on a pair judged in the first is refused, visibly."""
    sync_playwright = _need_browser()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = browser.new_context()
        page = context.new_page()
        statuses = []
        page.on("response", lambda r: statuses.append((r.status, r.url.split("?")[0].rsplit("/", 1)[-1] or "/")))
        page.set_content(f'<p>Your link: <a id="go" href="{served["link"]}">open</a></p>')  # another site's page
        page.click("#go")
        page.wait_for_selector('input[name="pair_id"]', state="attached")
        base = served["link"].split("/?")[0]
        assert page.url == f"{base}/" and "token" not in page.url
        assert page.evaluate("() => document.cookie") == ""  # HttpOnly: no script reads it
        # (Chromium holds the new SameSite=Strict cookie back from the 303's target, as the navigation began on
        # another site: the page that reloads itself from this site gets it through; without it, this was a 403.)
        assert statuses[0][0] == 303 and all(s < 400 for s, _ in statuses), statuses

        second = context.new_page()  # a second tab: the same pair, from the cookie alone
        second.goto(f"{base}/")
        second.wait_for_selector('input[name="pair_id"]', state="attached")
        assert _shown(second) == _shown(page) == served["first"]
        _act(page, lambda: page.click("button[value=a]"))
        with second.expect_navigation():
            second.click("button[value=b]")
        assert "Already judged" in second.locator("#notice").inner_text()
        assert _shown(second) == _shown(page) != served["first"]  # both tabs now show the next pair
        browser.close()
    rows = sqlite3.connect(served["db"]).execute("SELECT pair_id, choice FROM judgements").fetchall()
    assert rows == [(served["first"], "a")]
