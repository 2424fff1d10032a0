"""The labeling web app: server-rendered pages for people, a JSON API for scripts, both over one LabelStore. This
module keeps the routes; what they share (sessions, CSRF tokens, the login throttle) is chatloop.labeling.site.

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

A write the disk refuses (full, a quota, an I/O error) is a 507 saying that nothing was stored, never an
acknowledgement: each request's writes are one transaction, rolled back. Reads go on; once there is room the same
submission is stored (a repeat of a stored one returns its label).
"""

from __future__ import annotations

import json
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader
from sqlalchemy.exc import OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatloop.data.prompts import refused_write
from chatloop.errors import UserError
from chatloop.labeling.answers import BadAnswer
from chatloop.labeling.reports import export_records, report
from chatloop.labeling.schema import KINDS, LABEL_FLAGS, ROLES
from chatloop.labeling.site import MAX_PASSWORD, PRE_COOKIE, SESSION_COOKIE, HTTPError, LoginThrottle, Site
from chatloop.labeling.store import MAX_OVERLAP, MIN_PASSWORD, Conflict, LabelStore, NotFound
from chatloop.serve.guard import Guard, Limits

HERE = Path(__file__).parent
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
NOT_STORED = ("not stored: the server's disk is full (or failing), so nothing of this request was saved; send it again "
              "in a few minutes (a submission sent twice is stored once)")
EXPORTS = ("rankings", "rankings_merged", "demonstrations", "ratings", "comparisons")


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

    @app.exception_handler(OperationalError)
    async def store_error(request: Request, exc: OperationalError) -> Response:
        """A write the disk refused (a full disk, a quota, an I/O error): 507, never an acknowledgement. Every write
        is one transaction, which SQLite rolled back, so nothing of the request is stored; reads go on."""
        if not refused_write(exc):
            raise exc  # the guard logs it and answers a generic 500
        print(f"chatloop label: {request.method} {app_path(request.scope)} refused with 507: cannot write to "
              f"{store.db}: {exc.orig} (nothing of it was stored); make room there", file=sys.stderr, flush=True)
        if site.is_api(request):
            return JSONResponse({"error": NOT_STORED, "stored": False}, status_code=507, headers={"retry-after": "60"})
        return page(request, "error.html", 507, title="Not saved", message=NOT_STORED)

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
