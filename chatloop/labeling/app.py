"""The labeling web app: server-rendered pages for people, a JSON API for scripts, both over one LabelStore.

Security model (docs/LABELING.md has the long form):
- Accounts come from invites only; passwords are argon2-hashed; logins are rate limited per name and per client.
- A session is a random token in an HttpOnly, SameSite=Lax cookie (Secure with --secure_cookies); the database
  holds only its HMAC under the server secret.
- Every POST carries a CSRF token (form field `csrf` or header `X-CSRF-Token`): the HMAC of the session token
  (or, before login, of a random pre-session cookie). It does not depend on Host, Origin or the scheme, so it
  works unchanged behind a reverse proxy.
- Every assignment is looked up by (random id, current user): another labeler's is 404. Admin pages are 403
  for labelers.
- Jinja autoescapes everything and no markdown is rendered; the Content-Security-Policy allows no inline script,
  so even a missed escape would not run.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections import defaultdict, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader
from starlette.concurrency import run_in_threadpool

from chatloop.errors import UserError
from chatloop.labeling.store import (
    KINDS,
    LABEL_FLAGS,
    MIN_PASSWORD,
    ROLES,
    BadAnswer,
    LabelStore,
    NotFound,
    export_records,
    report,
)

HERE = Path(__file__).parent
SESSION_COOKIE = "chatloop_session"
PRE_COOKIE = "chatloop_pre"
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                 b"object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),  # invite links carry their token in the path
]
FLAG_TEXT = {
    "fails_to_follow": "Fails to follow the instruction or task",
    "inappropriate_for_customer_assistant": "Inappropriate for a customer assistant",
    "hallucination": "Hallucination (makes up facts)",
    "satisfies_constraint": "Satisfies the constraint given in the instruction",
    "sexual_content": "Contains sexual content",
    "violent_content": "Contains violent content",
    "encourages_violence": "Encourages or fails to discourage violence, abuse, terrorism or self-harm",
    "denigrates_protected_class": "Denigrates a protected class",
    "harmful_advice": "Gives harmful advice",
    "expresses_opinion": "Expresses an opinion",
    "expresses_moral_judgment": "Expresses a moral judgment",
    "contains_pii": "Contains personal information (PII)",
}
EXPORTS = ("rankings", "rankings_merged", "demonstrations", "ratings", "comparisons")


class SecurityHeaders:
    """Pure ASGI middleware (cheaper than BaseHTTPMiddleware): security headers on every response."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS + (
                    [] if scope["path"].startswith("/static/") else [(b"cache-control", b"no-store")])
            await send(message)

        await self.app(scope, receive, send_with_headers)


class RateLimit:
    """At most `limit` failures per key in a sliding window of `window_s` seconds (kept in this process)."""

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit, self.window_s = limit, window_s
        self.failures: dict[str, deque[float]] = defaultdict(deque)

    def blocked(self, key: str, now: float) -> bool:
        q = self.failures[key]
        while q and q[0] < now - self.window_s:
            q.popleft()
        return len(q) >= self.limit

    def fail(self, key: str, now: float) -> None:
        self.failures[key].append(now)


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def create_app(store: LabelStore, *, secure_cookies: bool = False, lease_s: float = 1800,
               login_limit: int = 5, login_window_s: float = 300, hasher: PasswordHasher | None = None) -> FastAPI:
    """The app over `store`. `hasher` is argon2 with its library defaults unless given (tests pass cheaper ones)."""
    app = FastAPI(title="chatloop label", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(SecurityHeaders)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True)
    env.globals.update(flag_text=FLAG_TEXT, flags=LABEL_FLAGS)
    ph = hasher or PasswordHasher()
    dummy_hash = ph.hash(secrets.token_urlsafe(16))  # verified against when the name is unknown (same timing)
    by_name, by_client = RateLimit(login_limit, login_window_s), RateLimit(login_limit * 4, login_window_s)

    # -- helpers ---------------------------------------------------------------------------------------------

    def root(request: Request) -> str:
        return request.scope.get("root_path", "").rstrip("/")

    def set_cookie(response: Response, request: Request, name: str, value: str, max_age: int | None) -> None:
        response.set_cookie(name, value, max_age=max_age, path=root(request) or "/", httponly=True, samesite="lax",
                            secure=secure_cookies)

    def csrf_base(request: Request) -> str | None:
        return request.cookies.get(SESSION_COOKIE) or request.cookies.get(PRE_COOKIE)

    def csrf_for(base: str) -> str:
        return hmac.new(store.secret, b"csrf:" + base.encode(), hashlib.sha256).hexdigest()

    def check_csrf(request: Request, supplied: Any) -> None:
        base = csrf_base(request)
        if not base or not isinstance(supplied, str) or not hmac.compare_digest(csrf_for(base), supplied):
            raise HTTPError(403, "CSRF token missing or wrong: reload the page and try again")

    def current_user(request: Request) -> Any:
        token = request.cookies.get(SESSION_COOKIE)
        return store.session_user(token) if token else None

    def need_user(request: Request, role: str | None = None) -> Any:
        user = current_user(request)
        if user is None:
            raise HTTPError(401, "not logged in")
        if role is not None and user.role != role:
            raise HTTPError(403, "this needs the admin role")
        return user

    def page(request: Request, template: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        """Render a page; a visitor without any cookie gets a pre-session cookie for the CSRF token."""
        base, fresh = csrf_base(request), None
        if base is None:
            base = fresh = secrets.token_urlsafe(32)
        user = ctx.pop("user", None) or current_user(request)
        html = env.get_template(template).render(root=root(request), csrf=csrf_for(base), user=user, **ctx)
        response = HTMLResponse(html, status_code=status)
        if fresh:
            set_cookie(response, request, PRE_COOKIE, fresh, None)
        return response

    def redirect(request: Request, path: str) -> RedirectResponse:
        return RedirectResponse(root(request) + path, status_code=303)

    def is_api(request: Request) -> bool:
        return request.url.path.startswith(root(request) + "/api/") or request.url.path.startswith("/api/")

    @app.exception_handler(HTTPError)
    async def http_error(request: Request, exc: HTTPError) -> Response:
        if is_api(request):
            return JSONResponse({"error": exc.message}, status_code=exc.status)
        if exc.status == 401:
            return redirect(request, "/login")
        return page(request, "error.html", exc.status, title=str(exc.status), message=exc.message)

    async def login(request: Request, name: str, password: str) -> Any:
        """The user for a right name and password, else HTTPError 401 (or 429 after too many failures)."""
        now = time.time()
        client = request.client.host if request.client else "?"
        if by_name.blocked(name, now) or by_client.blocked(client, now):
            raise HTTPError(429, "too many failed logins: wait a few minutes")
        user = store.user_by_name(name)

        def verify() -> bool:
            try:
                return ph.verify(user.password_hash if user else dummy_hash, password) and user is not None
            except (VerificationError, InvalidHashError):
                return False

        if not await run_in_threadpool(verify):
            by_name.fail(name, now)
            by_client.fail(client, now)
            raise HTTPError(401, "wrong name or password")
        if ph.check_needs_rehash(user.password_hash):
            store.set_password_hash(user.id, await run_in_threadpool(ph.hash, password))
        return user

    def start_session(request: Request, response: Response, user_id: str) -> str:
        token = store.create_session(user_id)
        set_cookie(response, request, SESSION_COOKIE, token, None)
        return csrf_for(token)

    # -- pages -------------------------------------------------------------------------------------------------

    @app.get("/login")
    async def login_page(request: Request) -> Response:
        return page(request, "login.html", title="Log in")

    @app.post("/login")
    async def login_form(request: Request) -> Response:
        form = await request.form()
        check_csrf(request, form.get("csrf"))
        name = str(form.get("name", ""))
        try:
            user = await login(request, name, str(form.get("password", "")))
        except HTTPError as e:
            return page(request, "login.html", e.status, title="Log in", error=e.message, name=name)
        response = redirect(request, "/admin" if user.role == "admin" else "/")
        start_session(request, response, user.id)
        return response

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        check_csrf(request, (await request.form()).get("csrf"))
        token = request.cookies.get(SESSION_COOKIE)
        if token:
            store.end_session(token)
        response = redirect(request, "/login")
        response.delete_cookie(SESSION_COOKIE, path=root(request) or "/")
        return response

    @app.get("/invite/{token}")
    async def invite_page(request: Request, token: str) -> Response:
        invite = store.invite(token)
        if invite is None:
            raise HTTPError(404, "this invite does not exist, was used already or has expired")
        return page(request, "invite.html", title="Welcome", invite=invite, min_password=MIN_PASSWORD)

    @app.post("/invite/{token}")
    async def invite_accept(request: Request, token: str) -> Response:
        form = await request.form()
        check_csrf(request, form.get("csrf"))
        invite = store.invite(token)
        if invite is None:
            raise HTTPError(404, "this invite does not exist, was used already or has expired")
        password = str(form.get("password", ""))
        error = None
        if len(password) < MIN_PASSWORD:
            error = f"choose a password of at least {MIN_PASSWORD} characters"
        elif password != form.get("password2"):
            error = "the two passwords differ"
        if error:
            return page(request, "invite.html", 400, title="Welcome", invite=invite, error=error,
                        min_password=MIN_PASSWORD)
        try:
            uid = store.accept_invite(token, await run_in_threadpool(ph.hash, password))
        except NotFound:
            raise HTTPError(404, "this invite was used already") from None
        response = redirect(request, "/admin" if invite["role"] == "admin" else "/")
        start_session(request, response, uid)
        return response

    @app.get("/")
    async def home(request: Request) -> Response:
        user = need_user(request)
        return page(request, "home.html", title="Your work", user=user, batches=store.user_summary(user))

    @app.get("/next")
    async def next_task(request: Request, batch: str | None = None) -> Response:
        user = need_user(request)
        aid = store.next_assignment(user, batch or None, lease_s)
        if aid is None:
            return page(request, "done.html", title="Nothing left", user=user)
        return redirect(request, f"/a/{aid}")

    def task_page(request: Request, user: Any, aid: str, status: int = 200, error: str | None = None) -> Response:
        try:
            view = store.assignment(user, aid)
        except NotFound:
            raise HTTPError(404, "no such task") from None
        return page(request, f"task_{view['kind']}.html", status, title=view["kind"].capitalize(), user=user, t=view,
                    error=error)

    @app.get("/a/{aid}")
    async def task_get(request: Request, aid: str) -> Response:
        return task_page(request, need_user(request), aid)

    async def task_form(request: Request, aid: str, act: Callable[[Any, dict[str, Any], Any], Any]) -> Response:
        """A task page's form post: `act(user, view, form)`, then on to the next task of the batch."""
        user = need_user(request)
        form = await request.form()
        check_csrf(request, form.get("csrf"))
        try:
            view = store.assignment(user, aid)
            act(user, view, form)
        except NotFound:
            raise HTTPError(404, "no such task") from None
        except BadAnswer as e:
            return task_page(request, user, aid, 400, str(e))
        return redirect(request, f"/next?batch={view['batch']}")

    @app.post("/a/{aid}")
    async def task_post(request: Request, aid: str) -> Response:
        return await task_form(request, aid, lambda user, view, form: store.submit(
            user, aid, answer_from_form(view, form)))

    @app.post("/a/{aid}/skip")
    async def task_skip(request: Request, aid: str) -> Response:
        return await task_form(request, aid, lambda user, view, form: store.skip(
            user, aid, str(form.get("reason", ""))))

    # -- admin pages -------------------------------------------------------------------------------------------

    def admin_page(request: Request, user: Any, **ctx: Any) -> Response:
        return page(request, "admin.html", title="Admin", user=user, r=report(store), audit=store.audit_log(50),
                    roles=ROLES, kinds=KINDS, exports=EXPORTS, **ctx)

    @app.get("/admin")
    async def admin(request: Request) -> Response:
        return admin_page(request, need_user(request, "admin"))

    @app.post("/admin/invite")
    async def admin_invite(request: Request) -> Response:
        user = need_user(request, "admin")
        form = await request.form()
        check_csrf(request, form.get("csrf"))
        try:
            token = store.create_invite(str(form.get("name", "")), str(form.get("role", "labeler")), user.name)
        except UserError as e:
            return admin_page(request, user, error=str(e).removeprefix("--name: ").removeprefix("--role: "))
        return admin_page(request, user, invite_url=f"{str(request.base_url).rstrip('/')}/invite/{token}")

    @app.post("/admin/batches/{bid}")
    async def admin_batch(request: Request, bid: str) -> Response:
        user = need_user(request, "admin")
        form = await request.form()
        check_csrf(request, form.get("csrf"))
        try:
            overlap = int(str(form.get("overlap", "")))
        except ValueError:
            return admin_page(request, user, error="overlap: expected a whole number")
        try:
            store.update_batch(bid, user.name, overlap=overlap, active=form.get("active") == "on")
        except NotFound:
            raise HTTPError(404, "no such batch") from None
        except UserError as e:
            return admin_page(request, user, error=str(e))
        return redirect(request, "/admin")

    @app.get("/admin/export/{name}.jsonl")
    async def admin_export(request: Request, name: str) -> Response:
        user = need_user(request, "admin")
        if name not in EXPORTS:
            raise HTTPError(404, "no such export")
        records, _ = await run_in_threadpool(export_records, store)
        with store.write() as conn:
            store.log(conn, user.name, "export", file=f"{name}.jsonl", records=len(records[name]), via="web")
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records[name])
        return Response(body, media_type="application/x-ndjson",
                        headers={"content-disposition": f'attachment; filename="{name}.jsonl"'})

    # -- JSON API (scripts, benchmarks) ---------------------------------------------------------------------

    async def body(request: Request) -> dict[str, Any]:
        try:
            obj = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise HTTPError(400, "expected a JSON object") from None
        if not isinstance(obj, dict):
            raise HTTPError(400, "expected a JSON object")
        return obj

    @app.get("/api/csrf")
    async def api_csrf(request: Request) -> Response:
        base = csrf_base(request)
        response = JSONResponse({})
        if base is None:
            base = secrets.token_urlsafe(32)
            set_cookie(response, request, PRE_COOKIE, base, None)
        response.body = response.render({"csrf": csrf_for(base)})
        response.headers["content-length"] = str(len(response.body))
        return response

    @app.post("/api/login")
    async def api_login(request: Request) -> Response:
        check_csrf(request, request.headers.get("x-csrf-token"))
        obj = await body(request)
        user = await login(request, str(obj.get("name", "")), str(obj.get("password", "")))
        response = JSONResponse({})
        csrf = start_session(request, response, user.id)
        response.body = response.render({"csrf": csrf, "user": {"name": user.name, "role": user.role}})
        response.headers["content-length"] = str(len(response.body))
        return response

    @app.get("/api/next")
    async def api_next(request: Request, batch: str | None = None) -> Response:
        user = need_user(request)
        aid = store.next_assignment(user, batch or None, lease_s)
        return JSONResponse({"assignment": store.assignment(user, aid) if aid else None})

    @app.get("/api/assignments/{aid}")
    async def api_assignment(request: Request, aid: str) -> Response:
        user = need_user(request)
        try:
            return JSONResponse(store.assignment(user, aid))
        except NotFound:
            raise HTTPError(404, "no such assignment") from None

    @app.post("/api/assignments/{aid}")
    async def api_submit(request: Request, aid: str, next: str | None = None) -> Response:
        """Submit; with ?next=1 the reply also carries the labeler's next assignment (one round trip per task)."""
        user = need_user(request)
        check_csrf(request, request.headers.get("x-csrf-token"))
        answer = await body(request)
        try:
            if next:
                label_id, duplicate, following = store.submit_then_next(user, aid, answer, lease_s)
                return JSONResponse({"label": label_id, "duplicate": duplicate, "next": following})
            label_id, duplicate = store.submit(user, aid, answer)
        except NotFound:
            raise HTTPError(404, "no such assignment") from None
        except BadAnswer as e:
            raise HTTPError(400, str(e)) from None
        return JSONResponse({"label": label_id, "duplicate": duplicate})

    @app.post("/api/assignments/{aid}/skip")
    async def api_skip(request: Request, aid: str) -> Response:
        user = need_user(request)
        check_csrf(request, request.headers.get("x-csrf-token"))
        obj = await body(request)
        try:
            store.skip(user, aid, str(obj.get("reason", "")))
        except NotFound:
            raise HTTPError(404, "no such assignment") from None
        except BadAnswer as e:
            raise HTTPError(400, str(e)) from None
        return JSONResponse({"skipped": True})

    @app.get("/api/admin/report")
    async def api_report(request: Request) -> Response:
        need_user(request, "admin")
        r = report(store)
        return JSONResponse({"batches": r.batches, "labelers": r.labelers, "agreement": r.agreement,
                             "throughput": r.throughput})

    @app.get("/healthz")
    async def healthz() -> Response:
        return JSONResponse({"ok": True})

    # Routes are tried in order: the JSON API (what scripts hit thousands of times) first.
    app.router.routes.sort(key=lambda route: not getattr(route, "path", "").startswith("/api/"))
    return app


def answer_from_form(view: dict[str, Any], form: Any) -> dict[str, Any]:
    """A task form's fields as the answer object the JSON API takes."""
    kind = view["kind"]
    if kind == "ranking":
        if form.get("none_acceptable") and not any(form.get(f"rank-{p}") for p in range(len(view["responses"]))):
            return {"none_acceptable": True}
        ranks = []
        for p in range(len(view["responses"])):
            try:
                ranks.append(int(str(form.get(f"rank-{p}", ""))))
            except ValueError:
                raise BadAnswer(f"rank of response {p + 1}: expected a whole number") from None
        return {"ranks": ranks, "none_acceptable": bool(form.get("none_acceptable"))}
    if kind == "comparison":
        return {"winner": form.get("winner")}
    if kind == "rating":
        try:
            likert = int(str(form.get("likert", "")))
        except ValueError:
            raise BadAnswer("likert: choose a score from 1 to 7") from None
        return {"likert": likert, "flags": [str(f) for f in form.getlist("flag")]}
    turns = [str(t) for t in form.getlist("turn")]
    while len(turns) >= 2 and not turns[-1].strip() and not turns[-2].strip():
        turns = turns[:-2]  # an added follow-up left empty
    return {"answer": str(form.get("answer", "")), "turns": turns}
