"""The labeling app over real SQLite and a real uvicorn server: assignment, idempotence, security, exports."""

from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
import stat
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from argon2 import PasswordHasher

from chatloop.checkpoint import save_model
from chatloop.data.readers import read_demonstrations, read_rankings
from chatloop.errors import UserError
from chatloop.labeling.answers import BadAnswer, check_answer, task_item
from chatloop.labeling.app import create_app
from chatloop.labeling.commands import BatchConfig, LabelExportConfig, LabelServeConfig, batch, export, serve
from chatloop.labeling.quality import agreement
from chatloop.labeling.reports import plan, report
from chatloop.labeling.secret import load_secret
from chatloop.labeling.store import LabelStore
from chatloop.model import GPT, preset
from chatloop.tokenizer import Tokenizer
from tests.conftest import run_cli

PASSWORD = "correct horse battery"
FAST_HASH = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)  # argon2 still, cheaper for tests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Live:
    """The app on a real uvicorn server in a thread, over an SQLite file."""

    def __init__(self, db: Path, secret_file: Path, **app_args) -> None:
        self.db, self.secret_file = db, secret_file
        self.store = LabelStore(str(db), load_secret(secret_file))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = create_app(self.store, **{"hasher": FAST_HASH, **app_args})
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 10
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.store.close()


@pytest.fixture
def live(tmp_path):
    app = Live(tmp_path / "label.db", tmp_path / "label.secret")
    yield app
    app.stop()


def form_csrf(html: str) -> str:
    return re.search(r'name="csrf" value="([0-9a-f]+)"', html).group(1)


def join(live: Live, name: str, role: str = "labeler") -> httpx.Client:
    """A person accepts an invite in the browser way (form posts), then scripts the JSON API."""
    token = live.store.create_invite(name, role, "test")
    client = httpx.Client(base_url=live.url, timeout=30)
    page = client.get(f"/invite/{token}")
    assert page.status_code == 200
    done = client.post(f"/invite/{token}", data={"csrf": form_csrf(page.text), "password": PASSWORD,
                                                  "password2": PASSWORD})
    assert done.status_code == 303, done.text
    client.headers["X-CSRF-Token"] = client.get("/api/csrf").json()["csrf"]
    return client


def ranking_items(n: int, k: int = 4, author: str | None = None) -> list[dict]:
    return [task_item("ranking", {"prompt": f"question {i}", "responses": [f"answer {i}.{j}" for j in range(k)],
                                  **({"user_id": author} if author else {})}, f"t{i}") for i in range(n)]


def by_text_order(view: dict) -> list[int]:
    """Ranks (shown order) that put answer x.0 first, x.1 second, ... whatever order they were shown in."""
    return [int(r.rsplit(".", 1)[1]) + 1 for r in view["responses"]]


# -- the acceptance round: checkpoint -> ranking batch -> labelers over HTTP -> export -> chatloop rm -----------


@pytest.fixture
def tiny_checkpoint(tmp_path, tokenizer_dir) -> Path:
    tok = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(0)
    cfg = preset("tiny", {"vocab_size": tok.vocab_size, "n_layer": 1, "n_head": 2, "n_kv_head": 1, "d_model": 32,
                          "max_seq_len": 96})
    save_model(GPT(cfg), tmp_path / "policy", tok)
    return tmp_path / "policy"


def test_a_round_of_the_loop_goes_through_the_app(tmp_path, tiny_checkpoint):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Name a fox number {i}.", "user_id": f"user{i % 2}"}) + "\n"
                               for i in range(6)))
    db, secret = tmp_path / "label.db", tmp_path / "label.secret"
    batch(BatchConfig(kind="ranking", model=[str(tiny_checkpoint)], prompts=str(prompts), k=4, overlap=2,
                      max_new_tokens=12, db=str(db), secret_file=str(secret)))
    live = Live(db, secret)
    try:
        labelers = [join(live, name) for name in ("ann", "bob", "user0")]
        counts = Counter()
        for i, client in enumerate(labelers):
            while (view := client.get("/api/next").json()["assignment"]) is not None:
                assert view["kind"] == "ranking" and len(view["responses"]) == 4 and "model" not in json.dumps(view)
                ranks = [1 + (p + i) % 4 for p in range(4)]
                assert client.post(f"/api/assignments/{view['id']}", json={"ranks": ranks}).status_code == 200
                counts[i] += 1
        assert counts == {0: 6, 1: 6}  # overlap 2 filled by the first two; user0 wrote prompts, has none left
    finally:
        live.stop()
    out = tmp_path / "labels"
    export(LabelExportConfig(out=str(out), db=str(db), secret_file=str(secret)))
    rankings = read_rankings(out / "rankings.jsonl")
    assert len(rankings) == 12 and Counter(r["labeler_id"] for r in rankings) == {"ann": 6, "bob": 6}
    assert all(r["model"] == str(tiny_checkpoint) and len(r["responses"]) == 4 for r in rankings)
    assert len(read_rankings(out / "rankings_merged.jsonl")) == 6
    rm = run_cli("rm", f"--model={tiny_checkpoint}", f"--data={out / 'rankings.jsonl'}", f"--out={tmp_path / 'rm'}",
                 "--epochs=1", "--batch_size=4", "--seq_len=96", "--progress=false")
    assert rm.returncode == 0, rm.stderr
    assert json.loads((tmp_path / "rm" / "eval.json").read_text())["prompts"] >= 1


# -- assignment --------------------------------------------------------------------------------------------------


def make_user(store: LabelStore, name: str, role: str = "labeler"):
    store.accept_invite(store.create_invite(name, role, "test"), FAST_HASH.hash(PASSWORD))
    return store.user_by_name(name)


def test_overlap_gives_each_task_to_n_distinct_labelers_never_its_author_and_leases_expire(tmp_path):
    store = LabelStore(str(tmp_path / "l.db"), "x" * 40)
    people = [make_user(store, n) for n in ("a", "b", "c", "d")]
    bid = store.create_batch("b", "ranking", ranking_items(5, author="c"), overlap=3, source="test", actor="t")
    t0 = 1000.0
    # c wrote every prompt: c never gets a task
    assert store.next_assignment(people[2], bid, now=t0) is None
    # a leases a task and abandons it; the lease holds it until it expires
    abandoned = store.next_assignment(people[0], bid, lease_s=60, now=t0)
    assert store.next_assignment(people[0], bid, now=t0 + 1) == abandoned  # the live lease comes back
    done: dict[str, set[str]] = {}
    for step in range(100):
        person = [people[0], people[1], people[3]][step % 3]
        now = t0 + 120 + step  # a's first lease has expired by now
        aid = store.next_assignment(person, bid, now=now)
        if aid is None:
            continue
        view = store.assignment(person, aid)
        store.submit(person, aid, {"ranks": by_text_order(view)}, now=now)
        task = store.label_rows()[-1]["task_id"]
        assert person.name not in done.setdefault(task, set())
        done[task].add(person.name)
    assert len(done) == 5 and all(names == {"a", "b", "d"} for names in done.values())
    assert store.batch_list()[0]["remaining"] == 0
    store.update_batch(bid, "admin", overlap=4)  # an admin raises the overlap: a fourth labeler gets every task
    e = make_user(store, "e")
    while (aid := store.next_assignment(e, bid)) is not None:
        store.submit(e, aid, {"ranks": [1, 2, 3, 4]})
    assert Counter(r["task_id"] for r in store.label_rows()) == {task: 4 for task in done}
    store.close()


def test_submissions_are_idempotent_skips_go_to_someone_else_and_late_labels_are_kept(tmp_path):
    store = LabelStore(str(tmp_path / "l.db"), "x" * 40)
    a, b = make_user(store, "a"), make_user(store, "b")
    bid = store.create_batch("b", "ranking", ranking_items(1), overlap=1, source="test", actor="t")
    aid = store.next_assignment(a, bid, lease_s=10, now=0)
    first = store.submit(a, aid, {"ranks": [1, 2, 3, 4]}, now=100)  # after the lease expired: still stored
    assert first[1] is False and store.submit(a, aid, {"ranks": [4, 3, 2, 1]}) == (first[0], True)
    assert len(store.label_rows()) == 1 and store.next_assignment(b, bid) is None
    bid2 = store.create_batch("b2", "rating", [task_item("rating", {"prompt": "p", "response": "r"}, "x")],
                              overlap=1, source="test", actor="t")
    aid = store.next_assignment(a, bid2)
    with pytest.raises(BadAnswer):
        store.skip(a, aid, "  ")
    store.skip(a, aid, "not my language")
    assert store.next_assignment(a, bid2) is None and store.next_assignment(b, bid2) is not None
    store.close()


def test_answers_are_checked_and_stored_in_task_order_whatever_order_they_were_shown_in():
    payload = {"responses": ["w", "x", "y", "z"]}
    shown = [2, 0, 3, 1]  # shown position -> task index
    assert check_answer("ranking", "p", payload, shown, {"ranks": [1, 2, 2, 4]}) == {
        "ranks": [2, 3, 1, 2], "none_acceptable": False}  # dense ranks: ties kept
    assert check_answer("ranking", "p", payload, shown, {"none_acceptable": True})["ranks"] is None
    assert check_answer("comparison", "p", {"a": "1", "b": "2"}, [1, 0], {"winner": "a"}) == {"winner": "b"}
    assert check_answer("rating", "p", {"response": "r"}, [0], {"likert": 6, "flags": {"contains_pii": True}}) == {
        "likert": 6, "flags": ["contains_pii"]}
    demo = check_answer("demonstration", "hi", {}, [0], {"answer": "hello", "turns": ["and?", "and more"]})
    assert [m["role"] for m in demo["messages"]] == ["user", "assistant", "user", "assistant"]
    for kind, bad in [("ranking", {"ranks": [1, 2, 3]}), ("ranking", {"ranks": [1, 2, 3, 9]}),
                      ("rating", {"likert": 8}), ("rating", {"likert": 3, "flags": ["rude"]}),
                      ("comparison", {"winner": "c"}), ("demonstration", {"answer": " "}),
                      ("demonstration", {"answer": "a", "turns": ["only the user"]})]:
        with pytest.raises(BadAnswer):
            check_answer(kind, "p", {**payload, "response": "r", "a": "1", "b": "2"}, list(range(4)), bad)


def test_a_ranking_batch_from_samples_shows_each_distinct_answer_once():
    """Two copies of one sampled answer are one answer to a labeler: shown once, so they can never be ranked apart."""
    item = task_item("ranking", {"prompt": "p", "responses": ["a", "b", "a", "c", "b"],
                                 "ended": [True, False, True, True, False]}, "samples.jsonl:1")
    assert item["payload"] == {"responses": ["a", "b", "c"]}
    assert item["hidden"]["ended"] == [True, False, True] and item["hidden"]["duplicates_removed"] == 2
    with pytest.raises(UserError, match="at least 2 distinct answers, got 1"):
        task_item("ranking", {"prompt": "p", "responses": ["same", "same", "same"]}, "samples.jsonl:2")


def test_agreement_with_others_and_with_the_consensus_on_a_hand_made_case():
    # One task, K = 3. a = b exactly; c swaps the last two. Pairs (0,1), (0,2), (1,2).
    by_task = {"t": {"a": [1, 2, 3], "b": [1, 2, 3], "c": [1, 3, 2]}}
    result = agreement(by_task)
    # a-b agree on 3/3, a-c on 2/3, b-c on 2/3: overall 7/9; a: (3 + 2) / 6
    assert result["overall"] == pytest.approx(7 / 9) and result["pairs"] == 9
    assert result["labelers"]["a"]["with_others"] == pytest.approx(5 / 6)
    assert result["labelers"]["c"]["with_others"] == pytest.approx(4 / 6)
    # consensus of the others: for c it is mean(a, b) = [1, 2, 3] -> 2/3; for a it is mean(b, c) = [1, 2.5, 2.5]:
    # pairs (0,1) and (0,2) are strict and agree, (1,2) is a consensus tie -> 2/2
    assert result["labelers"]["c"]["with_consensus"] == pytest.approx(2 / 3)
    assert result["labelers"]["a"]["with_consensus"] == pytest.approx(1.0)
    # A tie in a labeler's own ranking gives no comparable pair.
    assert agreement({"t": {"a": [1, 1], "b": [1, 2]}})["pairs"] == 0


def test_gold_accuracy_stats_and_plan(tmp_path):
    store = LabelStore(str(tmp_path / "l.db"), "x" * 40)
    a = make_user(store, "a")
    items = [task_item("comparison", {"prompt": "p", "a": "good", "b": "bad", "gold": {"winner": "a"}}, "g"),
             task_item("comparison", {"prompt": "q", "a": "bad", "b": "good", "gold": {"winner": "b"}}, "g")]
    bid = store.create_batch("gold", "comparison", items, overlap=1, source="test", actor="t")
    while (aid := store.next_assignment(a, bid)) is not None:
        view = store.assignment(a, aid)
        store.submit(a, aid, {"winner": "a" if view["a"] == "good" else "b"} if view["prompt"][0]["content"] == "p"
                     else {"winner": "a" if view["a"] == "bad" else "b"})  # right on p, wrong on q
    stats = report(store).labelers["a"]
    assert stats["gold_tasks"] == 2 and stats["gold_accuracy"] == 0.5 and stats["labels"] == 2
    assert [round(r["days"], 2) for r in plan(1000, 100, [1, 4])] == [10.0, 2.5]
    store.close()


# -- over HTTP: security ---------------------------------------------------------------------------------------


def test_idor_another_labelers_task_is_not_found_and_admin_pages_are_forbidden(live):
    bid = live.store.create_batch("b", "ranking", ranking_items(2), overlap=1, source="test", actor="t")
    alice, mallory = join(live, "alice"), join(live, "mallory")
    view = alice.get("/api/next", params={"batch": bid}).json()["assignment"]
    aid = view["id"]
    assert len(aid) >= 16 and not aid.isdigit()  # random, not sequential
    assert mallory.get(f"/api/assignments/{aid}").status_code == 404
    assert mallory.post(f"/api/assignments/{aid}", json={"ranks": [1, 2, 3, 4]}).status_code == 404
    assert mallory.post(f"/api/assignments/{aid}/skip", json={"reason": "mine now"}).status_code == 404
    assert mallory.get(f"/a/{aid}").status_code == 404
    assert mallory.post(f"/a/{aid}", data={"csrf": mallory.headers["X-CSRF-Token"], "rank-0": "1"}).status_code == 404
    for path in ("/admin", "/admin/export/rankings.jsonl", "/api/admin/report"):
        assert mallory.get(path).status_code == 403
    assert httpx.get(f"{live.url}/api/assignments/{aid}").status_code == 401  # not logged in
    assert alice.post(f"/api/assignments/{aid}", json={"ranks": [1, 2, 3, 4]}).status_code == 200
    assert len(live.store.label_rows()) == 1  # mallory wrote nothing


def test_csrf_token_is_required_on_every_post_and_works_behind_a_proxy(live):
    bid = live.store.create_batch("b", "comparison", [task_item("comparison", {"prompt": "p", "a": "1", "b": "2"},
                                                                "t")], overlap=1, source="test", actor="t")
    alice, bob = join(live, "alice"), join(live, "bob")
    aid = alice.get("/api/next", params={"batch": bid}).json()["assignment"]["id"]
    token = alice.headers.pop("X-CSRF-Token")
    assert alice.post(f"/api/assignments/{aid}", json={"winner": "a"}).status_code == 403
    assert alice.post(f"/api/assignments/{aid}", json={"winner": "a"},
                      headers={"X-CSRF-Token": bob.headers["X-CSRF-Token"]}).status_code == 403  # bob's token
    assert alice.post(f"/a/{aid}", data={"winner": "a"}).status_code == 403
    assert alice.post("/logout", data={}).status_code == 403
    anonymous = httpx.Client(base_url=live.url)
    assert anonymous.post("/login", data={"name": "alice", "password": PASSWORD}).status_code == 403
    # What a TLS-terminating proxy sends: another Host, Origin and scheme. The token does not depend on them.
    proxied = {"X-CSRF-Token": token, "Host": "label.example.org", "Origin": "https://label.example.org",
               "X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"}
    assert alice.post(f"/api/assignments/{aid}", json={"winner": "a"}, headers=proxied).status_code == 200
    assert live.store.label_rows()[0]["answer"]["winner"] in ("a", "b")


def test_login_is_rate_limited_and_cookies_are_httponly_samesite(live, tmp_path):
    join(live, "alice")
    client = httpx.Client(base_url=live.url)
    client.headers["X-CSRF-Token"] = client.get("/api/csrf").json()["csrf"]
    good = client.post("/api/login", json={"name": "alice", "password": PASSWORD})
    assert good.status_code == 200
    cookie = good.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie and "secure" not in cookie
    assert "content-security-policy" in good.headers and good.headers["x-frame-options"] == "DENY"
    client.headers["X-CSRF-Token"] = good.json()["csrf"]  # the token follows the session
    for _ in range(5):
        assert client.post("/api/login", json={"name": "alice", "password": "wrong guess"}).status_code == 401
    assert client.post("/api/login", json={"name": "alice", "password": PASSWORD}).status_code == 429
    assert client.post("/api/login", json={"name": "nobody", "password": "x"}).status_code == 401
    secure = Live(tmp_path / "s.db", tmp_path / "s.secret", secure_cookies=True)
    try:
        assert "; secure" in httpx.get(f"{secure.url}/api/csrf").headers["set-cookie"].lower()
    finally:
        secure.stop()


def test_the_app_refuses_default_or_empty_secrets_and_generates_one_on_first_run(tmp_path, monkeypatch):
    generated = load_secret(tmp_path / "new.secret")
    assert len(generated) >= 32 and stat.S_IMODE(os.stat(tmp_path / "new.secret").st_mode) == 0o600
    assert load_secret(tmp_path / "new.secret") == generated
    for weak in ("", "changeme", "secret", "short-but-not-default"):
        (tmp_path / "weak.secret").write_text(weak)
        with pytest.raises(UserError, match="refusing"):
            serve(LabelServeConfig(db=str(tmp_path / "l.db"), secret_file=str(tmp_path / "weak.secret")))
    monkeypatch.setenv("CHATLOOP_LABEL_SECRET", "changeme")
    with pytest.raises(UserError, match="CHATLOOP_LABEL_SECRET"):
        load_secret(tmp_path / "new.secret")


def test_a_label_survives_a_restart_and_a_double_submit_stores_one(tmp_path):
    db, secret = tmp_path / "label.db", tmp_path / "label.secret"
    live = Live(db, secret)
    try:
        bid = live.store.create_batch("b", "rating", [task_item("rating", {"prompt": "p", "response": "r"}, "t")],
                                      overlap=1, source="test", actor="t")
        alice = join(live, "alice")
        aid = alice.get("/api/next", params={"batch": bid}).json()["assignment"]["id"]
        answer = {"likert": 5, "flags": ["hallucination", "contains_pii"]}
        first = alice.post(f"/api/assignments/{aid}", json=answer).json()
        again = alice.post(f"/api/assignments/{aid}", json=answer).json()
        assert again == {"label": first["label"], "duplicate": True}
    finally:
        live.stop()
    rows = sqlite3.connect(db).execute("SELECT id, answer FROM labels").fetchall()
    assert rows == [(first["label"], json.dumps({"likert": 5, "flags": ["contains_pii", "hallucination"]},
                                                 separators=(",", ":")))]
    live = Live(db, secret)  # a new process would do the same: nothing but the database carries over
    try:
        client = httpx.Client(base_url=live.url)
        client.headers["X-CSRF-Token"] = client.get("/api/csrf").json()["csrf"]
        assert client.post("/api/login", json={"name": "alice", "password": PASSWORD}).status_code == 200
        assert client.get(f"/api/assignments/{aid}").json()["answer"]["likert"] == 5
    finally:
        live.stop()


def test_many_labelers_submitting_at_once_lose_and_duplicate_nothing(live):
    bid = live.store.create_batch("b", "ranking", ranking_items(40), overlap=2, source="test", actor="t")
    clients = [join(live, f"l{i}") for i in range(8)]
    errors: list[str] = []

    def work(i: int, client: httpx.Client) -> None:
        view = client.get("/api/next", params={"batch": bid}).json()["assignment"]
        while view is not None:
            url, answer = f"/api/assignments/{view['id']}", {"ranks": by_text_order(view)}
            first = client.post(url, json=answer)
            again = client.post(url, json=answer, params={"next": "1"} if i % 2 else None)  # a retry
            if first.status_code != 200 or again.status_code != 200:
                errors.append(first.text + again.text)
                return
            if again.json()["label"] != first.json()["label"] or not again.json()["duplicate"]:
                errors.append(f"the retry of {view['id']} stored another label")
            # half the labelers get the next task with the submission (?next=1), half ask for it
            view = again.json()["next"] if i % 2 else client.get("/api/next", params={"batch": bid}).json()[
                "assignment"]

    threads = [threading.Thread(target=work, args=(i, c)) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    rows = live.store.label_rows()
    assert len(rows) == 80
    per_task = Counter(r["task_id"] for r in rows)
    assert set(per_task.values()) == {2} and len(per_task) == 40
    assert len({(r["task_id"], r["labeler"]) for r in rows}) == 80
    assert all(r["answer"]["ranks"] == [1, 2, 3, 4] for r in rows)  # shown order mapped back to task order


def test_batches_from_jsonl_and_the_prompt_store_exports_read_by_sft_and_audit(tmp_path):
    db, secret = tmp_path / "label.db", tmp_path / "label.secret"
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"prompt": "Say hi.", "user_id": "u1"}) + "\n"
                     + json.dumps({"prompt": [{"role": "user", "content": "Hello?"}]}) + "\n")
    common = [f"--db={db}", f"--secret_file={secret}"]
    made = run_cli("label", "batch", "--kind=demonstration", f"--data={tasks}", "--overlap=1", *common)
    assert made.returncode == 0, made.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "responses": ["only one"]}) + "\n")
    failed = run_cli("label", "batch", "--kind=ranking", f"--data={bad}", *common)
    assert failed.returncode == 2 and f"{bad}:1: field 'responses'" in failed.stderr
    from chatloop.data.prompts import IngestConfig, ingest

    ingest(IngestConfig(inputs=[str(tasks)], db=str(tmp_path / "prompts.db"), user_id="u2"))
    batch(BatchConfig(kind="demonstration", store=str(tmp_path / "prompts.db"), db=str(db), secret_file=str(secret)))
    store = LabelStore(str(db), load_secret(secret))
    a = make_user(store, "u2")
    while (aid := store.next_assignment(a)) is not None:
        store.submit(a, aid, {"answer": "Hi there!", "turns": ["Thanks.", "You are welcome."]})
    assert len(store.label_rows()) == 3  # 2 from JSONL, 1 from the store: never the prompt u2 wrote
    exported = run_cli("label", "export", f"--out={tmp_path / 'out'}", *common)
    assert exported.returncode == 0, exported.stderr
    conversations = read_demonstrations(tmp_path / "out" / "demonstrations.jsonl")
    assert len(conversations) == 3 and conversations[0][-1]["content"] == "You are welcome."
    actions = [a["action"] for a in store.audit_log()]
    assert actions.count("create_batch") == 2 and "invite" in actions and "export" in actions
    store.close()
