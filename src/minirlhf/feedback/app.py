"""The feedback web page: Flask views rendered on the server, served by waitress; `serve` runs it all.

Who may do what: every page and endpoint but GET /healthz needs a token (from the link, `?token=`, then kept in
a SameSite=Strict cookie), and only the admin's opens /admin. Every POST carries a CSRF token, an HMAC of the
annotator's token under the server's secret, and is refused when the browser says it came from another site.
Model text is only ever rendered through Jinja's autoescape, and the Content-Security-Policy runs no inline script.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import torch

from minirlhf import UserError
from minirlhf.data.dialogue import is_dialogue, to_messages
from minirlhf.feedback.pairs import PairPool, Sampling, check_selection, resolve_source
from minirlhf.feedback.store import CHOICES, Store, agreement, win_rate
from minirlhf.runtime import pick_device

try:  # only serving needs flask; export and import do not
    from flask import Flask, Response, current_app, g, redirect, render_template, request, url_for
except ImportError as e:
    raise UserError("the feedback page needs flask and waitress; pip install -r requirements.txt") from e

COOKIE = "minirlhf_token"
NAME = re.compile(r"[\w .@'-]{1,40}")
ROLE_NAMES = {"user": "Human", "assistant": "Assistant", "system": "System"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "same-origin"}


def create_app(store: Store, pool, base_url: str) -> Flask:
    """The pages over `store`, with `pool` (pairs.PairPool) generating; links handed out start with `base_url`."""
    app = Flask(__name__)  # templates/ and static/ beside this file
    app.config.update(MAX_CONTENT_LENGTH=64 * 1024, PUBLIC_URL=base_url, STORE=store, POOL=pool,
                      SECRET=store.secret())
    app.before_request(authenticate)
    app.after_request(add_headers)
    app.context_processor(lambda: {"token": g.get("token"), "csrf": g.get("csrf"), "who": g.get("who"),
                                   "ROLE_NAMES": ROLE_NAMES})
    for rule, view, methods in (("/healthz", healthz, ["GET"]), ("/", annotate, ["GET"]), ("/judge", judge, ["POST"]),
                                ("/undo", undo, ["POST"]), ("/admin", admin, ["GET", "POST"])):
        app.add_url_rule(rule, view_func=view, methods=methods)
    return app


def _store() -> Store:
    return current_app.config["STORE"]


def csrf_for(token: str) -> str:
    return hmac.new(current_app.config["SECRET"], token.encode("utf-8"), hashlib.sha256).hexdigest()


def same_site() -> bool:
    """Whether the browser's Origin (or, without one, Referer) header names this server; True when it sends neither."""
    sender = request.headers.get("Origin") or request.headers.get("Referer")
    if not sender:
        return True
    parts = urlsplit(sender)
    return parts.scheme == request.scheme and parts.netloc == request.host


def denied(why: str) -> Response:
    return Response(f"403 Forbidden: {why}\n", 403, mimetype="text/plain")


def authenticate():
    """Before every request but /healthz: a known token, and on a POST, its CSRF token and a same-site sender."""
    if request.endpoint == "healthz":
        return None
    token = request.args.get("token") or request.form.get("token") or request.cookies.get(COOKIE) or ""
    who = _store().annotator(token) if token else None
    if who is None:
        return denied("this page needs your personal link (...?token=...); ask whoever runs the feedback server")
    if request.method == "POST" and not (hmac.compare_digest(request.form.get("csrf", ""), csrf_for(token))
                                         and same_site()):
        return denied("the form was stale or came from another site; reload the page and try again")
    g.who, g.token, g.csrf = who, token, csrf_for(token)
    return None


def add_headers(response: Response) -> Response:
    response.headers.update(SECURITY_HEADERS)
    if request.endpoint != "static":
        response.headers["Cache-Control"] = "no-store"
    token = g.get("token")
    if token and request.cookies.get(COOKIE) != token:  # the link's token, kept for the pages that follow
        response.set_cookie(COOKIE, token, max_age=30 * 86400, httponly=True, samesite="Strict", path="/")
    return response


def healthz():
    ready = current_app.config["POOL"].state == "running" or _store().counts()["pairs"] > 0
    return {"status": "ok" if ready else "starting", "generator": current_app.config["POOL"].state}, \
        200 if ready else 503


def annotate():
    store, me = _store(), g.who["id"]
    pair, mine = store.next_pair(me), store.counts(me)
    status = {"judged": mine["a"] + mine["b"] + mine["tie"], "skipped": mine["skip"], "waiting": store.waiting(me),
              "can_undo": any(mine[c] for c in CHOICES)}
    if pair is None:
        return render_template("wait.html", pool=current_app.config["POOL"].state, **status)
    return render_template("annotate.html", pair=pair, turns=to_messages(pair["prompt"]),
                           dialogue=is_dialogue(pair["prompt"]), **status)


def judge():
    choice, pair_id = request.form.get("choice", ""), request.form.get("pair_id", "")
    if choice not in CHOICES or not pair_id.isdigit():
        return Response("400 Bad Request: a judgement needs pair_id and a choice of a, b, tie, skip\n", 400,
                        mimetype="text/plain")
    _store().judge(g.who["id"], int(pair_id), choice)  # a repeat of the same submit changes nothing
    return redirect(url_for("annotate", token=g.token), 303)


def undo():
    _store().undo(g.who["id"])
    return redirect(url_for("annotate", token=g.token), 303)


def admin():
    if not g.who["is_admin"]:
        return denied("the admin page opens with the admin link the server printed when it started")
    link = error = None
    if request.method == "POST":
        name = " ".join(request.form.get("name", "").split())
        if not NAME.fullmatch(name) or name == "admin" or name.startswith("import:"):
            error = "A name is 1-40 letters, digits, spaces or . @ ' - (not 'admin', not 'import:...')."
        else:
            link = f"{current_app.config['PUBLIC_URL']}/?token={_store().set_annotator(name)}"
    return render_template("admin.html", link=link, error=error,
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


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _progress(store: Store) -> str:
    c = store.counts()
    return (f"pairs: {c['pairs']} in store, {store.fresh()} ready | judgements: "
            f"{sum(c[k] for k in CHOICES)} ({c['a']} A, {c['b']} B, {c['tie']} tie, {c['skip']} skip)")


def _watch(store: Store, pool) -> None:
    """Print progress whenever it changes, until Ctrl-C (or SIGTERM); raise what stopped the generator."""
    last, ready = None, False
    while True:
        if pool.error is not None:
            raise pool.error
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
    `start()` until `stop()`. It listens from the moment it is made (`url`; port 0 picks a free one)."""

    def __init__(self, store: Store, pool, host: str = "127.0.0.1", port: int = 0):
        try:
            from waitress import create_server
        except ImportError as e:
            raise UserError("the feedback page needs waitress; pip install -r requirements.txt") from e
        self.store, self.pool = store, pool
        self.admin_token = store.admin_token(Path(f"{store.path}.admin-token"))
        app = create_app(store, pool, "")
        try:
            self.server = create_server(app, host=host, port=port, threads=8, ident="minirlhf")
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


def serve(args) -> int:
    """`minirlhf feedback serve`: the page, the generator thread and the progress lines, until Ctrl-C."""
    if args.ahead < 1 or not 0 <= args.overlap <= 1:
        raise UserError(f"--ahead must be >= 1 and --overlap in [0, 1], got {args.ahead} and {args.overlap}")
    check_selection(args.select, args.reward_model)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))  # a core left to the web server keeps pages quick
    store = Store(args.db)
    source = resolve_source(args.policy, args.prompts)
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed)
    pool = PairPool(store, source, sampling, args.ahead, args.overlap, pick_device(args.device)[0],
                    select=args.select, reward_models=args.reward_model)
    page = Page(store, pool, args.host, args.port)
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:  # from here a Ctrl-C, however early (a script may stop the server as soon as it prints its link), stops cleanly
        page.start()
        print(f"feedback: {source.describe()}; database {store.path}"
              + (f"; most uncertain pair first of {args.ahead}" if args.select == "uncertain" else ""), flush=True)
        print(f"sampling: temperature {sampling.temperature:g}, top_p {sampling.top_p:g}, top_k {sampling.top_k}, "
              f"{sampling.max_new_tokens} new tokens at most (recorded with each response)", flush=True)
        print(f"serving on {page.url} (port {page.port})", flush=True)
        print(f"admin link (keep it to yourself; it also lets you judge): {page.admin_link}", flush=True)
        _watch(store, pool)
    except KeyboardInterrupt:
        print("stopping; every judgement so far is in the database", flush=True)
    finally:
        page.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(_progress(store), flush=True)
    return 0
