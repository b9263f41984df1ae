"""The feedback web page: Flask views rendered on the server, served by waitress; `serve` runs it all.

Who may do what is auth.py's: a link's token becomes a cookie, forms carry CSRF tokens, cross-site POSTs are refused.
A judgement counts only for the pair on the annotator's screen that still wants a label; any other (a second tab's
repeat, a pair never shown, one others finished meanwhile) answers 409 with the page and a line saying why. Model text
is only ever rendered through Jinja's autoescape, and the Content-Security-Policy runs no inline script.
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import socket
import sqlite3
import threading
import time
from pathlib import Path

import torch

from minirlhf import UserError
from minirlhf.data.dialogue import is_dialogue, to_messages
from minirlhf.feedback.conversations import episodes_of, labelled
from minirlhf.feedback.episode_pairs import env_config, make_pool, use_episodes
from minirlhf.feedback.pairs import Sampling, check_selection, default_db, made_for, resolve_source
from minirlhf.feedback.figures import agreement, win_rate
from minirlhf.feedback.store import ALREADY_JUDGED, CHOICES, JUDGED, NOT_NEEDED, NOT_SHOWN, TOKEN_DAYS, Failure, Store
from minirlhf.runtime import pick_device

try:  # only serving needs flask; export and import do not
    from flask import Flask, Response, current_app, g, redirect, render_template, request, url_for
    from werkzeug.exceptions import HTTPException
    from werkzeug.middleware.proxy_fix import ProxyFix

    from minirlhf.feedback import auth
except ImportError as e:
    raise UserError("the feedback page needs flask and waitress; pip install -r requirements.txt") from e

NAME = re.compile(r"[\w .@'-]{1,40}")
PAIR_ID = re.compile(r"[0-9]{1,18}")  # ASCII digits (str.isdigit takes "²"), and an id SQLite's integers hold
ROLE_NAMES = {"user": "Human", "assistant": "Assistant", "system": "System"}
REFUSED = {
    ALREADY_JUDGED: "Already judged: you judged this pair before (in another tab?); your first choice is kept.",
    NOT_SHOWN: "This pair was not shown to you, so nothing was recorded; here is the pair that is.",
    NOT_NEEDED: "This pair no longer needs a label (others judged it while it was open here); nothing was recorded.",
}


def create_app(store: Store, pool, base_url: str, trusted_proxy: bool = False, token_days: float = TOKEN_DAYS) -> Flask:
    """The pages over `store`, with `pool` (pairs.PairPool) generating; links handed out start with `base_url` (behind
    a trusted proxy: with the address the browser used) and work for `token_days`."""
    app = Flask(__name__)  # templates/ and static/ beside this file
    app.config.update(MAX_CONTENT_LENGTH=64 * 1024, PUBLIC_URL=base_url, STORE=store, POOL=pool,
                      SECRET=store.secret(), TRUSTED_PROXY=trusted_proxy, TOKEN_DAYS=token_days)
    if trusted_proxy:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1, x_port=1, x_prefix=1)
    app.before_request(auth.authenticate)
    app.after_request(auth.add_headers)
    app.register_error_handler(HTTPException, auth.http_error)
    app.register_error_handler(sqlite3.Error, database_error)
    app.context_processor(lambda: {"csrf": g.get("csrf"), "who": g.get("who"), "ROLE_NAMES": ROLE_NAMES})
    for rule, view, methods in (("/healthz", healthz, ["GET"]), ("/", annotate, ["GET"]), ("/judge", judge, ["POST"]),
                                ("/undo", undo, ["POST"]), ("/admin", admin, ["GET", "POST"])):
        app.add_url_rule(rule, view_func=view, methods=methods)
    return app


def _store() -> Store:
    return current_app.config["STORE"]


def database_error(e: sqlite3.Error) -> Response:
    return auth.plain(503, f"Service Unavailable: the feedback database failed ({e}); try again in a moment")


def healthz():
    ready = current_app.config["POOL"].state == "running" or _store().counts()["pairs"] > 0
    return {"status": "ok" if ready else "starting", "generator": current_app.config["POOL"].state}, \
        200 if ready else 503


def annotate(message: str | None = None):
    store, me = _store(), g.who["id"]
    pair, mine = store.next_pair(me), store.counts(me)
    status = {"judged": mine["a"] + mine["b"] + mine["tie"], "skipped": mine["skip"], "waiting": store.waiting(me),
              "can_undo": any(mine[c] for c in CHOICES), "message": message}
    if pair is None:
        return render_template("wait.html", pool=current_app.config["POOL"].state, **status)
    episodes = episodes_of(pair)
    if episodes is not None:  # two whole conversations: the opening once, then each side's turns, labelled
        return render_template("annotate.html", pair=pair, turns=labelled(episodes.opening), dialogue=True,
                               episodes={"a": labelled(episodes.rest_a), "b": labelled(episodes.rest_b)}, **status)
    return render_template("annotate.html", pair=pair, turns=to_messages(pair["prompt"]),
                           dialogue=is_dialogue(pair["prompt"]), episodes=None, **status)


def judge():
    choice, pair_id = g.form.get("choice", ""), g.form.get("pair_id", "")
    if choice not in CHOICES or not PAIR_ID.fullmatch(pair_id):
        return auth.bad("a judgement needs pair_id (a number) and a choice of a, b, tie, skip")
    outcome = _store().judge(g.who["id"], int(pair_id), choice)
    if outcome == JUDGED:
        return redirect(url_for("annotate"), 303)
    return annotate(REFUSED[outcome]), 409


def undo():
    _store().undo(g.who["id"])
    return redirect(url_for("annotate"), 303)


def admin():
    if not g.who["is_admin"]:
        return auth.denied("the admin page opens with the admin link the server printed when it started")
    link = error = notice = None
    if request.method == "POST" and "revoke" in g.form:
        name = g.form["revoke"]
        if name == g.who["name"]:
            error = "The admin link is revoked with `minirlhf feedback revoke admin` (a restart then makes a new one)."
        else:
            try:
                notice = f"{name}'s link " + ("now opens nothing" if _store().revoke(name) else "was revoked already") \
                    + "; their judgements are kept. A new link for the name brings them back."
            except UserError as e:  # no such name (a stale page)
                error = str(e)
    elif request.method == "POST":
        name = " ".join(g.form.get("name", "").split())
        if not NAME.fullmatch(name) or name == "admin" or name.startswith("import:"):
            error = "A name is 1-40 letters, digits, spaces or . @ ' - (not 'admin', not 'import:...')."
        else:
            base = request.url_root.rstrip("/") if current_app.config["TRUSTED_PROXY"] else \
                current_app.config["PUBLIC_URL"]
            link = f"{base}/?token={_store().set_annotator(name, days=current_app.config['TOKEN_DAYS'])}"
    return render_template("admin.html", link=link, error=error, notice=notice,
                           token_days=current_app.config["TOKEN_DAYS"],
                           **admin_figures(_store(), current_app.config["POOL"]))


def admin_figures(store: Store, pool) -> dict:
    """What the admin page shows: who judged what, agreement, the policy's win rate, the generator."""
    return {"annotators": store.annotator_table(), "agreement": agreement(store.labels_per_pair()),
            "win": win_rate(store.policy_scores()), "counts": store.counts(), "fresh": store.fresh(),
            "source": pool.source.describe(), "sampling": vars(pool.sampling), "pool": pool.state,
            "compares_policy": pool.source.reference is not None}


def public_url(host: str, port: int) -> str:
    """The address to hand out: on all interfaces (0.0.0.0), this machine's LAN address."""
    if host in ("0.0.0.0", "::", ""):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.connect(("10.255.255.255", 1))  # UDP connect sends nothing; it picks the outgoing interface
                host = s.getsockname()[0]
            except OSError:
                host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _progress(store: Store) -> str:
    c = store.counts()
    return (f"pairs: {c['pairs']} in store, {store.fresh()} ready | judgements: "
            f"{sum(c[k] for k in CHOICES)} ({c['a']} A, {c['b']} B, {c['tie']} tie, {c['skip']} skip)")


def generator_failure(error: BaseException) -> BaseException:
    """What stopped the generator thread, as `minirlhf feedback` reports it: the user's error as it is (exit 2),
    anything else as one line (exit 1), the original kept as the cause for --debug."""
    if isinstance(error, (UserError, KeyboardInterrupt)):
        return error
    failure = Failure(f"the pair generator stopped: {type(error).__name__}: {error}; every judgement so far is in "
                      "the database (--debug shows the traceback)")
    failure.__cause__ = error
    return failure


def _watch(store: Store, pool) -> None:
    """Print progress whenever it changes, until Ctrl-C (or SIGTERM); raise what stopped the generator."""
    last, ready = None, False
    while True:
        if pool.error is not None:
            raise generator_failure(pool.error)
        if pool.state == "running" and not ready:
            ready = True
            print(f"model ready; keeping {pool.ahead} pairs ahead", flush=True)
        line = _progress(store)
        if line != last:
            print(line, flush=True)
            last = line
        time.sleep(1.0)


class Page:
    """The feedback page in this process: `pool` generating in one thread, waitress serving in another, from
    `start()` until `stop()`. It listens from the moment it is made (`url`; port 0 picks a free one). Links made on
    its admin page work for `token_days`; with `trusted_proxy` it believes a proxy's X-Forwarded-* headers."""

    def __init__(self, store: Store, pool, host: str = "127.0.0.1", port: int = 0, trusted_proxy: bool = False,
                 token_days: float = TOKEN_DAYS):
        try:
            from waitress import create_server
        except ImportError as e:
            raise UserError("the feedback page needs waitress; pip install -r requirements.txt") from e
        self.store, self.pool = store, pool
        self.admin_token = store.admin_token(Path(f"{store.path}.admin-token"), token_days)
        app = create_app(store, pool, "", trusted_proxy, token_days)
        try:
            # waitress drops X-Forwarded-* itself unless told to pass them on, to ProxyFix
            self.server = create_server(app, host=host, port=port, threads=8, ident="minirlhf",
                                        clear_untrusted_proxy_headers=not trusted_proxy)
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port, "
                            "or --port 0 for a free one") from e
        self.port = self.server.effective_port
        self.url = app.config["PUBLIC_URL"] = public_url(host, self.port)
        self.admin_link = f"{self.url}/admin?token={self.admin_token}"
        self.stopping = threading.Event()
        self.http = threading.Thread(target=self._serve, daemon=True, name="minirlhf-http")

    def _serve(self) -> None:
        """waitress's socket loop (its `server.run`), a poll at a time, so that `stop` can end it between polls."""
        from waitress import wasyncore

        sockets = getattr(self.server, "_map", None) or self.server.map
        while not self.stopping.is_set():
            wasyncore.loop(timeout=0.2, map=sockets, count=1)

    def start(self) -> None:
        self.pool.start()
        self.http.start()

    def stop(self) -> None:
        """End the socket loop, then waitress's worker threads and every connection, then wait for the batch being
        sampled: a thread still running Python (or inside torch) when the interpreter exits can abort it
        ("terminate called without an active exception"), and closing sockets under a running poll fails it."""
        from waitress import wasyncore

        self.pool.halt.set()
        self.stopping.set()
        if self.http.is_alive():
            self.http.join(10)
        self.server.task_dispatcher.shutdown(timeout=5)  # a single-socket server's close() leaves them waiting
        wasyncore.close_all(getattr(self.server, "_map", None) or self.server.map)  # sockets, trigger, keep-alives
        _finish(self.pool)


def _finish(pool) -> None:
    """Let the batch being sampled end: a thread cannot be stopped inside torch, and one left running when Python
    exits aborts it. A second Ctrl-C quits at once (every pair and judgement is committed already)."""
    if pool.is_alive():  # (not yet started, if the Ctrl-C came first)
        pool.join(0.5)
    if not pool.is_alive():
        return
    print("finishing the pairs being sampled (Ctrl-C again to quit now)", flush=True)
    try:
        while pool.is_alive():
            pool.join(0.2)
    except KeyboardInterrupt:
        os._exit(130)


def _announce(args, source, sampling: Sampling, store: Store, page: Page) -> None:
    """The lines serve starts with: what it compares and where it stores it first, then warnings, then the links."""
    print(f"feedback: {source.describe()}; database {store.path}"
          + (f"; most uncertain pair first of {args.ahead}" if args.select == "uncertain" else ""), flush=True)
    old = Path("runs/feedback/feedback.sqlite")
    if args.db is None and old.is_file() and old.resolve() != store.path.resolve():
        print(f"note: {old} (the one database of older versions) is not used; --db {old} continues it", flush=True)
    if not loopback(args.host) and not args.trusted_proxy:
        print("warning: plain HTTP off this machine: the links and their tokens travel in clear text on the network; "
              "put a TLS proxy in front and add --trusted-proxy, or keep --host 127.0.0.1 and reach it through an "
              f"SSH tunnel (ssh -L {page.port}:127.0.0.1:{page.port} THIS_HOST)", flush=True)
    print(f"sampling: temperature {sampling.temperature:g}, top_p {sampling.top_p:g}, top_k {sampling.top_k}, "
          f"{sampling.max_new_tokens} new tokens at most" + (" a turn" if source.episodes else "")
          + " (recorded with each response)", flush=True)
    print(f"serving on {page.url} (port {page.port})", flush=True)
    print(f"admin link (keep it to yourself; it also lets you judge; it works for {args.token_days:g} days): "
          f"{page.admin_link}", flush=True)
    if args.trusted_proxy:
        print("behind the proxy, open that path and token on the proxy's https address; the links the admin page makes "
              "use the address it was opened with", flush=True)


def serve(args) -> int:
    """`minirlhf feedback serve` (args: a commands.ServeConfig): the page, the generator thread and the progress
    lines, until Ctrl-C."""
    check_selection(args.select, args.reward_model)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))  # a core left to the web server keeps pages quick
    env = env_config(args)  # None: pairs of single replies
    source = resolve_source(args.policy, args.prompts)
    if env is not None:
        use_episodes(source, env, args.prompts)
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed)
    store = Store(args.db or default_db(args.policy))
    store.claim(made_for(source, sampling), mix=args.mix)
    pool = make_pool(env, store, source, sampling, args.ahead, args.overlap, pick_device(args.device)[0],
                     select=args.select, reward_models=args.reward_model)
    page = Page(store, pool, args.host, args.port, args.trusted_proxy, args.token_days)
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:  # from here a Ctrl-C, however early (a script may stop the server as soon as it prints its link), stops cleanly
        _announce(args, source, sampling, store, page)  # first: before the model's loading says anything
        page.start()  # (the socket listens already: a browser given the link now is answered in a moment)
        _watch(store, pool)
    except KeyboardInterrupt:
        print("stopping; every judgement so far is in the database", flush=True)
    finally:
        page.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(_progress(store), flush=True)
    return 0
