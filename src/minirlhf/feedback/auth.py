"""Who may do what on the feedback page, checked before every view (app.py registers `authenticate`).

- A link's `?token=` signs the browser in: the first GET with it sets the token as an HttpOnly, SameSite=Strict cookie
  (Secure over https) and answers 303 to the same address without it, so the token does not stay in the address bar,
  the history, or the Referer of what follows; from then on only the cookie is read. A token that expired or was
  revoked gets 403 with a line saying to ask for a new link.
- A POST must be a plain urlencoded form (anything else is 400), carry the CSRF token of its page (an HMAC of the
  annotator's token under the server's secret; malformed: 400, wrong or missing: 403) and come from this site
  (its Origin, else Referer, and Sec-Fetch-Site).
- Behind a TLS proxy (`--trusted-proxy`) the X-Forwarded-Proto/Host/Port/Prefix headers say what the browser sees
  (werkzeug's ProxyFix); without it they are ignored.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from urllib.parse import parse_qsl, urlencode, urlsplit

from flask import Response, current_app, g, redirect, render_template, request
from werkzeug.exceptions import HTTPException

from minirlhf.feedback.tokens import refusal

COOKIE = "minirlhf_token"
CSRF_SHAPE = re.compile(r"[0-9a-f]{64}")
MAX_FIELDS = 16


def csrf_for(token: str) -> str:
    return hmac.new(current_app.config["SECRET"], token.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


def plain(status: int, text: str) -> Response:
    return Response(f"{status} {text}\n", status, mimetype="text/plain")


def denied(why: str) -> Response:
    return plain(403, f"Forbidden: {why}")


def bad(why: str) -> Response:
    return plain(400, f"Bad Request: {why}")


def http_error(e: HTTPException) -> Response:
    """werkzeug's own errors (404, 405, 413, ...) as one plain line, like ours."""
    return plain(e.code or 500, f"{e.name}: {e.description}")


def same_site() -> bool:
    """Whether the browser says the request came from this site: its Sec-Fetch-Site, and its Origin (or, without
    one, Referer) naming this server; True when it sends none of them (not a browser)."""
    if request.headers.get("Sec-Fetch-Site") == "cross-site":
        return False
    sender = request.headers.get("Origin") or request.headers.get("Referer")
    if not sender:
        return True
    try:
        parts = urlsplit(sender)
        return parts.scheme == request.scheme and parts.netloc == request.host
    except ValueError:  # e.g. "http://[::1" (urlsplit raises on a broken IPv6 host)
        return False


def parse_form() -> dict[str, str] | Response:
    """The POST body as fields, or a 400: a browser's form is urlencoded ASCII, each field once, valid UTF-8."""
    if request.mimetype != "application/x-www-form-urlencoded":
        return bad("send the form as application/x-www-form-urlencoded, as the page does")
    try:
        fields = parse_qsl(request.get_data(cache=True).decode("ascii"), keep_blank_values=True,
                           strict_parsing=True, errors="strict", max_num_fields=MAX_FIELDS)
    except (UnicodeDecodeError, ValueError):
        return bad("the form body is not a well-formed urlencoded form; reload the page and try again")
    form = dict(fields)
    if len(form) != len(fields):
        return bad("a form field was sent twice; reload the page and try again")
    return form


def _check_post(token: str) -> Response | None:
    """The CSRF token and the sender of a POST; None when both are right."""
    form = parse_form()
    if isinstance(form, Response):
        return form
    sent = form.get("csrf")
    if sent is not None and not CSRF_SHAPE.fullmatch(sent):
        return bad("the form's csrf field is malformed; reload the page and try again")
    if sent is None or not hmac.compare_digest(sent, csrf_for(token)) or not same_site():
        return denied("the form was stale or came from another site; reload the page and try again")
    g.form = form
    return None


def _sign_in(token: str, who) -> Response:
    """The link's token into the cookie, and the same address without it."""
    rest = [(k, v) for k, v in request.args.items(multi=True) if k != "token"]
    response = redirect(request.script_root + request.path + (f"?{urlencode(rest)}" if rest else ""), 303)
    days_left = (who["expires"] - time.time()) if who["expires"] is not None else 30 * 86400
    response.set_cookie(COOKIE, token, max_age=max(1, int(days_left)), httponly=True, samesite="Strict",
                        secure=request.is_secure, path="/")
    return response


def _bounce() -> Response | None:
    """A cross-site link (from a mail or a chat) lands here after the 303 without the Strict cookie it just set,
    which browsers hold back for the rest of a cross-site navigation: a page that reloads itself, from this site, with
    it. None for every other request."""
    if (request.method == "GET" and request.headers.get("Sec-Fetch-Site") == "cross-site"
            and request.headers.get("Sec-Fetch-Mode") == "navigate"):
        return Response(render_template("bounce.html"), 200)
    return None


def authenticate():
    """Before every request but /healthz: a working token (the link's, on a GET, or the cookie's), then on a POST,
    its form, CSRF token and a same-site sender."""
    if request.endpoint == "healthz":
        return None
    from_link = request.method in ("GET", "HEAD") and "token" in request.args
    token = request.args.get("token", "") if from_link else request.cookies.get(COOKIE, "")
    who = current_app.config["STORE"].lookup(token) if token else None
    why = refusal(who)
    if why is not None:
        return (None if token else _bounce()) or denied(why)
    if from_link:
        return _sign_in(token, who)
    if request.method == "POST":
        problem = _check_post(token)
        if problem is not None:
            return problem
    g.who, g.csrf = who, csrf_for(token)
    return None


SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "same-origin"}


def add_headers(response: Response) -> Response:
    response.headers.update(SECURITY_HEADERS)
    if request.endpoint != "static":
        response.headers["Cache-Control"] = "no-store"
    return response
