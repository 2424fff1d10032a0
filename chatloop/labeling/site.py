"""What every page group of the labeling app shares (chatloop.labeling.app has the security model): the Site
(the store, templates, password hashing, sessions and CSRF tokens, page rendering, login), the failed-login limits
and the bound on concurrent password hashes (LoginThrottle), and HTTPError, a refusal with its status."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment
from starlette.concurrency import run_in_threadpool

from chatloop.labeling.store import LabelStore

SESSION_COOKIE = "chatloop_session"
PRE_COOKIE = "chatloop_pre"
MAX_NAME, MAX_PASSWORD = 64, 1024  # longer can never log in: refused before any hash is computed


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
