"""The labeling app against a hostile client: fuzzed JSON and form bodies, oversized and streamed bodies,
concurrent password guessing with real argon2 in a real `chatloop label serve` process, and the smaller rules
(invite links, skips of done tasks, unknown flags, admin form errors, file modes, headers on error pages)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import stat
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from argon2 import PasswordHasher

from chatloop.labeling.answers import task_item
from chatloop.labeling.secret import load_secret
from chatloop.labeling.store import LabelStore
from tests.fuzz import form_bodies, json_bodies
from tests.test_label import PASSWORD, Live, form_csrf, free_port, join, ranking_items

MB = 1024 * 1024


def run_async(coroutine):
    """asyncio.run in a thread of its own: the browser tests' Playwright keeps an event loop in the main thread."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


@pytest.fixture
def live(tmp_path):
    app = Live(tmp_path / "label.db", tmp_path / "label.secret")
    yield app
    app.stop()


@pytest.fixture
def fuzz_live(tmp_path):
    app = Live(tmp_path / "label.db", tmp_path / "label.secret", login_limit=10**6)  # the fuzz reaches the hash
    yield app
    app.stop()


def one_of_each(live: Live) -> dict[str, str]:
    """Batches of every kind (many tasks each); their ids by kind, plus one to skip in."""
    store = live.store
    items = {
        "ranking": ranking_items(50),
        "rating": [task_item("rating", {"prompt": f"p{i}", "response": "r"}, "t") for i in range(50)],
        "comparison": [task_item("comparison", {"prompt": f"p{i}", "a": "1", "b": "2"}, "t") for i in range(50)],
        "demonstration": [task_item("demonstration", {"prompt": f"Capital {i}?"}, "t") for i in range(50)],
    }
    bids = {kind: store.create_batch(kind, kind, its, overlap=1, source="t", actor="t") for kind, its in items.items()}
    bids["skip"] = store.create_batch("skip", "rating", items["rating"], overlap=1, source="t", actor="t")
    return bids


def lease(client: httpx.Client, bid: str) -> dict:
    return client.get("/api/next", params={"batch": bid}).json()["assignment"]


def check_refusal(response: httpx.Response, api: bool) -> str | None:
    """What is wrong with a response to a malformed request (None: a 2xx/3xx/4xx in the app's format)."""
    if response.status_code >= 500:
        return f"{response.status_code}: {response.text[:300]}"
    if "content-security-policy" not in response.headers:
        return f"{response.status_code} without the security headers"
    if response.status_code >= 400:
        if "Traceback" in response.text or "Error:" in response.text:
            return f"{response.status_code} shows internal text: {response.text[:300]}"
        if api and not isinstance(response.json().get("error"), str):
            return f"{response.status_code} not in the API's format: {response.text[:300]}"
        if not api and not response.headers["content-type"].startswith("text/html"):
            return f"{response.status_code} form error not a page: {response.headers['content-type']}"
    return None


def post_all(client: httpx.Client, url: str, bodies: list, api: bool, problems: list[str],
             statuses: Counter) -> None:
    for body in bodies:
        content, content_type = body if isinstance(body, tuple) else (body, "application/json")
        try:
            response = client.post(url, content=content, headers={"content-type": content_type} if content_type
                                   else {})
        except httpx.TransportError as e:  # only a body over the limit may have its connection closed
            if len(content) <= 1_000_000:
                problems.append(f"{url}: connection error {e!r} on a {len(content)}-byte body")
            continue
        statuses[response.status_code] += 1
        problem = check_refusal(response, api)
        if problem:
            problems.append(f"{url} {content[:120]!r}: {problem}")


def still_serving(live: Live, bids: dict[str, str]) -> None:
    assert httpx.get(f"{live.url}/healthz").json() == {"ok": True}
    fresh = join(live, f"after{time.monotonic_ns()}")
    view = lease(fresh, bids["ranking"])
    assert fresh.post(f"/api/assignments/{view['id']}", json={"ranks": [1, 2, 3, 4]}).status_code == 200


def test_fuzzed_json_api_bodies_get_4xx_and_never_500(fuzz_live):
    live = fuzz_live
    bids = one_of_each(live)
    alice = join(live, "alice")
    targets = {
        "ranking": [{"ranks": [1, 2, 3, 4]}, {"ranks": [1, 1, 2, 3], "none_acceptable": True},
                    {"none_acceptable": True}],
        "rating": [{"likert": 5, "flags": ["hallucination"]}, {"likert": 3, "flags": {"contains_pii": True}}],
        "comparison": [{"winner": "a"}, {"winner": "tie"}],
        "demonstration": [{"answer": "Paris.", "turns": ["Sure?", "Yes."]}, {"answer": "Paris."}],
    }
    problems: list[str] = []
    statuses: Counter = Counter()
    started = time.monotonic()
    for seed, (kind, bases) in enumerate(targets.items()):
        aid = lease(alice, bids[kind])["id"]
        url = f"/api/assignments/{aid}"
        post_all(alice, url, json_bodies(bases, 150, seed), True, problems, statuses)
        post_all(alice, url + "?next=1", json_bodies(bases, 30, seed + 100), True, problems, statuses)
    skip = lease(alice, bids["skip"])["id"]
    post_all(alice, f"/api/assignments/{skip}/skip", json_bodies([{"reason": "not my language"}], 150, 7),
             True, problems, statuses)
    guest = httpx.Client(base_url=live.url, timeout=30)
    guest.headers["X-CSRF-Token"] = guest.get("/api/csrf").json()["csrf"]
    post_all(guest, "/api/login", json_bodies([{"name": "alice", "password": PASSWORD}], 150, 8), True, problems,
             statuses)
    elapsed = time.monotonic() - started
    print(f"json api fuzz: {sum(statuses.values())} bodies in {elapsed:.1f} s, statuses {dict(statuses)}")
    assert not problems, "\n".join(problems[:10])
    assert statuses[400] > 500  # most bodies are refused by the guard or the answer check
    still_serving(live, bids)


def test_fuzzed_forms_and_odd_urls_get_4xx_pages_and_never_500(fuzz_live):
    live = fuzz_live
    bids = one_of_each(live)
    admin, alice = join(live, "root", "admin"), join(live, "alice")
    csrf_admin, csrf = admin.headers.pop("X-CSRF-Token"), alice.headers.pop("X-CSRF-Token")
    views = {kind: lease(alice, bids[kind]) for kind in ("ranking", "rating", "comparison", "demonstration")}
    skip = lease(alice, bids["skip"])["id"]
    problems: list[str] = []
    statuses: Counter = Counter()
    started = time.monotonic()
    forms = {
        "ranking": [{"csrf": csrf, **{f"rank-{p}": str(p + 1) for p in range(4)}},
                    {"csrf": csrf, "none_acceptable": "on"}],
        "rating": [{"csrf": csrf, "likert": "5", "flag": "hallucination"}],
        "comparison": [{"csrf": csrf, "winner": "b"}],
        "demonstration": [{"csrf": csrf, "answer": "Paris.", "turn": "Sure?"}],
    }
    for seed, (kind, bases) in enumerate(forms.items()):
        post_all(alice, f"/a/{views[kind]['id']}", form_bodies(bases, 100, seed), False, problems, statuses)
    post_all(alice, f"/a/{skip}/skip", form_bodies([{"csrf": csrf, "reason": "unclear"}], 100, 5), False, problems,
             statuses)
    post_all(admin, f"/admin/batches/{bids['rating']}", form_bodies(
        [{"csrf": csrf_admin, "overlap": "2", "active": "on"}], 100, 6), False, problems, statuses)
    post_all(admin, "/admin/invite", form_bodies([{"csrf": csrf_admin, "name": "newbie", "role": "labeler"}], 100, 7),
             False, problems, statuses)
    screen = live.store.create_batch("screen", "demonstration", [task_item("demonstration", {"prompt": "Hi?"}, "t")],
                                     overlap=1, source="t", actor="t", screening={"demonstration": 6})
    candidate = join(live, "candidate")
    assert candidate.post(f"/api/assignments/{lease(candidate, screen)['id']}", json={"answer": "Hello."}).json()
    live.store.update_batch(screen, "t", active=False)  # the review stays open; nobody else is gated
    (review,) = live.store.pending_reviews()
    post_all(admin, f"/admin/reviews/{review['label_id']}", form_bodies([{"csrf": csrf_admin, "score": "5"}], 100, 10),
             False, problems, statuses)
    token = live.store.create_invite("invited", "labeler", "test")
    guest = httpx.Client(base_url=live.url, timeout=30)
    guest_csrf = form_csrf(guest.get(f"/invite/{token}").text)
    post_all(guest, f"/invite/{token}", form_bodies(
        [{"csrf": guest_csrf, "password": "x" * 12, "password2": "x" * 12}], 100, 8), False, problems, statuses)
    login = httpx.Client(base_url=live.url, timeout=30)
    login_csrf = form_csrf(login.get("/login").text)
    post_all(login, "/login", form_bodies([{"csrf": login_csrf, "name": "alice", "password": PASSWORD}], 100, 9),
             False, problems, statuses)
    for path in ("/a/%ED%A0%80", "/a/%00", "/next?batch=%ED%A0%80", "/next?batch=" + "9" * 5000,
                 "/api/next?batch=%FF", "/api/assignments/%ED%A0%80", "/admin/export/%ED%A0%80.jsonl",
                 "/invite/%ED%A0%80", "/static/%ED%A0%80", "/static/../app.py", "/a/" + "x" * 5000):
        response = alice.get(path)
        statuses[response.status_code] += 1
        problem = check_refusal(response, path.startswith("/api/"))
        if problem:
            problems.append(f"GET {path[:80]}: {problem}")
    elapsed = time.monotonic() - started
    print(f"form fuzz: {sum(statuses.values())} requests in {elapsed:.1f} s, statuses {dict(statuses)}")
    assert not problems, "\n".join(problems[:10])
    assert statuses[400] > 200
    still_serving(live, bids)


def test_the_guard_names_the_field_of_a_lone_surrogate_and_refuses_huge_numbers_and_deep_nesting(live):
    bids = one_of_each(live)
    alice = join(live, "alice")
    demo, skip = lease(alice, bids["demonstration"])["id"], lease(alice, bids["skip"])["id"]
    rank = lease(alice, bids["ranking"])["id"]

    def refused(url: str, raw: bytes, client: httpx.Client = alice) -> dict:
        response = client.post(url, content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        return response.json()

    assert "answer" in refused(f"/api/assignments/{demo}", b'{"answer": "Paris \\ud800"}')["error"]
    assert "turns.1" in refused(f"/api/assignments/{demo}", b'{"answer": "a", "turns": ["b", "\\udfff"]}')["error"]
    assert "reason" in refused(f"/api/assignments/{skip}/skip", b'{"reason": "\\ud800"}')["error"]
    guest = httpx.Client(base_url=live.url)
    guest.headers["X-CSRF-Token"] = guest.get("/api/csrf").json()["csrf"]
    assert "name" in refused("/api/login", b'{"name": "\\ud800", "password": "x"}', guest)["error"]
    assert "out of range" in refused(f"/api/assignments/{rank}", b'{"ranks": [1, 2, 3, ' + b"9" * 5000 + b"]}")[
        "error"]
    assert "out of range" in refused(f"/api/assignments/{rank}", b'{"ranks": [1, 2, 3, 1' + b"0" * 30 + b"]}")[
        "error"]
    for depth in (5000, 100_000):
        assert "nested" in refused(f"/api/assignments/{rank}", b"[" * depth + b"]" * depth)["error"]
    assert "finite" in refused(f"/api/assignments/{rank}", b'{"ranks": [NaN, 1, 2, 3]}')["error"]
    # The same on a form: invalid UTF-8 in a field is a 400 page naming it; an integer overflow is not a 500.
    csrf = alice.headers["X-CSRF-Token"]
    page = alice.post(f"/a/{skip}/skip", content=f"csrf={csrf}&reason=%ED%A0%80".encode(),
                      headers={"content-type": "application/x-www-form-urlencoded"})
    assert page.status_code == 400 and "reason" in page.text and page.headers["content-type"].startswith("text/html")
    assert alice.post(f"/a/{skip}/skip", content=b"reason=x", headers={"content-type": "text/plain"}).status_code == 415
    assert len(live.store.label_rows()) == 0  # nothing malformed was stored


def test_oversized_bodies_are_cut_off_and_the_server_keeps_serving(live):
    alice = join(live, "alice")
    bids = one_of_each(live)
    demo = lease(alice, bids["demonstration"])["id"]
    big = b'{"answer": "' + b"x" * (2 * MB) + b'"}'
    response = alice.post(f"/api/assignments/{demo}", content=big)
    assert response.status_code == 413 and "at most 1000000 bytes" in response.json()["error"]
    assert "content-security-policy" in response.headers

    def chunks():  # a streamed body with no Content-Length: read up to the limit, then cut off
        for _ in range(200):
            yield b"x" * MB

    with contextlib.suppress(httpx.TransportError):  # the server may close the connection before the client is done
        assert alice.post(f"/api/assignments/{demo}", content=chunks()).status_code == 413
    assert alice.post(f"/api/assignments/{demo}", json={"answer": "Paris."}).status_code == 200
    assert len(live.store.label_rows()) == 1


def test_invite_links_come_from_public_url_never_the_host_header(tmp_path):
    for public_url, expected in (("https://label.example.org/", "https://label.example.org/invite/"),
                                 ("", "/invite/")):
        live = Live(tmp_path / f"l{len(public_url)}.db", tmp_path / "s.secret", public_url=public_url)
        try:
            admin = join(live, "root", "admin")
            csrf = admin.headers["X-CSRF-Token"]
            page = admin.post("/admin/invite", data={"csrf": csrf, "name": "newbie", "role": "labeler"},
                              headers={"Host": "evil.example", "X-Forwarded-Host": "evil.example"})
            assert page.status_code == 200
            link = page.text.split('<code id="invite-url">', 1)[1].split("</code>", 1)[0]
            assert link.startswith(expected) and "evil" not in page.text
        finally:
            live.stop()


def test_done_tasks_cannot_be_skipped_unknown_flags_are_named_and_admin_form_errors_are_4xx(live):
    bids = one_of_each(live)
    alice, admin = join(live, "alice"), join(live, "root", "admin")
    aid = lease(alice, bids["rating"])["id"]
    unknown = alice.post(f"/api/assignments/{aid}", json={"likert": 4, "flags": ["hallucination", "rude", "wat"]})
    assert unknown.status_code == 400 and "'rude', 'wat'" in unknown.json()["error"]
    as_dict = alice.post(f"/api/assignments/{aid}", json={"likert": 4, "flags": {"rude": False}})
    assert as_dict.status_code == 400 and "'rude'" in as_dict.json()["error"]
    assert alice.post(f"/api/assignments/{aid}", json={"likert": 4, "flags": ["contains_pii"]}).status_code == 200
    skipped = alice.post(f"/api/assignments/{aid}/skip", json={"reason": "changed my mind"})
    assert skipped.status_code == 409 and "done" in skipped.json()["error"]
    page = alice.post(f"/a/{aid}/skip", data={"csrf": alice.headers["X-CSRF-Token"], "reason": "changed my mind"})
    assert page.status_code == 409
    assert live.store.label_rows()[0]["answer"]["flags"] == ["contains_pii"]  # the label is kept
    csrf = admin.headers["X-CSRF-Token"]
    for overlap in ("99999999999999999999", "0", "-3", "two", ""):
        response = admin.post(f"/admin/batches/{bids['rating']}", data={"csrf": csrf, "overlap": overlap})
        assert response.status_code == 400 and "overlap" in response.text, overlap
    assert admin.post("/admin/invite", data={"csrf": csrf, "name": "has space", "role": "labeler"}).status_code == 400
    assert admin.post("/admin/invite", data={"csrf": csrf, "name": "x", "role": "god"}).status_code == 400
    assert admin.post(f"/admin/batches/{bids['rating']}", data={"csrf": csrf, "overlap": "3"}).status_code == 303


def test_the_database_is_created_owner_only_and_errors_carry_the_security_headers(tmp_path):
    live = Live(tmp_path / "new" / "label.db", tmp_path / "label.secret")
    try:
        alice = join(live, "alice")  # writes, so the -wal file exists too
        for path in (tmp_path / "new").iterdir():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        # An internal error (a bug, not the client): a generic page with the headers, no exception text.
        app = live.server.config.app

        async def broken() -> None:
            raise RuntimeError("secret internals: /etc/shadow")

        app.add_api_route("/broken", broken)
        app.add_api_route("/api/broken", broken)
        for path in ("/broken", "/api/broken"):
            response = alice.get(path)
            assert response.status_code == 500 and "secret internals" not in response.text
            assert "content-security-policy" in response.headers and response.headers["x-frame-options"] == "DENY"
        for response in (alice.get("/a/nope"), alice.get("/api/assignments/nope"), httpx.get(f"{live.url}/nowhere")):
            assert response.status_code == 404 and "content-security-policy" in response.headers
        assert alice.get("/api/next").status_code == 200  # still serving
    finally:
        live.stop()


def rss_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(field)


def test_40_concurrent_wrong_passwords_get_at_most_the_limit_of_401s_in_bounded_memory(tmp_path):
    """A real `chatloop label serve` process with the default argon2 (64 MiB a hash) and login limit 5."""
    db, secret = tmp_path / "label.db", tmp_path / "label.secret"
    store = LabelStore(str(db), load_secret(secret))
    store.accept_invite(store.create_invite("alice", "labeler", "test"), PasswordHasher().hash(PASSWORD))
    store.close()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "chatloop.cli", "label", "serve", f"--db={db}",
                                f"--secret_file={secret}", f"--port={port}"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0]
            time.sleep(0.1)
        before = rss_mb(process.pid, "VmRSS")

        async def guesses() -> Counter:
            async with httpx.AsyncClient(base_url=url, timeout=120,
                                         limits=httpx.Limits(max_connections=40)) as client:
                client.headers["X-CSRF-Token"] = (await client.get("/api/csrf")).json()["csrf"]
                replies = await asyncio.gather(*(client.post("/api/login", json={"name": "alice",
                                                                                 "password": f"guess {i}"})
                                                 for i in range(40)))
                return Counter(r.status_code for r in replies)

        started = time.monotonic()
        statuses = run_async(guesses())
        elapsed = time.monotonic() - started
        peak = rss_mb(process.pid, "VmHWM")
        print(f"40 concurrent wrong logins: {dict(statuses)} in {elapsed:.2f} s; RSS {before:.0f} MB before, "
              f"peak {peak:.0f} MB")
        assert 1 <= statuses[401] <= 5 and statuses[429] == 40 - statuses[401], statuses
        assert peak < 300

        def login(address: str, password: str) -> int:
            with httpx.Client(base_url=url, timeout=60,
                              transport=httpx.HTTPTransport(local_address=address)) as client:
                client.headers["X-CSRF-Token"] = client.get("/api/csrf").json()["csrf"]
                return client.post("/api/login", json={"name": "alice", "password": password}).status_code

        assert login("127.0.0.1", PASSWORD) == 429  # this client is locked out of this name for the window
        assert login("127.0.0.2", PASSWORD) == 200  # the real user, elsewhere, is not

        # Big bodies from a third address: refused at the limit, never buffered whole.
        with httpx.Client(base_url=url, timeout=60, transport=httpx.HTTPTransport(local_address="127.0.0.3")) as c:
            c.headers["X-CSRF-Token"] = c.get("/api/csrf").json()["csrf"]
            name = c.post("/api/login", json={"name": "n" * (50 * MB), "password": "x"})
            assert name.status_code == 413

            def chunks():
                for _ in range(200):
                    yield b"x" * MB

            # The server may close the connection at the limit, before the client has finished sending.
            with contextlib.suppress(httpx.TransportError):
                assert c.post("/api/login", content=chunks()).status_code == 413
        peak = rss_mb(process.pid, "VmHWM")
        print(f"after a 50 MB name and a 200 MB streamed body: peak RSS {peak:.0f} MB")
        assert peak < 300
        assert httpx.get(f"{url}/healthz").status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_password_hashes_run_a_bounded_number_at_a_time(tmp_path):
    """max_hashes=1 and a slow argon2: concurrent logins (distinct names, so no rate limit applies) take turns
    at the one hashing slot, and those that wait longer than hash_wait_s get 429 instead of piling up."""
    slow = PasswordHasher(time_cost=30, memory_cost=8192, parallelism=1)
    started = time.perf_counter()
    slow.hash("x")
    one_hash = time.perf_counter() - started
    live = Live(tmp_path / "l.db", tmp_path / "s.secret", hasher=slow, max_hashes=1, hash_wait_s=2 * one_hash)
    try:
        async def logins() -> Counter:
            async with httpx.AsyncClient(base_url=live.url, timeout=60) as client:
                client.headers["X-CSRF-Token"] = (await client.get("/api/csrf")).json()["csrf"]
                replies = await asyncio.gather(*(client.post("/api/login", json={"name": f"user{i}", "password": "x"})
                                                 for i in range(12)))
                return Counter(r.status_code for r in replies)

        statuses = run_async(logins())
        print(f"12 concurrent logins, 1 hash at a time ({one_hash * 1000:.0f} ms each): {dict(statuses)}")
        assert set(statuses) == {401, 429} and statuses[401] <= 6, statuses
        busy = httpx.Client(base_url=live.url)
        busy.headers["X-CSRF-Token"] = busy.get("/api/csrf").json()["csrf"]
        assert busy.post("/api/login", json={"name": "user0", "password": "x"}).status_code == 401  # free again
    finally:
        live.stop()
