"""`chatloop serve`: an OpenAI-compatible HTTP API and a chat page in front of the batcher.

    POST /v1/chat/completions   chat, streamed as server-sent events with "stream": true
    POST /v1/completions        plain text continuation, streamed or not
    POST /v1/feedback           the chat page's thumbs up/down and regenerations (chatloop.data.feedback)
    GET  /v1/models             the one model served
    GET  /v1/stats              the batcher's counters (steps, rows per step) and the queue
    GET  /                      the chat page (page.html)

Every /v1 call needs `Authorization: Bearer KEY`; keys map to user ids (ServeConfig.api_keys). Each accepted
request's prompt is logged, before it is answered, as a prompt record (`source: "api"`, the user id, the
time, the model and the sampling settings) to the request log (JSONL) and the prompt store, where
`chatloop prompts curate` picks it up: InstructGPT's flywheel, in which users' prompts become the next
training set. The page's thumbs and regenerations go to the same store as comparisons (`chatloop prompts
feedback` exports them for `chatloop rm`). A key marked `nolog` opts out of both. Errors have OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, with the status OpenAI uses (400 bad request, 401 key,
404 model, 413 body, 429 queue), and 507 when a prompt or a judgement cannot be logged for want of room (PromptLog).

Every request passes chatloop.serve.guard first (body size, JSON depth, integer range, valid Unicode), and no
client can hold the event loop: a prompt whose UTF-8 length cannot fit `max_prompt_tokens` (more bytes than
that many of the longest token) is refused without tokenizing it, and the rest are tokenized in worker threads,
a few at a time.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatloop.data.feedback import check_body
from chatloop.data.formats import validate_prompt_value
from chatloop.data.prompts import DEFAULT_DB, PromptStore
from chatloop.errors import DiskFull, UserError
from chatloop.io import disk_full, no_room
from chatloop.serve.batcher import Batcher, Job, QueueFull, Sampling, TextStream
from chatloop.serve.guard import Guard, Limits
from chatloop.tokenizer import Tokenizer

HERE = Path(__file__).parent
PAGE_FILES = {"/": ("page.html", "text/html; charset=utf-8"), "/page.js": ("page.js", "text/javascript"),
              "/page.css": ("page.css", "text/css")}
NOT_STORED = ("The server's disk is full (or failing): nothing of this request was stored (a prompt is answered only "
              "once it is logged); retry later.")
TOKENIZE_THREADS = 2  # prompts tokenized at once (each in a worker thread); the others wait their turn


@dataclass
class ServeConfig:
    model: str = ""
    """Checkpoint directory to serve (chatloop or transformers format, with tokenizer.json)."""
    model_name: str = ""
    """The model id clients send and /v1/models lists; empty means the checkpoint directory's name."""
    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0 for every interface)."""
    port: int = 8000
    """TCP port to listen on."""
    api_keys: list[str] = field(default_factory=list)
    """API keys as KEY:USER_ID, or KEY:USER_ID:nolog for a key whose prompts are not logged."""
    api_keys_file: str = ""
    """A file of more keys, one KEY:USER_ID[:nolog] per line (# starts a comment). There is no default key."""
    db: str = DEFAULT_DB
    """Prompt store that every logged request goes into (an SQLAlchemy URL or an SQLite file path)."""
    request_log: str = "runs/requests.jsonl"
    """JSONL copy of the logged requests (`chatloop prompts ingest` reads it; empty for none)."""
    max_prompt_tokens: int = 2048
    """Longest prompt accepted, in tokens (the model's context is a bound too)."""
    max_tokens: int = 512
    """Most tokens a request may ask for; also the default (capped by the room left in the context)."""
    min_temperature: float = 0.0
    """Lowest temperature accepted (0 is greedy decoding)."""
    max_temperature: float = 2.0
    """Highest temperature accepted."""
    max_body_bytes: int = 1_000_000
    """Largest request body accepted (413 beyond; a longer streamed body is cut off at this size)."""
    max_messages: int = 256
    """Most messages in one chat request."""
    max_stop: int = 16
    """Most stop strings in one request (OpenAI takes 4), each at most 1000 characters."""
    max_batch: int = 16
    """Requests decoded together: the rows of the batcher's cache."""
    max_queue: int = 64
    """Requests that may wait for a row; more get 429."""
    device: str = "auto"
    """"auto", "cpu" or "cuda"."""
    seed: int = 0
    """Seed of the batcher's sampler."""


# -- errors -----------------------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered in OpenAI's format."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


# -- keys and the prompt log ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    user_id: str
    log: bool


def parse_keys(entries: list[str], where: str) -> dict[str, Key]:
    keys = {}
    for i, entry in enumerate(entries):
        parts = entry.strip().split(":")
        if len(parts) not in (2, 3) or not parts[0] or not parts[1] or (len(parts) == 3 and parts[2] != "nolog"):
            raise UserError(f"{where}[{i}]: expected KEY:USER_ID or KEY:USER_ID:nolog, got {entry!r}")
        keys[parts[0]] = Key(parts[1], log=len(parts) == 2)
    return keys


def load_keys(cfg: ServeConfig) -> dict[str, Key]:
    keys = parse_keys(cfg.api_keys, "--api_keys")
    if cfg.api_keys_file:
        path = Path(cfg.api_keys_file)
        if not path.is_file():
            raise UserError(f"--api_keys_file: no such file: {path}")
        lines = [(n, line.split("#", 1)[0].strip()) for n, line in enumerate(path.read_text().splitlines(), 1)]
        for n, line in lines:
            if line:
                keys.update(parse_keys([line], f"{path}:{n}"))
    if not keys:
        raise UserError("--api_keys / --api_keys_file: give at least one KEY:USER_ID (there is no default key)")
    return keys


class PromptLog:
    """Appends each logged request to the JSONL request log, then to the prompt store (same keys as an
    ingest of that log, so re-ingesting it adds nothing). The log line is written first: if the database
    fails, the prompt is still on disk and a later `chatloop prompts ingest` stores it (the request is served,
    with a line on stderr). A line that finds no room is cut off again, never left half-written, and is DiskFull:
    the request is refused (507) unanswered, as it is when the store fails and there is no request log."""

    def __init__(self, db: str, path: str) -> None:
        self.store = PromptStore(db) if db else None
        self.path = Path(path) if path else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.ingest_id = self.store.start_log(f"chatloop serve ({path or 'no request log'})") if self.store else 0
        self.lock = threading.Lock()
        self.count = 0

    def feedback(self, user_id: str, client_id: str, kind: str, prompt: Any, answers: list[str], verdict: str,
                 model: str) -> tuple[int, bool]:
        """A chat-page judgement into the prompt store (PromptStore.put_feedback)."""
        if self.store is None:
            raise UserError("this server keeps no prompt store (--db is empty): feedback cannot be stored")
        return self.store.put_feedback(user_id, client_id, kind, prompt, answers, verdict, model)

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False)
        with self.lock:
            if self.path:
                self.append(self.path, (line + "\n").encode("utf-8"))
            self.count += 1
            number = self.count
        if self.store:
            try:
                self.store.append_lines(self.ingest_id, [(number, line)])
            except Exception as e:  # noqa: BLE001 - the JSONL line keeps the prompt; serving goes on
                if not self.path:
                    raise
                print(f"chatloop serve: prompt store write failed ({getattr(e, 'orig', e)}); the prompt is in "
                      f"{self.path} (`chatloop prompts ingest` of it stores what is missing)", file=sys.stderr)

    @staticmethod
    def append(path: Path, data: bytes) -> None:
        """Append `data` whole or not at all: a write that fails part way is cut off again (a half line would spoil
        the next one too); one that found no room is DiskFull."""
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            end, view = os.lseek(fd, 0, os.SEEK_END), memoryview(data)
            try:
                while view:
                    view = view[os.write(fd, view):]
            except OSError as e:
                os.ftruncate(fd, end)
                if no_room(e):
                    raise disk_full(path, len(data), e) from None
                raise
        finally:
            os.close(fd)


# -- request bodies ---------------------------------------------------------------------------------------------


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        """Content as text (a list of content parts of type "text" is joined)."""
        if isinstance(self.content, str):
            return self.content
        if any(part.get("type") != "text" for part in self.content):
            raise APIError(400, "only text content parts are supported", param="messages")
        return "".join(str(part.get("text", "")) for part in self.content)


MAX_STOP_CHARS = 1000


class CommonParams(BaseModel):
    model_config = ConfigDict(extra="allow")  # other OpenAI parameters (penalties, seed, ...) are ignored

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    min_tokens: int = Field(0, ge=0)
    """Extension (as in vLLM): no stop token before this many tokens."""
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1
    user: str | None = None

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else self.stop or []


class ChatParams(CommonParams):
    messages: list[Message]
    max_completion_tokens: int | None = None


class CompletionParams(CommonParams):
    prompt: str | list[str]
    max_tokens: int | None = 16  # OpenAI's default for completions


def validation_error(e: ValidationError) -> APIError:
    first = e.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    return APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param)


# -- the app -----------------------------------------------------------------------------------------------------


class Server:
    """What the endpoints share: model, tokenizer, batcher, keys, log, limits."""

    def __init__(self, cfg: ServeConfig, batcher: Batcher, tokenizer: Tokenizer, keys: dict[str, Key],
                 log: PromptLog, name: str) -> None:
        self.cfg, self.batcher, self.tokenizer, self.keys, self.log, self.name = (
            cfg, batcher, tokenizer, keys, log, name)
        self.context = batcher.model.cfg.max_seq_len
        self.created = int(time.time())
        # A token stands for at most this many bytes of text (special tokens included), so a prompt of more
        # than max_prompt_tokens x this many bytes has more tokens than that: no need to tokenize it to know.
        hf = tokenizer.hf
        pieces = hf.decode_batch([[i] for i in range(hf.get_vocab_size())], skip_special_tokens=False)
        self.token_bytes = max([4, *(len(p.encode("utf-8", "surrogatepass")) for p in pieces)])
        self._tokenizing: asyncio.Semaphore | None = None  # made in the server's event loop

    async def tokenize(self, fn: Any, text_bytes: int, param: str) -> list[int]:
        """fn() (the tokenizer) off the event loop, a few at a time; an obviously too long prompt never gets there."""
        limit = min(self.cfg.max_prompt_tokens, self.context - 1)
        if text_bytes > limit * self.token_bytes:
            raise APIError(400, f"The prompt is {text_bytes} bytes long: more than {limit} tokens, the most this "
                           "server takes.", param=param, code="context_length_exceeded")
        if self._tokenizing is None:
            self._tokenizing = asyncio.Semaphore(TOKENIZE_THREADS)
        async with self._tokenizing:
            return await run_in_threadpool(fn)

    def check_stops(self, params: CommonParams) -> list[str]:
        stops = params.stops()
        if len(stops) > self.cfg.max_stop or any(len(s) > MAX_STOP_CHARS for s in stops):
            raise APIError(400, f"stop: expected at most {self.cfg.max_stop} strings of at most {MAX_STOP_CHARS} "
                           "characters", param="stop")
        return stops

    def authorize(self, request: Request) -> Key:
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not token:
            raise APIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.",
                           code="invalid_api_key")
        key = self.keys.get(token)
        if key is None:
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        return key

    @staticmethod
    def body(request: Request) -> dict[str, Any]:
        obj = request.scope.get("chatloop.json")  # read within max_body_bytes, parsed and checked by the guard
        if not isinstance(obj, dict):
            raise APIError(400, "The request body must be a JSON object.")
        return obj

    async def parse(self, request: Request, cls: type[CommonParams]) -> tuple[Key, Any]:
        """The caller's key and the validated body (APIError otherwise)."""
        key = self.authorize(request)
        try:
            return key, cls.model_validate(self.body(request))
        except ValidationError as e:
            raise validation_error(e) from None

    def sampling(self, params: CommonParams, prompt_len: int, max_tokens: int | None, prompt_param: str
                 ) -> Sampling:
        """Check the limits; the request's sampling settings."""
        cfg = self.cfg
        if params.model != self.name:
            raise APIError(404, f"The model '{params.model}' does not exist (this server has '{self.name}').",
                           param="model", code="model_not_found")
        if params.n != 1:
            raise APIError(400, "n: only n=1 is supported", param="n")
        if not cfg.min_temperature <= params.temperature <= cfg.max_temperature:
            raise APIError(400, f"temperature: expected a value from {cfg.min_temperature} to "
                           f"{cfg.max_temperature}, got {params.temperature}", param="temperature")
        if prompt_len > cfg.max_prompt_tokens or prompt_len >= self.context:
            raise APIError(400, f"The prompt has {prompt_len} tokens; this server takes at most "
                           f"{min(cfg.max_prompt_tokens, self.context - 1)}.", param=prompt_param,
                           code="context_length_exceeded")
        room = self.context - prompt_len
        if max_tokens is None:
            max_tokens = min(cfg.max_tokens, room)
        elif not 1 <= max_tokens <= cfg.max_tokens:
            raise APIError(400, f"max_tokens: expected 1 to {cfg.max_tokens}, got {max_tokens}", param="max_tokens")
        elif max_tokens > room:
            raise APIError(400, f"This model's context is {self.context} tokens; the prompt has {prompt_len} and "
                           f"max_tokens asks for {max_tokens}. Reduce the prompt or max_tokens.",
                           param="max_tokens", code="context_length_exceeded")
        return Sampling(max_tokens=max_tokens, temperature=params.temperature, top_p=params.top_p,
                        top_k=params.top_k, min_tokens=min(params.min_tokens, max_tokens))

    async def start(self, key: Key, endpoint: str, prompt: Any, ids: list[int], params: CommonParams,
                    sampling: Sampling) -> tuple[str, Job, asyncio.Queue]:
        """Queue the request in the batcher and log its prompt; (request id, job, its event queue)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(ids, sampling, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        try:
            self.batcher.submit(job)
        except QueueFull as e:
            raise APIError(429, f"The server is busy ({e}); retry later.", type="requests",
                           code="rate_limit_exceeded") from None
        request_id = ("chatcmpl-" if endpoint == "chat.completions" else "cmpl-") + uuid.uuid4().hex
        if key.log:
            record = {
                "id": request_id, "prompt": prompt, "user_id": key.user_id, "source": "api",
                "created_at": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
                "model": self.name, "endpoint": endpoint,
                "sampling": {**asdict(sampling), "top_p": params.top_p, "stop": params.stop, "stream": params.stream},
            }
            if params.user:
                record["end_user"] = params.user
            try:
                await run_in_threadpool(self.log.write, record)
            except Exception:
                job.cancel()
                raise
        return request_id, job, events


async def text_events(server: Server, job: Job, events: asyncio.Queue, stop: list[str]
                      ) -> AsyncIterator[tuple[str, str | None]]:
    """(text piece, finish reason or None) as the batcher delivers tokens; cancels the job if abandoned."""
    stream = TextStream(server.tokenizer, stop)
    finished = False
    try:
        while True:
            token, finish = await events.get()
            if token is not None:
                piece = stream.push(token)
                if stream.stopped:
                    job.cancel()
                    finished = True
                    yield piece, "stop"
                    return
                if piece:
                    yield piece, None
                continue
            finished = True
            if finish.startswith("error"):
                raise RuntimeError(finish)
            yield stream.flush(), finish
            return
    finally:
        if not finished:
            job.cancel()  # the client went away (the page's stop button): free the row


async def whole_text(server: Server, job: Job, events: asyncio.Queue, stop: list[str]) -> tuple[str, str]:
    """The response of a non-streaming request: (text, finish reason)."""
    pieces, finish = [], "stop"
    async for piece, reason in text_events(server, job, events, stop):
        pieces.append(piece)
        finish = reason or finish
    return "".join(pieces), finish


def usage(prompt_tokens: int, job: Job) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": job.generated,
            "total_tokens": prompt_tokens + job.generated}


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def event_stream(chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def guard_error(scope: dict, status: int, message: str, param: str | None, code: str | None) -> tuple[bytes, bytes]:
    """The guard's refusals in OpenAI's format."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return json.dumps(body).encode(), b"application/json"


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="chatloop", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(Guard, limits=Limits(max_body_bytes=server.cfg.max_body_bytes), error_body=guard_error,
                       body_kind=lambda scope: "json" if scope["path"].startswith("/v1/") else None)

    @app.exception_handler(APIError)
    async def api_error(_request: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, e: StarletteHTTPException) -> JSONResponse:
        return APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None).response()

    @app.exception_handler(DiskFull)
    async def no_room_error(request: Request, e: DiskFull) -> JSONResponse:
        """The request log or the prompt store found no room: 507; a prompt is answered only once it is logged, and
        nothing of this request was stored. Reads (models, stats, the page) go on."""
        print(f"chatloop serve: {request.url.path}: refused with 507: {e}", file=sys.stderr, flush=True)
        return APIError(507, NOT_STORED, type="server_error", code="insufficient_storage").response()

    # An exception that escapes a handler is logged and answered by the guard (a generic 500, no exception text).

    def page_file(path: str) -> Any:
        name, media_type = PAGE_FILES[path]
        text = (HERE / name).read_text(encoding="utf-8")

        async def serve_file() -> HTMLResponse:  # the guard adds the CSP (no inline script) and frame rules
            return HTMLResponse(text, media_type=media_type, headers={"cache-control": "no-cache"})

        return serve_file

    for path in PAGE_FILES:
        app.get(path, response_class=HTMLResponse)(page_file(path))

    app.get("/v1/models")(models)
    app.get("/v1/stats")(stats)
    app.post("/v1/chat/completions")(chat_completions)
    app.post("/v1/feedback")(feedback)
    app.post("/v1/completions")(completions)
    return app


# -- the API's handlers (the server is the app's state) -----------------------------------------------------


async def models(request: Request) -> dict[str, Any]:
    server: Server = request.app.state.server
    server.authorize(request)
    return {"object": "list", "data": [
        {"id": server.name, "object": "model", "created": server.created, "owned_by": "chatloop"}]}


async def stats(request: Request) -> dict[str, Any]:
    server: Server = request.app.state.server
    server.authorize(request)
    return {**asdict(server.batcher.stats), "waiting": server.batcher.pending()}


async def chat_completions(request: Request):
    server: Server = request.app.state.server
    key, params = await server.parse(request, ChatParams)
    if len(params.messages) > server.cfg.max_messages:
        raise APIError(400, f"messages: expected at most {server.cfg.max_messages} messages", param="messages")
    stop = server.check_stops(params)
    messages = [{"role": m.role, "content": m.text()} for m in params.messages]
    try:
        validate_prompt_value(messages, "request", "messages")
    except UserError as e:
        raise APIError(400, str(e).removeprefix("request: "), param="messages") from None
    size = sum(len(m["content"].encode("utf-8")) for m in messages)
    ids = await server.tokenize(lambda: server.tokenizer.render_chat(messages, add_generation_prompt=True)[0],
                                size, "messages")
    sampling = server.sampling(params, len(ids), params.max_completion_tokens or params.max_tokens, "messages")
    request_id, job, events = await server.start(key, "chat.completions", messages, ids, params, sampling)
    created = int(time.time())
    head = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": server.name}

    if params.stream:
        async def chunks() -> AsyncIterator[str]:
            yield sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]})
            async for piece, finish in text_events(server, job, events, stop):
                if piece:
                    yield sse({**head, "choices": [{"index": 0, "delta": {"content": piece}, "logprobs": None,
                                                    "finish_reason": None}]})
                if finish:
                    yield sse({**head, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                                    "finish_reason": finish}]})
            if (params.stream_options or {}).get("include_usage"):
                yield sse({**head, "choices": [], "usage": usage(len(ids), job)})
            yield "data: [DONE]\n\n"

        return event_stream(chunks())

    text, finish = await whole_text(server, job, events, stop)
    return {"id": request_id, "object": "chat.completion", "created": created, "model": server.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish}],
            "usage": usage(len(ids), job)}


async def feedback(request: Request) -> dict[str, Any]:
    """The chat page's thumbs and regenerations (chatloop.data.feedback), stored under the key's user id."""
    server: Server = request.app.state.server
    key = server.authorize(request)
    body = server.body(request)
    messages = body.get("messages")
    try:
        client_id, kind, answers, verdict = check_body(body)
        if not isinstance(messages, list) or len(messages) > server.cfg.max_messages:
            raise UserError(f"messages: expected the conversation up to the user's turn answered (at most "
                            f"{server.cfg.max_messages} messages)")
        validate_prompt_value(messages, "request", "messages")
        for m in messages:
            if set(m) != {"role", "content"}:
                raise UserError("messages: expected {'role', 'content'} objects")
    except UserError as e:
        text = str(e).removeprefix("request: ")
        raise APIError(400, text, param=text.split(":")[0].removeprefix("field ").strip("'")) from None
    if not key.log:
        return {"logged": False}
    try:
        _, new = await run_in_threadpool(server.log.feedback, key.user_id, client_id, kind, messages, answers,
                                         verdict, server.name)
    except DiskFull:
        raise
    except UserError as e:
        raise APIError(409, str(e), param="id") from None
    return {"logged": True, "new": new}


async def completions(request: Request):
    server: Server = request.app.state.server
    key, params = await server.parse(request, CompletionParams)
    prompt = params.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise APIError(400, "prompt: only one prompt per request is supported", param="prompt")
        prompt = prompt[0]
    stop = server.check_stops(params)
    try:
        validate_prompt_value(prompt, "request")
    except UserError as e:
        raise APIError(400, str(e).removeprefix("request: "), param="prompt") from None
    ids = await server.tokenize(lambda: server.tokenizer.encode(prompt), len(prompt.encode("utf-8")), "prompt")
    sampling = server.sampling(params, len(ids), params.max_tokens, "prompt")
    request_id, job, events = await server.start(key, "completions", prompt, ids, params, sampling)
    created = int(time.time())
    head = {"id": request_id, "object": "text_completion", "created": created, "model": server.name}

    if params.stream:
        async def chunks() -> AsyncIterator[str]:
            async for piece, finish in text_events(server, job, events, stop):
                if piece or finish:
                    yield sse({**head, "choices": [{"index": 0, "text": piece, "logprobs": None,
                                                    "finish_reason": finish}]})
            yield "data: [DONE]\n\n"

        return event_stream(chunks())

    text, finish = await whole_text(server, job, events, stop)
    return {"id": request_id, "object": "text_completion", "created": created, "model": server.name,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            "usage": usage(len(ids), job)}


def build(cfg: ServeConfig) -> Server:
    """Load the model and start the batcher (the part of `serve` that tests and benchmarks share)."""
    from chatloop.checkpoint import load_model
    from chatloop.device import resolve_device

    if not cfg.model:
        raise UserError("--model: give a checkpoint directory")
    for name in ("max_prompt_tokens", "max_tokens", "max_body_bytes", "max_batch", "max_queue", "max_messages",
                 "max_stop"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name}: expected a positive integer, got {getattr(cfg, name)}")
    if not 0 <= cfg.min_temperature <= cfg.max_temperature:
        raise UserError("--min_temperature/--max_temperature: expected 0 <= min <= max")
    keys = load_keys(cfg)
    device = resolve_device(cfg.device)
    model = load_model(cfg.model, device=device)
    tokenizer = Tokenizer.load(cfg.model)
    name = cfg.model_name or Path(cfg.model).resolve().name
    batcher = Batcher(model, tokenizer, max_batch=cfg.max_batch, max_queue=cfg.max_queue, seed=cfg.seed)
    return Server(cfg, batcher, tokenizer, keys, PromptLog(cfg.db, cfg.request_log), name)


def serve(cfg: ServeConfig) -> None:
    import uvicorn

    server = build(cfg)
    print(f"chatloop serve: {server.name} on http://{cfg.host}:{cfg.port}/ ({len(server.keys)} API keys, "
          f"prompts -> {server.log.store.db if server.log.store else '-'} and {cfg.request_log or '-'})")
    try:
        uvicorn.run(create_app(server), host=cfg.host, port=cfg.port, log_level="warning")
    finally:
        server.batcher.close()
