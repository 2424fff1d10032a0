"""`chatloop serve` and `chatloop chat`: a real uvicorn server on a tiny random model, driven by the official
`openai` client, raw HTTP, a browser and the CLI."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from chatloop.checkpoint import save_model
from chatloop.data.prompts import PromptStore
from chatloop.engine import generate
from chatloop.model import GPT, preset
from chatloop.serve.api import ServeConfig, build, create_app
from chatloop.serve.batcher import Batcher, Job, Sampling
from chatloop.tokenizer import SPECIAL_TOKENS, Tokenizer
from tests.conftest import need_module, run_cli

openai = need_module("openai")
uvicorn = need_module("uvicorn")

KEYS = ["sk-alice:alice", "sk-bob:bob", "sk-quiet:carol:nolog"]


def run_async(coroutine):
    """asyncio.run in a thread of its own: Playwright's sync API (the session's `browser` fixture) keeps an event
    loop running in the main thread once a browser test has started it."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    tokenizer = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(0)
    cfg = preset("tiny", {"vocab_size": tokenizer.vocab_size, "n_layer": 2, "d_model": 64, "n_head": 4,
                          "n_kv_head": 2, "max_seq_len": 128, "tie_embeddings": False})
    model = GPT(cfg)
    with torch.no_grad():  # weights large enough for varied text, special tokens (empty text) never likely
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(std=0.3)
        for token in SPECIAL_TOKENS:
            model.lm_head.weight[tokenizer.hf.token_to_id(token)] = 0
    out = tmp_path_factory.mktemp("served") / "tiny-chat"
    save_model(model, out, tokenizer)
    return out


class LiveServer:
    """uvicorn serving create_app(build(cfg)) on a free port, in a thread of the test process."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.server = build(cfg)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.uvicorn = uvicorn.Server(uvicorn.Config(create_app(self.server), log_level="warning"))
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def client(self, key: str = "sk-alice", **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, **kwargs)

    def close(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=10)
        self.server.batcher.close()


def config(model_dir: Path, tmp: Path, **overrides) -> ServeConfig:
    fields = dict(model=str(model_dir), api_keys=KEYS, db=str(tmp / "prompts.db"),
                  request_log=str(tmp / "requests.jsonl"), max_prompt_tokens=100, max_tokens=48,
                  max_body_bytes=20_000, max_batch=8, device="cpu")
    return ServeConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def live(model_dir, tmp_path_factory):
    server = LiveServer(config(model_dir, tmp_path_factory.mktemp("serve")))
    yield server
    server.close()


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where does the red fox run?"}]


def test_batcher_decodes_like_the_engine_with_requests_joining_mid_flight(model_dir):
    """Greedy answers from the batcher, requests admitted at different steps into 3 rows, equal
    engine.generate's for the same prompts."""
    from chatloop.checkpoint import load_model

    model, tokenizer = load_model(model_dir), Tokenizer.load(model_dir)
    prompts = [tokenizer.encode(t) for t in ("The red fox", "A", "The lazy dog jumps over the", "big hill", "x y")]
    reference = generate(model, prompts, 12, tokenizer.pad_id, tokenizer.stop_ids, temperature=0).response_ids()
    batcher = Batcher(model, tokenizer, max_batch=3)
    try:
        queues = []
        for i, prompt in enumerate(prompts):
            events: queue.Queue = queue.Queue()
            batcher.submit(Job(prompt, Sampling(max_tokens=12, temperature=0), events.put))
            queues.append(events)
            time.sleep(0.002 * i)
        for i, events in enumerate(queues):
            tokens, finish = [], None
            while finish is None:
                token, finish = events.get(timeout=30)
                if token is not None:
                    tokens.append(token)
            expected = reference[i]
            assert tokens == [t for t in expected if t not in tokenizer.stop_ids]
            assert finish == ("stop" if expected[-1] in tokenizer.stop_ids else "length")
        assert batcher.stats.max_rows == 3
    finally:
        batcher.close()


def test_models_chat_and_usage(live):
    client = live.client()
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]
    reply = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=10, temperature=0.7)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= reply.usage.completion_tokens <= 10
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streaming_chat_equals_non_streaming_at_temperature_0(live):
    client = live.client()
    args = dict(model="tiny-chat", messages=MESSAGES, max_tokens=24, temperature=0, extra_body={"min_tokens": 24})
    whole = client.chat.completions.create(**args).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1  # streamed, not sent at the end
    assert "".join(pieces) == whole
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 24


def test_completions_stream_and_stop_strings(live):
    client = live.client()
    args = dict(model="tiny-chat", prompt="The red fox", max_tokens=20, temperature=0, extra_body={"min_tokens": 20})
    whole = client.completions.create(**args)
    text = whole.choices[0].text
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 20
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **args))
    assert streamed == text
    # A stop string from the middle of the text (plain characters: random bytes decode to U+FFFD too).
    starts = [i for i in range(1, len(text) - 1) if text[i : i + 2].isascii() and text[i : i + 2].strip()]
    assert starts
    stop = text[starts[len(starts) // 2] : starts[len(starts) // 2] + 2]
    cut = client.completions.create(stop=[stop], **args)
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    cut_stream = "".join(c.choices[0].text for c in client.completions.create(stream=True, stop=stop, **args))
    assert cut_stream == text[: text.index(stop)]


def test_prompts_are_logged_with_the_key_s_user_id(live):
    question = f"What does the fox do at {time.time()}?"
    live.client("sk-bob").chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": question}], max_tokens=5, temperature=0.5,
        top_p=0.9)
    live.client("sk-quiet").chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "secret " + question}], max_tokens=5)
    store = PromptStore(live.server.cfg.db, create=False)
    rows = [r for r in store.load_rows() if isinstance(r.prompt, list) and question in r.prompt[-1]["content"]]
    assert len(rows) == 1  # the nolog key's request is not there
    assert rows[0].user_id == "bob" and rows[0].source == "api" and rows[0].created_at
    with store.engine.connect() as conn:
        extra = json.loads(conn.exec_driver_sql("SELECT extra FROM prompts WHERE id = ?", (rows[0].pid,)).scalar())
    assert extra["model"] == "tiny-chat" and extra["endpoint"] == "chat.completions"
    assert extra["sampling"]["temperature"] == 0.5 and extra["sampling"]["top_p"] == 0.9
    assert extra["sampling"]["max_tokens"] == 5
    log = Path(live.server.cfg.request_log).read_text(encoding="utf-8")
    assert question in log and "secret" not in log
    # The request log is what `chatloop prompts ingest` reads: it finds everything stored already.
    result = store.ingest_file(live.server.cfg.request_log)
    assert result.records >= 1 and result.added == 0


@pytest.mark.parametrize("key", [None, "sk-wrong"])
def test_missing_or_wrong_key_is_401(live, key):
    response = httpx.get(f"{live.url}/v1/models", headers={"Authorization": f"Bearer {key}"} if key else {})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    response = httpx.post(f"{live.url}/v1/chat/completions", json={"model": "tiny-chat", "messages": MESSAGES},
                          headers={"Authorization": f"Bearer {key}"} if key else {})
    assert response.status_code == 401 and response.json()["error"]["type"] == "invalid_request_error"
    if key:
        with pytest.raises(openai.AuthenticationError):
            live.client(key).chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=2)


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(live):
    client = live.client()
    url, auth = f"{live.url}/v1/chat/completions", {"Authorization": "Bearer sk-alice"}

    def error(status: int, **kwargs) -> dict:
        response = httpx.post(url, headers=auth, **kwargs)
        assert response.status_code == status, response.text
        body = response.json()["error"]
        assert set(body) == {"message", "type", "param", "code"} and body["message"]
        return body

    error(400, content=b"{not json")
    error(400, content=b"[1, 2]")
    assert error(400, json={"model": "tiny-chat"})["param"] == "messages"
    assert error(400, json={"model": "tiny-chat", "messages": [{"role": "robot", "content": "hi"}]})["param"]
    assert error(400, json={"model": "tiny-chat", "messages": [{"role": "user", "content": " "}]})["param"] \
        == "messages"
    assert error(413, json={"model": "tiny-chat", "messages": [{"role": "user", "content": "x" * 30_000}]})
    assert error(404, json={"model": "gpt-5", "messages": MESSAGES})["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-chat", messages=MESSAGES, temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=1000)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "fox " * 200}])
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-chat", prompt="", max_tokens=3)
    with pytest.raises(openai.NotFoundError):
        client.post("/nowhere", cast_to=object)
    reply = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=3)
    assert reply.usage.completion_tokens >= 1


def test_concurrent_requests_are_batched(live):
    async def main() -> list[int]:
        client = openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key="sk-alice", max_retries=0)

        async def one(i: int) -> int:
            stream = await client.chat.completions.create(
                model="tiny-chat", messages=[{"role": "user", "content": f"fox {i}"}], max_tokens=30,
                stream=True, stream_options={"include_usage": True}, extra_body={"min_tokens": 30})
            return [c.usage.completion_tokens async for c in stream if c.usage][-1]

        return await asyncio.gather(*(one(i) for i in range(8)))

    live.server.batcher.stats.max_rows = 0  # the most rows in one step from here on
    before = httpx.get(f"{live.url}/v1/stats", headers={"Authorization": "Bearer sk-alice"}).json()
    assert run_async(main()) == [30] * 8
    after = httpx.get(f"{live.url}/v1/stats", headers={"Authorization": "Bearer sk-alice"}).json()
    steps, rows = after["steps"] - before["steps"], after["row_steps"] - before["row_steps"]
    assert rows == 8 * 30
    assert after["max_rows"] > 1 and steps < rows  # requests shared decoding steps


def test_a_client_that_goes_away_frees_its_row(live):
    batcher = live.server.batcher
    admitted = batcher.stats.admitted
    stream = live.client().chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=48, stream=True,
                                                  extra_body={"min_tokens": 48})
    for _ in stream:  # the first chunk (the role) can come before the batcher admits the request
        if batcher.stats.admitted > admitted:
            break
    stream.close()
    deadline = time.monotonic() + 10
    while batcher._active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not batcher._active and batcher.stats.admitted == admitted + 1


def test_a_full_queue_answers_429(model_dir, tmp_path):
    server = LiveServer(config(model_dir, tmp_path, max_batch=1, max_queue=1))
    try:
        async def main() -> list:
            client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="sk-alice", max_retries=0)
            calls = [client.completions.create(model="tiny-chat", prompt="fox", max_tokens=48,
                                               extra_body={"min_tokens": 48}) for _ in range(4)]
            return await asyncio.gather(*calls, return_exceptions=True)

        results = run_async(main())
        refused = [r for r in results if isinstance(r, openai.RateLimitError)]
        assert refused and refused[0].body["code"] == "rate_limit_exceeded"
        assert all(r.usage.completion_tokens == 48 for r in results if not isinstance(r, Exception))
        assert server.client().completions.create(model="tiny-chat", prompt="fox", max_tokens=2).choices
    finally:
        server.close()


def wait_js(page, expression: str, timeout: float = 180) -> None:
    """Poll a JavaScript expression until it holds: Playwright's wait_for_function evaluates its predicate with
    eval, which the page's Content-Security-Policy forbids (page.evaluate goes through the debugger instead)."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        time.sleep(0.05)


def test_chat_page_streams_a_reply_and_regenerates(live, browser):
    response = httpx.get(live.url + "/")
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert response.headers["x-frame-options"] == "DENY" and "<script>" not in response.text
    assert httpx.get(live.url + "/page.js").headers["content-type"].startswith("text/javascript")
    page = browser.new_page()
    page.set_default_timeout(180_000)  # a loaded machine
    try:
        page.goto(live.url + "/")
        page.fill("#key", "sk-alice")
        page.dispatch_event("#key", "change")
        wait_js(page, "document.getElementById('model').textContent === 'tiny-chat'")
        # The key is kept for this tab only, never in localStorage.
        assert page.evaluate("localStorage.length") == 0
        assert page.evaluate("sessionStorage.getItem('chatloop-key')") == "sk-alice"
        page.fill("#system", "Answer in one line.")
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "8")  # random bytes re-encode to more tokens: keep the conversation short
        # Count the updates of the reply bubble: a streamed reply grows piece by piece.
        page.evaluate("""() => { window.updates = 0; new MutationObserver((records) => {
            for (const r of records) if (r.target.closest && r.target.closest('.msg.assistant')) window.updates++;
        }).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true}); }""")
        page.fill("#input", "Where does the red fox run?")
        page.click("#send")
        page.wait_for_selector(".msg.assistant[data-done]")
        first = page.inner_text(".msg.assistant .text")
        assert first and page.evaluate("window.updates") > 1
        assert page.inner_text(".msg.user") == "Where does the red fox run?"
        page.click("#regenerate")
        wait_js(page, "document.querySelectorAll('.msg.assistant').length === 1 && "
                      "document.querySelector('.msg.assistant').dataset.done === 'true'")
        assert page.inner_text(".msg.assistant .text") == first  # greedy: the same answer again
        page.fill("#input", "And the dog?")
        page.click("#send")
        wait_js(page, "document.querySelectorAll('.msg.assistant[data-done]').length === 2 || "
                      "!!document.querySelector('.msg.error')")
        assert not page.query_selector(".msg.error"), page.inner_text(".msg.error")
        assert len(page.query_selector_all(".msg.user")) == 2
    finally:
        page.close()
    rows = PromptStore(live.server.cfg.db, create=False).load_rows()
    turns = [r.prompt for r in rows if isinstance(r.prompt, list) and r.prompt[-1]["content"] == "And the dog?"]
    assert turns and [m["role"] for m in turns[-1]] == ["system", "user", "assistant", "user"]


def feedback_post(url: str, key: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/feedback", json=body, headers={"Authorization": f"Bearer {key}"})


def test_thumbs_and_regenerations_are_comparisons_that_survive_a_restart_and_train_the_rm(model_dir, tmp_path):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where does the fox run?"}]
    server = LiveServer(config(model_dir, tmp_path))
    try:
        url = server.url
        regenerate = {"id": "regen-0001", "kind": "regenerate", "messages": prompt,
                      "answers": ["To the river.", "It runs to the hill."], "kept": 1}
        assert feedback_post(url, "sk-alice", regenerate).json() == {"logged": True, "new": True}
        # The user switches back to the first answer: the same judgement, its verdict changed (no second row).
        assert feedback_post(url, "sk-alice", {**regenerate, "kept": 0}).json() == {"logged": True, "new": False}
        for fid, answer, value in [("thumb-0001", "To the forest.", "up"), ("thumb-0002", "Blue.", "down"),
                                   ("thumb-0003", "The fox.", "up")]:
            body = {"id": fid, "kind": "thumb", "messages": prompt, "answer": answer, "value": value}
            assert feedback_post(url, "sk-bob", body).status_code == 200
        assert feedback_post(url, "sk-bob", {"id": "thumb-0003", "kind": "thumb", "messages": prompt,
                                             "answer": "The fox.", "value": "none"}).status_code == 200  # undone
        # Another user's request with the same id is their own judgement: it cannot change alice's.
        assert feedback_post(url, "sk-bob", {**regenerate, "kept": 1}).json()["new"] is True
        assert feedback_post(url, "sk-quiet", {**regenerate, "id": "quiet-0001"}).json() == {"logged": False}
        same_id_other_answers = {**regenerate, "answers": ["x", "y"]}
        conflict = feedback_post(url, "sk-alice", same_id_other_answers)
        assert conflict.status_code == 409 and conflict.json()["error"]["param"] == "id"
        for bad, param in [({**regenerate, "kept": 2}, "kept"), ({**regenerate, "id": "x"}, "id"),
                           ({**regenerate, "kind": "stars"}, "kind"), ({**regenerate, "answers": ["only"]}, "answers"),
                           ({**regenerate, "messages": prompt[:1]}, "messages"),
                           ({**regenerate, "messages": [{**prompt[1], "extra": 1}]}, "messages"),
                           ({**regenerate, "answers": ["a", ""]}, "answers")]:
            response = feedback_post(url, "sk-alice", bad)
            assert response.status_code == 400 and response.json()["error"]["param"].startswith(param), response.text
        assert httpx.post(f"{url}/v1/feedback", json=regenerate).status_code == 401
    finally:
        server.close()
    server = LiveServer(config(model_dir, tmp_path))  # a restart: nothing but the database carries over
    try:
        rows = server.server.log.store.feedback_rows()
    finally:
        server.close()
    assert [(r["user_id"], r["kind"], r["verdict"]) for r in rows] == [
        ("alice", "regenerate", "0"), ("bob", "thumb", "up"), ("bob", "thumb", "down"), ("bob", "thumb", "none"),
        ("bob", "regenerate", "1")]
    assert rows[0]["prompt"] == prompt and rows[0]["answers"] == regenerate["answers"]
    assert rows[0]["model"] == "tiny-chat" and not any(r["user_id"] == "carol" for r in rows)
    out = tmp_path / "feedback.jsonl"
    exported = run_cli("prompts", "feedback", f"--db={tmp_path / 'prompts.db'}", f"--out={out}")
    assert exported.returncode == 0, exported.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["labeler_id"], r["source"], r["responses"]) for r in records] == [
        ("alice", "regenerate", ["To the river.", "It runs to the hill."]),  # the kept one first
        ("bob", "regenerate", ["It runs to the hill.", "To the river."]),
        ("bob", "thumbs", ["To the forest.", "Blue."])]  # up above down; the undone thumb is no verdict
    assert all(r["ranks"] == [1, 2] and r["prompt"] == prompt and r["model"] == "tiny-chat" for r in records)
    rm = run_cli("rm", f"--model={model_dir}", f"--data={out}", f"--out={tmp_path / 'rm'}", "--batch_size=2",
                 "--seq_len=96", "--progress=false")
    assert rm.returncode == 0, rm.stderr
    assert json.loads((tmp_path / "rm" / "chatloop.json").read_text())["metrics"]["train_comparisons"] >= 1


def test_chat_page_thumbs_and_regenerate_land_as_comparisons(live, browser):
    page = browser.new_page()
    page.set_default_timeout(180_000)
    store = live.server.log.store
    before = len(store.feedback_rows())
    try:
        page.goto(live.url + "/")
        page.fill("#key", "sk-bob")
        page.dispatch_event("#key", "change")
        wait_js(page, "document.getElementById('model').textContent === 'tiny-chat'")
        page.fill("#temperature", "1")
        page.fill("#max_tokens", "8")
        question = f"Which fox runs fastest at {time.time()}?"
        page.fill("#input", question)
        page.click("#send")
        page.wait_for_selector(".msg.assistant[data-done] .thumb-up")
        first = page.inner_text(".msg.assistant .text")
        page.click(".thumb-up")
        page.wait_for_selector(".feedback-note:has-text('thanks')")
        assert page.get_attribute(".thumb-up", "aria-pressed") == "true"
        page.click("#regenerate")
        wait_js(page, "document.querySelectorAll('.msg.assistant').length === 1 && "
                      "!!document.querySelector('.msg.assistant[data-done] .keep-other')")
        page.wait_for_selector(".feedback-note:has-text('thanks')")  # the regenerate, new answer kept, stored
        second = page.inner_text(".msg.assistant .text")
        page.click(".keep-other")  # the user prefers the first answer after all
        wait_js(page, f"document.querySelector('.msg.assistant .text').textContent === {json.dumps(first)}")
        page.wait_for_selector(".feedback-note:has-text('thanks')")
        page.click(".thumb-down")  # a thumb on the answer now shown: the first
        assert page.get_attribute(".thumb-down", "aria-pressed") == "true"
        page.wait_for_selector(".feedback-note:has-text('thanks')")
    finally:
        page.close()
    rows = [r for r in store.feedback_rows()[before:] if r["prompt"][-1]["content"] == question]
    assert [(r["user_id"], r["kind"], r["verdict"], r["answers"]) for r in rows] == [
        ("bob", "thumb", "up", [first]), ("bob", "regenerate", "0", [first, second]),
        ("bob", "thumb", "down", [first])]
    assert rows[0]["prompt"] == [{"role": "user", "content": question}]
    # A nolog key: the page says so and nothing is stored.
    page = browser.new_page()
    try:
        page.goto(live.url + "/")
        page.fill("#key", "sk-quiet")
        page.dispatch_event("#key", "change")
        wait_js(page, "document.getElementById('model').textContent === 'tiny-chat'")
        page.fill("#max_tokens", "4")
        page.fill("#input", "A quiet question?")
        page.click("#send")
        page.wait_for_selector(".msg.assistant[data-done] .thumb-up")
        page.click(".thumb-up")
        page.wait_for_selector(".feedback-note:has-text('does not log')")
    finally:
        page.close()
    assert not any(r["user_id"] == "carol" for r in store.feedback_rows())


def test_cli_serve_logs_prompts_that_chatloop_prompts_reads(model_dir, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# key:user\nsk-dana:dana\n", encoding="utf-8")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    db, log = tmp_path / "prompts.db", tmp_path / "requests.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-m", "chatloop.cli", "serve", "--model", str(model_dir), "--port", str(port),
         "--api_keys_file", str(keys), "--db", str(db), "--request_log", str(log), "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-dana", max_retries=0, timeout=300)
        deadline = time.monotonic() + 300  # a loaded machine can take minutes to import torch
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    process.kill()
                    pytest.fail(f"chatloop serve did not start:\n{process.communicate()[0]}")
                time.sleep(0.2)
        client.completions.create(model="tiny-chat", prompt="Tell me about the lazy dog.", max_tokens=4)
    finally:
        process.terminate()
        process.wait(timeout=30)
    ingest = run_cli("prompts", "ingest", "--inputs", str(log), "--db", str(db))
    assert ingest.returncode == 0, ingest.stderr
    assert "1 records, 0 added, 1 already stored" in ingest.stdout
    stats = run_cli("prompts", "stats", "--db", str(db))
    assert "1 prompts from 1 users" in stats.stdout and "api 1" in stats.stdout


def test_cli_serve_needs_a_key_and_lists_its_fields(model_dir):
    result = run_cli("serve", "--model", str(model_dir))
    assert result.returncode == 2 and "no default key" in result.stderr
    help_text = run_cli("serve", "--help").stdout
    for name in ServeConfig.__dataclass_fields__:
        assert f"--{name}" in help_text or name in help_text


def test_terminal_chat_streams_and_takes_slash_commands(model_dir):
    script = "/system Be brief.\nhello\n/temperature 0\nwhere is the fox?\n/temperature x\n/reset\nhi\n/quit\n"
    result = subprocess.run([sys.executable, "-m", "chatloop.cli", "chat", "--model", str(model_dir),
                             "--max_tokens", "8", "--device", "cpu"], input=script, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "(system prompt set; conversation reset)" in out and "(temperature 0)" in out
    assert "expected a number >= 0" in out and "(conversation reset)" in out
    assert out.count("bot> ") == 3
