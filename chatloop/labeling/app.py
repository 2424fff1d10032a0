"""The labeling web app: server-rendered pages for people, a JSON API for scripts, both over one LabelStore.

Security model (docs/LABELING.md has the long form):
- Every request passes chatloop.serve.guard first (body size, JSON depth, integer range, valid Unicode, form
  encoding): a client's mistake is a 4xx in the app's format (JSON under /api/, a page otherwise), never a 500.
- Accounts come from invites only; passwords are argon2-hashed, at most `max_hashes` at a time (off the event
  loop); logins are rate limited per (name, client), per client and per name, the failure being counted before
  the hash is checked, so concurrent guesses cannot overtake the limit.
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

import asyncio
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
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatloop.errors import UserError
from chatloop.labeling.answers import BadAnswer
from chatloop.labeling.reports import export_records, report
from chatloop.labeling.schema import KINDS, LABEL_FLAGS, ROLES
from chatloop.labeling.store import MAX_OVERLAP, MIN_PASSWORD, Conflict, LabelStore, NotFound
from chatloop.serve.guard import Guard, Limits

HERE = Path(__file__).parent
SESSION_COOKIE = "chatloop_session"
PRE_COOKIE = "chatloop_pre"
MAX_NAME, MAX_PASSWORD = 64, 1024  # longer can never log in: refused before any hash is computed
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

    def take(self, key: str, now: float) -> None:
        self.failures[key].append(now)

    def give_back(self, key: str, at: float) -> None:
        q = self.failures.get(key)
        if q is not None and at in q:
            q.remove(at)

    def sweep(self, now: float) -> None:
        """Forget keys without a failure in the window (random names must not grow memory)."""
        for key in [k for k, q in self.failures.items() if not q or q[-1] < now - self.window_s]:
            del self.failures[key]


class LoginThrottle:
    """Failed-login limits that hold under concurrency, and a bound on concurrent password hashes.

    A login attempt first *reserves* a failure under three keys, atomically (no await between the check and
    the reservation, and the event loop runs one coroutine at a time): (name, client) up to `limit`, the
    client up to 4x `limit` (one client trying many names), the name up to 20x `limit` over all clients (a
    bound on guessing from many addresses). Only then is the hash checked; a right password gives the
    reservation back. So 40 concurrent guesses for one name from one client get at most `limit` 401s, and the
    real user, from another address, is not locked out by them. Hashes run in threads, at most `max_hashes`
    at once (argon2 takes 64 MiB each); a login that waits longer than `wait_s` for one gets 429.
    """

    def __init__(self, limit: int, window_s: float, max_hashes: int, wait_s: float) -> None:
        self.pair, self.client = RateLimit(limit, window_s), RateLimit(limit * 4, window_s)
        self.name = RateLimit(limit * 20, window_s)
        self.max_hashes, self.wait_s = max_hashes, wait_s
        self._hashes: asyncio.Semaphore | None = None  # made in the server's event loop
        self._reservations = 0

    def reserve(self, name: str, client: str, now: float) -> list[tuple[RateLimit, str, float]]:
        keys = [(self.pair, f"{client} {name}"), (self.client, client), (self.name, name)]
        if any(limit.blocked(key, now) for limit, key in keys):
            raise HTTPError(429, "too many failed logins: wait a few minutes")
        for limit, key in keys:
            limit.take(key, now)
        self._reservations += 1
        if self._reservations % 1000 == 0:
            for limit, _ in keys:
                limit.sweep(now)
        return [(limit, key, now) for limit, key in keys]

    @staticmethod
    def release(reservation: list[tuple[RateLimit, str, float]]) -> None:
        for limit, key, at in reservation:
            limit.give_back(key, at)

    async def hash_work(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) in a worker thread, at most max_hashes at once; HTTPError 429 after waiting wait_s."""
        if self._hashes is None:
            self._hashes = asyncio.Semaphore(self.max_hashes)
        try:
            await asyncio.wait_for(self._hashes.acquire(), self.wait_s)
        except asyncio.TimeoutError:
            raise HTTPError(429, "the server is busy checking passwords: try again in a moment") from None
        try:  # the thread finishes even if the request is cancelled (anyio shields it), then the slot is freed
            return await run_in_threadpool(fn, *args)
        finally:
            self._hashes.release()


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class Site:
    """What every page group shares: the store, the templates, password hashing and the login throttle, sessions
    and CSRF tokens, page rendering."""

    def __init__(self, store: LabelStore, env: Environment, ph: PasswordHasher, throttle: LoginThrottle,
                 secure_cookies: bool) -> None:
        self.store, self.env, self.ph, self.throttle, self.secure_cookies = store, env, ph, throttle, secure_cookies
        self.dummy_hash = ph.hash(secrets.token_urlsafe(16))  # verified against for unknown names (same timing)

    def root(self, request: Request) -> str:
        return request.scope.get("root_path", "").rstrip("/")

    def set_cookie(self, response: Response, request: Request, name: str, value: str, max_age: int | None) -> None:
        response.set_cookie(name, value, max_age=max_age, path=self.root(request) or "/", httponly=True, samesite="lax",
                            secure=self.secure_cookies)

    def csrf_base(self, request: Request) -> str | None:
        return request.cookies.get(SESSION_COOKIE) or request.cookies.get(PRE_COOKIE)

    def csrf_for(self, base: str) -> str:
        return hmac.new(self.store.secret, b"csrf:" + base.encode(), hashlib.sha256).hexdigest()

    def check_csrf(self, request: Request, supplied: Any) -> None:
        base = self.csrf_base(request)
        if not base or not isinstance(supplied, str) or not hmac.compare_digest(  # bytes: any text compares
                self.csrf_for(base).encode(), supplied.encode("utf-8", "surrogatepass")):
            raise HTTPError(403, "CSRF token missing or wrong: reload the page and try again")

    def current_user(self, request: Request) -> Any:
        token = request.cookies.get(SESSION_COOKIE)
        return self.store.session_user(token) if token else None

    def need_user(self, request: Request, role: str | None = None) -> Any:
        user = self.current_user(request)
        if user is None:
            raise HTTPError(401, "not logged in")
        if role is not None and user.role != role:
            raise HTTPError(403, "this needs the admin role")
        return user

    def page(self, request: Request, template: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        """Render a page; a visitor without any cookie gets a pre-session cookie for the CSRF token."""
        base, fresh = self.csrf_base(request), None
        if base is None:
            base = fresh = secrets.token_urlsafe(32)
        user = ctx.pop("user", None) or self.current_user(request)
        html = self.env.get_template(template).render(root=self.root(request), csrf=self.csrf_for(base), user=user,
                                                      **ctx)
        response = HTMLResponse(html, status_code=status)
        if fresh:
            self.set_cookie(response, request, PRE_COOKIE, fresh, None)
        return response

    def redirect(self, request: Request, path: str) -> RedirectResponse:
        return RedirectResponse(self.root(request) + path, status_code=303)

    def is_api(self, request: Request) -> bool:
        return request.url.path.startswith(self.root(request) + "/api/") or request.url.path.startswith("/api/")

    async def login(self, request: Request, name: Any, password: Any) -> Any:
        """The user for a right name and password, else HTTPError 401 (or 429 after too many failures)."""
        if not isinstance(name, str) or not isinstance(password, str):
            raise HTTPError(400, "name, password: expected strings")
        client = request.client.host if request.client else "?"
        reservation = self.throttle.reserve(name[:MAX_NAME + 1], client, time.time())  # before any hash: atomic
        if len(name) > MAX_NAME or len(password) > MAX_PASSWORD:
            raise HTTPError(401, "wrong name or password")  # no such account can exist: no hash needed
        user = self.store.user_by_name(name)

        def verify() -> bool:
            try:
                return self.ph.verify(user.password_hash if user else self.dummy_hash, password) and user is not None
            except (VerificationError, InvalidHashError):
                return False

        try:
            right = await self.throttle.hash_work(verify)
        except HTTPError:
            self.throttle.release(reservation)  # busy: no guess was checked
            raise
        if not right:
            raise HTTPError(401, "wrong name or password")  # the reserved failure stays
        self.throttle.release(reservation)
        if self.ph.check_needs_rehash(user.password_hash):
            self.store.set_password_hash(user.id, await self.throttle.hash_work(self.ph.hash, password))
        return user

    def start_session(self, request: Request, response: Response, user_id: str) -> str:
        token = self.store.create_session(user_id)
        self.set_cookie(response, request, SESSION_COOKIE, token, None)
        return self.csrf_for(token)


def create_app(store: LabelStore, *, secure_cookies: bool = False, lease_s: float = 1800,
               login_limit: int = 5, login_window_s: float = 300, hasher: PasswordHasher | None = None,
               public_url: str = "", max_body_bytes: int = 1_000_000, max_hashes: int = 2,
               hash_wait_s: float = 5.0) -> FastAPI:
    """The app over `store`. `hasher` is argon2 with its library defaults unless given (tests pass cheaper ones).
    `public_url` is where people reach the app (invite links start with it; relative links when empty)."""
    app = FastAPI(title="chatloop label", docs_url=None, redoc_url=None, openapi_url=None)
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True)
    env.globals.update(flag_text=FLAG_TEXT, flags=LABEL_FLAGS)

    def app_path(scope: dict) -> str:
        path, prefix = scope["path"], scope.get("root_path", "").rstrip("/")
        return path[len(prefix):] if prefix and path.startswith(prefix + "/") else path

    def guard_error(scope: dict, status: int, message: str, param: str | None, code: str | None
                    ) -> tuple[bytes, bytes]:
        if app_path(scope).startswith("/api/"):
            return json.dumps({"error": message}).encode(), b"application/json"
        html = env.get_template("error.html").render(root=scope.get("root_path", "").rstrip("/"), csrf="",
                                                     user=None, title=str(status), message=message)
        return html.encode(), b"text/html; charset=utf-8"

    app.add_middleware(
        Guard, limits=Limits(max_body_bytes=max_body_bytes), error_body=guard_error,
        body_kind=lambda scope: "json" if app_path(scope).startswith("/api/") else "form",
        extra_headers=lambda scope: [] if app_path(scope).startswith("/static/") else [(b"cache-control",
                                                                                          b"no-store")])
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    throttle = LoginThrottle(login_limit, login_window_s, max_hashes, hash_wait_s)
    site = Site(store, env, hasher or PasswordHasher(), throttle, secure_cookies)
    page, redirect = site.page, site.redirect

    @app.exception_handler(StarletteHTTPException)
    async def starlette_error(request: Request, exc: StarletteHTTPException) -> Response:
        """Starlette's own refusals (no such route, wrong method) in the app's format."""
        return await http_error(request, HTTPError(exc.status_code, str(exc.detail)))

    @app.exception_handler(HTTPError)
    async def http_error(request: Request, exc: HTTPError) -> Response:
        if site.is_api(request):
            return JSONResponse({"error": exc.message}, status_code=exc.status)
        if exc.status == 401:
            return redirect(request, "/login")
        return page(request, "error.html", exc.status, title=str(exc.status), message=exc.message)

    account_pages(app, site)
    task_pages(app, site, lease_s)
    admin_pages(app, site, public_url)
    json_api(app, site, lease_s)
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


def account_pages(app: FastAPI, site: Site) -> None:
    """Log in and out; accept an invite (choose a password)."""
    store, throttle, ph = site.store, site.throttle, site.ph
    page, redirect, root, check_csrf = site.page, site.redirect, site.root, site.check_csrf
    login, start_session = site.login, site.start_session

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
        if len(password) > MAX_PASSWORD:
            return page(request, "invite.html", 400, title="Welcome", invite=invite, min_password=MIN_PASSWORD,
                        error=f"choose a password of at most {MAX_PASSWORD} characters")
        try:
            uid = store.accept_invite(token, await throttle.hash_work(ph.hash, password))
        except NotFound:
            raise HTTPError(404, "this invite was used already") from None
        response = redirect(request, "/admin" if invite["role"] == "admin" else "/")
        start_session(request, response, uid)
        return response


def task_pages(app: FastAPI, site: Site, lease_s: float) -> None:
    """A labeler's pages: the batches, the next task, a task's form (submit or skip)."""
    store, page, redirect = site.store, site.page, site.redirect
    check_csrf, need_user = site.check_csrf, site.need_user

    @app.get("/")
    async def home(request: Request) -> Response:
        user = need_user(request)
        state, summary = store.user_summary(user)
        return page(request, "home.html", title="Your work", user=user, batches=summary, state=state)

    @app.get("/next")
    async def next_task(request: Request, batch: str | None = None) -> Response:
        user = need_user(request)
        aid = store.next_assignment(user, batch or None, lease_s)
        if aid is None:
            return page(request, "done.html", title="Nothing left", user=user, state=store.qualification(user))
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
        except Conflict as e:
            return task_page(request, user, aid, 409, str(e))
        return redirect(request, f"/next?batch={view['batch']}")

    @app.post("/a/{aid}")
    async def task_post(request: Request, aid: str) -> Response:
        return await task_form(request, aid, lambda user, view, form: store.submit(
            user, aid, answer_from_form(view, form)))

    @app.post("/a/{aid}/skip")
    async def task_skip(request: Request, aid: str) -> Response:
        return await task_form(request, aid, lambda user, view, form: store.skip(
            user, aid, str(form.get("reason", ""))))


def admin_pages(app: FastAPI, site: Site, public_url: str) -> None:
    """The admin page: invites, batches (overlap, active), screening reviews, exports."""
    store, page, redirect = site.store, site.page, site.redirect
    check_csrf, need_user = site.check_csrf, site.need_user
    root = site.root

    def admin_page(request: Request, user: Any, status: int = 200, **ctx: Any) -> Response:
        return page(request, "admin.html", status, title="Admin", user=user, r=report(store),
                    audit=store.audit_log(50), roles=ROLES, kinds=KINDS, exports=EXPORTS,
                    reviews=store.pending_reviews(), **ctx)

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
            return admin_page(request, user, 400, error=str(e).removeprefix("--name: ").removeprefix("--role: "))
        # Never from the request's Host header (a forged Host would put an attacker's site in the link).
        base = public_url.rstrip("/") if public_url else root(request)
        return admin_page(request, user, invite_url=f"{base}/invite/{token}", invite_relative=not public_url)

    @app.post("/admin/batches/{bid}")
    async def admin_batch(request: Request, bid: str) -> Response:
        user = need_user(request, "admin")
        form = await request.form()
        check_csrf(request, form.get("csrf"))
        text = str(form.get("overlap", "")).strip()
        overlap = int(text) if text.isdigit() and len(text) <= 6 else 0
        if not 1 <= overlap <= MAX_OVERLAP:
            return admin_page(request, user, 400, error=f"overlap: expected a whole number from 1 to {MAX_OVERLAP}")
        try:
            store.update_batch(bid, user.name, overlap=overlap, active=form.get("active") == "on")
        except NotFound:
            raise HTTPError(404, "no such batch") from None
        except UserError as e:
            return admin_page(request, user, 400, error=str(e))
        return redirect(request, "/admin")

    @app.post("/admin/reviews/{label_id}")
    async def admin_review(request: Request, label_id: str) -> Response:
        """An admin's 1-7 score of a candidate's screening demonstration."""
        user = need_user(request, "admin")
        form = await request.form()
        check_csrf(request, form.get("csrf"))
        text = str(form.get("score", "")).strip()
        try:
            store.review(label_id, int(text) if text.isdigit() and len(text) == 1 else 0, user.name)
        except NotFound:
            raise HTTPError(404, "no such demonstration to review") from None
        except BadAnswer as e:
            return admin_page(request, user, 400, error=str(e))
        except Conflict as e:
            return admin_page(request, user, 409, error=str(e))
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


def json_api(app: FastAPI, site: Site, lease_s: float) -> None:
    """The JSON API (scripts, benchmarks): CSRF, login, next task, submit, skip, report."""
    store, need_user, check_csrf = site.store, site.need_user, site.check_csrf
    csrf_base, csrf_for, set_cookie = site.csrf_base, site.csrf_for, site.set_cookie
    login, start_session = site.login, site.start_session

    async def body(request: Request) -> dict[str, Any]:
        obj = request.scope.get("chatloop.json")  # parsed and checked by the guard
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
        user = await login(request, obj.get("name", ""), obj.get("password", ""))
        response = JSONResponse({})
        csrf = start_session(request, response, user.id)
        response.body = response.render({"csrf": csrf, "user": {"name": user.name, "role": user.role}})
        response.headers["content-length"] = str(len(response.body))
        return response

    @app.get("/api/next")
    async def api_next(request: Request, batch: str | None = None) -> Response:
        user = need_user(request)
        aid = store.next_assignment(user, batch or None, lease_s)
        if aid is None:  # why there is nothing: e.g. a screening failed or waiting for review
            return JSONResponse({"assignment": None, "qualification": store.qualification(user)})
        return JSONResponse({"assignment": store.assignment(user, aid)})

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
        reason = obj.get("reason", "")
        if not isinstance(reason, str):
            raise HTTPError(400, "reason: expected text")
        try:
            store.skip(user, aid, reason)
        except NotFound:
            raise HTTPError(404, "no such assignment") from None
        except BadAnswer as e:
            raise HTTPError(400, str(e)) from None
        except Conflict as e:
            raise HTTPError(409, str(e)) from None
        return JSONResponse({"skipped": True})

    @app.get("/api/admin/report")
    async def api_report(request: Request) -> Response:
        need_user(request, "admin")
        return JSONResponse(report(store).as_json())

    @app.get("/healthz")
    async def healthz() -> Response:
        return JSONResponse({"ok": True})
