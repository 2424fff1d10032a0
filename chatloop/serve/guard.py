"""The request-validation layer both servers put in front of every handler (the labeling app, `chatloop serve`).

A pure ASGI middleware, so nothing behind it (a handler, the tokenizer, the store) sees a request it has not
checked:

- the body is read up to `max_body_bytes` and no further: a declared Content-Length above it is refused before
  a byte is read, and a streamed (chunked) body is cut off at the limit (413, connection closed), so a 200 MB
  body costs the server at most the limit;
- a JSON body must be UTF-8 and JSON, nested at most `max_depth` deep, no list or object longer than
  `max_items`, every integer within +-`max_int` (a 5,000-digit number is a 400, not an overflow in SQLite or
  Python's digit limit), every number finite, and every string valid Unicode (no lone surrogates such as
  "\\ud800", which JSON can spell but UTF-8 cannot: they would fail wherever the text is encoded later);
- a form body must be url-encoded UTF-8 (what every form of the app sends; 415 otherwise);
- errors are answered in the server's own format (`error_body`), with the security headers, never with the
  text of an internal exception; an exception that escapes a handler is logged and answered with a generic
  500 in the same format (and the same headers).

The parsed JSON body is left in `scope["chatloop.json"]` so that a handler does not parse it again.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

log = logging.getLogger("chatloop.serve")

# One policy for both servers' pages: scripts and styles from the server's own origin only (no inline script),
# never framed, no referrer (invite links carry their token in the path).
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                 b"object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]
_SURROGATE = re.compile("[\ud800-\udfff]")

ErrorBody = Callable[[dict, int, str, "str | None", "str | None"], tuple[bytes, bytes]]
"""(scope, status, message, param, code) -> (body, content type): an error in the server's own format."""


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1_000_000
    """Largest request body read (413 beyond)."""
    max_depth: int = 32
    """Deepest nesting of lists and objects in a JSON body."""
    max_items: int = 10_000
    """Longest list or object in a JSON body."""
    max_form_fields: int = 1000
    """Most fields in a form (Starlette's form parser takes 1000)."""
    max_int: int = 2**63 - 1
    """Largest integer (in absolute value) in a JSON body: what SQLite and the JSON of other languages hold."""


class BadRequest(Exception):
    """A request the guard refuses: status, message and the offending field (dotted path) if there is one."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _reject_constant(name: str) -> Any:
    raise BadRequest(400, f"expected a finite number, got {name}")


def _where(path: list[str | int]) -> str:
    return ".".join(str(p) for p in path)


def check_value(obj: Any, limits: Limits) -> None:
    """Walk a parsed JSON value (iteratively: a deep value cannot exhaust the stack) and check it (BadRequest)."""
    stack: list[tuple[Any, list[str | int]]] = [(obj, [])]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if not value.isascii() and _SURROGATE.search(value):
                raise BadRequest(400, f"{_where(path) or 'body'}: not valid Unicode (a lone surrogate such as "
                                 "\\ud800)", _where(path) or None)
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, int):
            if abs(value) > limits.max_int:
                raise BadRequest(400, f"{_where(path) or 'body'}: integer out of range (at most "
                                 f"{limits.max_int} in absolute value)", _where(path) or None)
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise BadRequest(400, f"{_where(path) or 'body'}: expected a finite number", _where(path) or None)
        elif isinstance(value, (list, dict)):
            if len(path) >= limits.max_depth:
                raise BadRequest(400, f"{_where(path)}: nested deeper than {limits.max_depth} levels",
                                 _where(path))
            if len(value) > limits.max_items:
                raise BadRequest(400, f"{_where(path) or 'body'}: more than {limits.max_items} items",
                                 _where(path) or None)
            if isinstance(value, dict):
                for key, item in value.items():
                    if not key.isascii() and _SURROGATE.search(key):
                        raise BadRequest(400, f"{_where(path) or 'body'}: a key is not valid Unicode",
                                         _where(path) or None)
                    stack.append((item, [*path, key]))
            else:
                stack.extend((item, [*path, i]) for i, item in enumerate(value))


def parse_json(body: bytes, limits: Limits) -> Any:
    """The checked JSON value of a body (BadRequest with a message fit for the client otherwise)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(400, "the body is not valid UTF-8") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise BadRequest(400, f"the JSON body is nested deeper than {limits.max_depth} levels") from None
    except json.JSONDecodeError as e:
        raise BadRequest(400, f"the body is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except ValueError:  # Python's limit on the digits of an integer (sys.get_int_max_str_digits)
        raise BadRequest(400, f"a number in the body is out of range (integers: at most {limits.max_int} in "
                         "absolute value)") from None
    check_value(obj, limits)
    return obj


def check_form(body: bytes, limits: Limits) -> None:
    """An url-encoded form: UTF-8 after percent-decoding, every field name and value (BadRequest otherwise)."""
    try:
        text = body.decode("ascii")  # browsers percent-encode everything else
    except UnicodeDecodeError:
        raise BadRequest(400, "the form is not url-encoded (raw bytes above 0x7f)") from None
    fields = [f for f in re.split("[&;]", text) if f] if text else []
    if len(fields) > limits.max_form_fields:
        raise BadRequest(400, f"the form has more than {limits.max_form_fields} fields")
    for field in fields:
        name, _, value = field.partition("=")
        try:
            name = unquote_plus(name, errors="strict")
        except UnicodeDecodeError:
            raise BadRequest(400, "a field name is not valid UTF-8") from None
        try:
            unquote_plus(value, errors="strict")
        except UnicodeDecodeError:
            shown = name if name.isprintable() and len(name) <= 64 else "a field"
            raise BadRequest(400, f"{shown}: not valid UTF-8", shown) from None


class Guard:
    """Pure ASGI middleware: the checks of the module docstring, then the app; security headers on everything.

    `body_kind(scope)` says what a request's body must be: "json", "form" or None (not checked beyond the
    size limit). `extra_headers(scope)` adds per-path headers (e.g. no-store on pages).
    """

    def __init__(self, app: Any, *, limits: Limits, error_body: ErrorBody,
                 body_kind: Callable[[dict], str | None],
                 extra_headers: Callable[[dict], list[tuple[bytes, bytes]]] = lambda scope: []) -> None:
        self.app, self.limits, self.error_body, self.body_kind = app, limits, error_body, body_kind
        self.extra_headers = extra_headers

    async def error(self, scope: dict, send: Any, e: BadRequest, close: bool = False) -> None:
        body, content_type = self.error_body(scope, e.status, e.message, e.param, e.code)
        headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                   *SECURITY_HEADERS, *self.extra_headers(scope)]
        if close:  # the rest of the body is not read: the connection cannot carry another request
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": e.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def read_body(self, scope: dict, receive: Any) -> tuple[bytes, list[dict]]:
        """The whole body (at most the limit: BadRequest 413 beyond) and any message read after it."""
        limit = self.limits.max_body_bytes
        too_big = BadRequest(413, f"request body too large: at most {limit} bytes", code="request_too_large")
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                if not value.isdigit():
                    raise BadRequest(400, "Content-Length: expected a number of bytes")
                if len(value) > 18 or int(value) > limit:
                    raise too_big
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return b"".join(chunks), [message]
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), []

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False
        extra = SECURITY_HEADERS + self.extra_headers(scope)

        async def send_with_headers(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = list(message.get("headers", [])) + extra
            await send(message)

        kind = self.body_kind(scope) if scope["method"] in ("POST", "PUT", "PATCH") else None
        if kind is not None:
            try:
                body, after = await self.read_body(scope, receive)
            except BadRequest as e:
                return await self.error(scope, send, e, close=e.status == 413)
            try:
                if kind == "json" and body:  # no body: the handler says what it expected
                    scope["chatloop.json"] = parse_json(body, self.limits)
                elif kind == "form" and body:  # an empty body is an empty form whatever its type
                    content_type = dict(scope.get("headers", [])).get(b"content-type", b"")
                    if content_type.split(b";")[0].strip().lower() != b"application/x-www-form-urlencoded":
                        raise BadRequest(415, "expected a form (application/x-www-form-urlencoded)")
                    check_form(body, self.limits)
            except BadRequest as e:
                return await self.error(scope, send, e)
            replay = [{"type": "http.request", "body": body, "more_body": False}, *after]

            async def receive_again() -> dict:
                return replay.pop(0) if replay else await receive()

            inner_receive = receive_again
        else:
            inner_receive = receive
        try:
            await self.app(scope, inner_receive, send_with_headers)
        except Exception:  # a bug, not the client's mistake: logged in full, answered without its text
            log.exception("internal error on %s %s", scope["method"], scope["path"])
            if not started:
                await self.error(scope, send, BadRequest(500, "internal error (logged on the server)"))
