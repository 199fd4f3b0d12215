"""The web catalog (S2 in a browser): server-rendered pages (Jinja2), session login with
CSRF protection, live tunnel states.

* ``/login`` - a form; its CSRF token is bound to a pre-session cookie (double
  submit), so a foreign page cannot log a browser in as someone else;
* ``/`` - the catalog: the services valid for the user, a form per service to open a
  tunnel through one of the user's gateways, the user's tunnels with their states and
  local addresses; an ASP also sees its own services with live connection counts;
* ``POST /ui/tunnels`` and ``POST /ui/tunnels/{id}/close`` - start S2-S5 or S6-S7 and
  come back at once (303); the page watches the states change;
* ``/ui/state`` - what the page shows, as JSON, long-polled by the page's script (held
  until something changes), so states appear live without a reload.

Sessions live in the server's memory (a restart logs everyone out), cookies are
HttpOnly and SameSite=Strict (Secure over HTTPS); every POST carries the session's
CSRF token. No asset comes from elsewhere: the style and the script are inline.
"""

from __future__ import annotations

import contextlib
import hmac
import secrets
import time
import urllib.parse
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from kakehashi.core.web import ApiError

SESSION, PRE = "kh_session", "kh_pre"
SESSION_TTL = 8 * 3600.0
MAX_FORM = 16 * 1024
MAX_SESSIONS = 10_000

_env: Any = None


def _templates() -> Any:
    global _env
    if _env is None:
        import jinja2

        _env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(Path(__file__).parent / "templates")),
            autoescape=True, trim_blocks=True, lstrip_blocks=True)
    return _env


def _render(name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
    html = _templates().get_template(name).render(**ctx)
    return HTMLResponse(html, status_code=status, headers={
        "Cache-Control": "no-store",
        "Content-Security-Policy": "default-src 'self'; style-src 'unsafe-inline'; "
                                   "script-src 'unsafe-inline'; frame-ancestors 'none'",
        "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"})


async def _form(request: Request) -> dict[str, str]:
    body = await request.body()
    if len(body) > MAX_FORM:
        raise ApiError(413, "too-large", "form too large")
    try:
        pairs = urllib.parse.parse_qsl(body.decode(), max_num_fields=20, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        raise ApiError(400, "bad-form", "malformed form") from None
    return {k: v for k, v in pairs}


def add_pages(app: Any, srv: Any) -> None:
    from kakehashi.switch.server import Who

    def cookie(resp: Response, request: Request, name: str, value: str,
               max_age: int | None = None) -> None:
        resp.set_cookie(name, value, httponly=True, samesite="strict", path="/",
                        secure=request.url.scheme == "https", max_age=max_age)

    def session(request: Request) -> dict[str, Any] | None:
        token = request.cookies.get(SESSION, "")
        sess = srv.sessions.get(token) if token else None
        if sess is None or sess["expires"] < time.time():
            if sess is not None:
                srv.sessions.pop(token, None)
            return None
        return sess

    def check_csrf(sess: dict[str, Any], form: dict[str, str]) -> None:
        if not hmac.compare_digest(form.get("csrf", ""), sess["csrf"]):
            srv.audit.record("csrf", False, user=sess["user"])
            raise ApiError(403, "csrf", "the form's CSRF token is missing or wrong")

    def state(sess: dict[str, Any]) -> dict[str, Any]:
        who = Who(user=sess["user"], role=sess["role"])
        gws = sorted(name for name, owner in srv.switch.gateway_owner.items()
                     if owner == who.user)
        return {"user": who.user, "role": who.role, "version": srv.version,
                "services": srv.switch.catalog(
                    who.user, who.role, srv.cluster.totals if srv.cluster else None),
                "gateways": [{"name": g, "online": g in srv.links} for g in gws],
                "tunnels": srv.tunnels_of(who, everything=True)[-50:]}

    @app.get("/login", include_in_schema=False)
    async def login_page(request: Request) -> Response:
        pre = secrets.token_urlsafe(24)
        resp = _render("login.html", csrf=pre, error=request.query_params.get("error", ""))
        cookie(resp, request, PRE, pre, 600)
        return resp

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        form = await _form(request)
        pre = request.cookies.get(PRE, "")
        if not pre or not hmac.compare_digest(form.get("csrf", ""), pre):
            return RedirectResponse("/login?error=session+expired%2C+try+again", 303)
        user, pw = form.get("user", "")[:64], form.get("password", "")[:1024]
        try:
            who = await srv.login(user, pw, request.client.host if request.client else "")
        except ApiError as exc:
            return RedirectResponse("/login?error=" + urllib.parse.quote(exc.message), 303)
        if len(srv.sessions) >= MAX_SESSIONS:  # the oldest go first
            for token in sorted(srv.sessions, key=lambda k: srv.sessions[k]["expires"])[
                    :MAX_SESSIONS // 10]:
                srv.sessions.pop(token, None)
        token = secrets.token_urlsafe(32)
        srv.sessions[token] = {"user": who.user, "role": who.role,
                               "csrf": secrets.token_urlsafe(24), "flash": "",
                               "expires": time.time() + SESSION_TTL}
        srv.audit.record("web-login", True, user=who.user)
        resp = RedirectResponse("/", 303)
        cookie(resp, request, SESSION, token)
        resp.delete_cookie(PRE, path="/")
        return resp

    @app.post("/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        sess = session(request)
        if sess is not None:
            check_csrf(sess, await _form(request))
            srv.sessions.pop(request.cookies.get(SESSION, ""), None)
        resp = RedirectResponse("/login", 303)
        resp.delete_cookie(SESSION, path="/")
        return resp

    @app.get("/", include_in_schema=False)
    async def catalog(request: Request) -> Response:
        sess = session(request)
        if sess is None:
            return RedirectResponse("/login", 303)
        flash, sess["flash"] = sess["flash"], ""
        return _render("catalog.html", csrf=sess["csrf"], flash=flash, **state(sess))

    @app.get("/ui/state", include_in_schema=False)
    async def ui_state(request: Request, since: int = -1) -> Response:
        sess = session(request)
        if sess is None:
            return JSONResponse({"error": {"code": "unauthenticated",
                                           "message": "log in again"}}, 401)
        if since == srv.version:
            await srv.wait_change(since, 20.0)
        return JSONResponse(state(sess), headers={"Cache-Control": "no-store"})

    @app.post("/ui/tunnels", include_in_schema=False)
    async def ui_open(request: Request) -> Response:
        sess = session(request)
        if sess is None:
            return RedirectResponse("/login", 303)
        form = await _form(request)
        check_csrf(sess, form)
        who = Who(user=sess["user"], role=sess["role"])
        try:
            t = await srv.begin_tunnel(who, form.get("service", "")[:64],
                                       form.get("gateway", "")[:64],
                                       form.get("listen", "") or "127.0.0.1:0")
            sess["flash"] = f"tunnel {t.id} to {t.service}: setting up"
        except ApiError as exc:
            sess["flash"] = f"refused: {exc.message}"
        return RedirectResponse("/", 303)

    @app.post("/ui/tunnels/{tid}/close", include_in_schema=False)
    async def ui_close(tid: str, request: Request) -> Response:
        sess = session(request)
        if sess is None:
            return RedirectResponse("/login", 303)
        check_csrf(sess, await _form(request))
        who = Who(user=sess["user"], role=sess["role"])
        with contextlib.suppress(ApiError):
            await srv.close_anywhere(who, tid, wait=False)
        sess["flash"] = f"tunnel {tid[:32]}: closing"
        return RedirectResponse("/", 303)
