"""`chatloop serve` against a hostile client: fuzzed bodies on both generation endpoints, the fields a lone
surrogate or an absurd number can hide in, oversized and streamed bodies, 500s without internals, and a
client sending 960 KB prompts in a loop that must not delay another client's stream."""

from __future__ import annotations

import contextlib
import json
import statistics
import threading
import time
from collections import Counter

import httpx
import pytest

from tests.fuzz import json_bodies
from tests.test_serve import MESSAGES, LiveServer, config, model_dir  # noqa: F401 - model_dir is a fixture

AUTH = {"Authorization": "Bearer sk-alice"}
KB = 1024


@pytest.fixture(scope="module")
def live(model_dir, tmp_path_factory):  # noqa: F811 - the fixture imported above
    server = LiveServer(config(model_dir, tmp_path_factory.mktemp("serve-sec"), max_body_bytes=1_000_000))
    yield server
    server.close()


def check(response: httpx.Response) -> str | None:
    """What is wrong with the answer to a malformed request (None: fine)."""
    if response.status_code >= 500:
        return f"{response.status_code}: {response.text[:300]}"
    if "x-content-type-options" not in response.headers:
        return "no security headers"
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            return f"{response.status_code} not in OpenAI's format: {response.text[:300]}"
        if set(error) != {"message", "type", "param", "code"} or not isinstance(error["message"], str):
            return f"{response.status_code} not in OpenAI's format: {error}"
        if "Traceback" in error["message"] or "Error:" in error["message"]:
            return f"{response.status_code} shows internal text: {error['message'][:300]}"
    return None


def fuzz(live: LiveServer, path: str, bases: list[dict], seed: int) -> Counter:
    bodies = json_bodies(bases, 300, seed)
    problems, statuses = [], Counter()
    started = time.monotonic()
    with httpx.Client(base_url=live.url, headers=AUTH, timeout=60) as client:
        for body in bodies:
            with client.stream("POST", path, content=body, headers={"content-type": "application/json"}) as r:
                r.read()  # a stream that was accepted runs to its end
                statuses[r.status_code] += 1
                problem = check(r)
                if problem:
                    problems.append(f"{body[:150]!r}: {problem}")
    print(f"{path} fuzz: {len(bodies)} bodies in {time.monotonic() - started:.1f} s, statuses {dict(statuses)}")
    assert not problems, "\n".join(problems[:10])
    reply = live.client().chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=3)
    assert reply.usage.completion_tokens >= 1  # still serving
    return statuses


@pytest.mark.slow
def test_fuzzed_chat_completions_get_4xx_and_never_500(live):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Where is the fox?"}]}]
    statuses = fuzz(live, "/v1/chat/completions", [
        {"model": "tiny-chat", "messages": MESSAGES, "max_tokens": 4},
        {"model": "tiny-chat", "messages": MESSAGES, "max_tokens": 4, "stream": True, "temperature": 0.5,
         "top_p": 0.9, "stop": ["x", "y"], "user": "u1", "stream_options": {"include_usage": True}},
        {"model": "tiny-chat", "messages": parts, "max_completion_tokens": 3, "top_k": 5, "min_tokens": 1},
    ], seed=1)
    assert statuses[400] > 150


@pytest.mark.slow
def test_fuzzed_completions_get_4xx_and_never_500(live):
    statuses = fuzz(live, "/v1/completions", [
        {"model": "tiny-chat", "prompt": "The red fox", "max_tokens": 4},
        {"model": "tiny-chat", "prompt": ["The red fox"], "max_tokens": 4, "stream": True, "stop": "x",
         "temperature": 0, "user": "u2"},
    ], seed=2)
    assert statuses[400] > 150


@pytest.mark.slow
def test_fuzzed_feedback_gets_4xx_and_never_500(live):
    prompt = [{"role": "user", "content": "Where is the fox?"}]
    statuses = fuzz(live, "/v1/feedback", [
        {"id": "fuzz-thumb-1", "kind": "thumb", "messages": prompt, "answer": "In the den.", "value": "up"},
        {"id": "fuzz-regen-1", "kind": "regenerate", "messages": prompt, "answers": ["Here.", "There."], "kept": 0},
    ], seed=3)
    assert statuses[400] > 150 and statuses[200] >= 1


def error_of(live: LiveServer, path: str, raw: bytes, status: int = 400) -> dict:
    response = httpx.post(live.url + path, content=raw, headers={**AUTH, "content-type": "application/json"})
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_lone_surrogates_huge_numbers_deep_nesting_and_long_lists_are_400s_that_name_the_field(live):
    chat, completions = "/v1/chat/completions", "/v1/completions"
    assert error_of(live, chat, b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "hi \\ud800"}]}'
                    )["param"] == "messages.0.content"
    assert error_of(live, completions, b'{"model": "tiny-chat", "prompt": "\\udfff fox"}')["param"] == "prompt"
    assert error_of(live, completions, b'{"model": "tiny-chat", "prompt": "fox", "stop": ["a", "\\ud800"]}'
                    )["param"] == "stop.1"
    assert error_of(live, chat, b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], '
                                b'"user": "\\ud83d"}')["param"] == "user"
    huge = error_of(live, completions, b'{"model": "tiny-chat", "prompt": "fox", "max_tokens": ' + b"9" * 5000 + b"}")
    assert "out of range" in huge["message"]
    assert error_of(live, completions, b'{"model": "tiny-chat", "prompt": "fox", "max_tokens": 1' + b"0" * 30 + b"}"
                    )["param"] == "max_tokens"
    for depth in (5000, 100_000):
        assert "nested" in error_of(live, chat, b'{"model": "tiny-chat", "messages": ' + b"[" * depth + b"]" * depth
                                    + b"}")["message"]
    stops = json.dumps({"model": "tiny-chat", "prompt": "fox", "stop": ["s"] * 90_000}).encode()
    started = time.perf_counter()
    assert error_of(live, completions, stops)["param"] == "stop"
    assert time.perf_counter() - started < 1
    many = json.dumps({"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}] * 300}).encode()
    assert error_of(live, chat, many)["param"] == "messages"
    big_prompt = json.dumps({"model": "tiny-chat", "prompt": "fox " * 240_000}).encode()  # 960 KB
    assert error_of(live, completions, big_prompt)["code"] == "context_length_exceeded"
    assert error_of(live, completions, b"x" * 1_100_000, 413)["code"] == "request_too_large"

    def chunks():  # streamed, no Content-Length: cut off at the limit
        for _ in range(100):
            yield b"x" * (1024 * KB)

    with contextlib.suppress(httpx.TransportError):  # the server may close before the client has sent it all
        assert httpx.post(live.url + completions, content=chunks(), headers=AUTH).status_code == 413
    assert live.client().completions.create(model="tiny-chat", prompt="fox", max_tokens=2).choices


def test_an_internal_error_is_a_generic_500_in_openai_format_with_the_headers(live):
    async def broken() -> None:
        raise RuntimeError("secret internals: /etc/shadow")

    live.uvicorn.config.app.add_api_route("/v1/broken", broken)
    response = httpx.get(live.url + "/v1/broken", headers=AUTH)
    assert response.status_code == 500 and "secret internals" not in response.text
    assert response.json()["error"]["type"] == "server_error" and "x-content-type-options" in response.headers


def first_token_s(url: str) -> float:
    """Seconds from sending an 8-token streaming chat request to its first content token."""
    body = {"model": "tiny-chat", "messages": MESSAGES, "max_tokens": 8, "stream": True, "temperature": 0,
            "min_tokens": 8}
    started = time.perf_counter()
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                return time.perf_counter() - started
    raise AssertionError("no content token")


def test_a_client_sending_960_kb_prompts_in_a_loop_does_not_delay_another_client_s_stream(live):
    alone = [first_token_s(live.url) for _ in range(8)]
    stop, sent = threading.Event(), Counter()
    prompt = "The red fox runs. " * (960 * KB // 18)  # ~960 KB, under max_body_bytes
    bodies = [json.dumps({"model": "tiny-chat", "prompt": prompt, "max_tokens": 4}).encode(),
              json.dumps({"model": "tiny-chat", "messages": [{"role": "user", "content": prompt}]}).encode()]

    def flood(i: int) -> None:
        with httpx.Client(base_url=live.url, headers={**AUTH, "content-type": "application/json"}, timeout=60) as c:
            while not stop.is_set():
                path = ("/v1/completions", "/v1/chat/completions")[sent["total"] % 2]
                status = c.post(path, content=bodies[sent["total"] % 2]).status_code
                sent[status] += 1
                sent["total"] += 1

    threads = [threading.Thread(target=flood, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        loaded = [first_token_s(live.url) for _ in range(8)]
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    print(f"first token alone: median {statistics.median(alone) * 1000:.0f} ms; with 960 KB prompts in a loop "
          f"({sent['total']} sent, statuses {dict((k, v) for k, v in sent.items() if k != 'total')}): median "
          f"{statistics.median(loaded) * 1000:.0f} ms, max {max(loaded) * 1000:.0f} ms")
    assert set(sent) == {"total", 400} and sent["total"] >= 10  # every big prompt refused, many sent
    # The bound of issue 18 is 1 s on an idle machine (before the guard: 9.8 s). On a shared, loaded machine every
    # request is slow, so the flood may add at most 1 s to what the same stream takes alone right now.
    assert max(loaded) < 1.0 + max(alone), (alone, loaded)
