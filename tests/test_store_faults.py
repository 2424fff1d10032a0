"""A full disk under the labeling app and the prompt store, on a real small file system (a tmpfs, tests.conftest):
a write that finds no room is refused with 507 saying that nothing was stored (never acknowledged and then lost),
reads go on, and once there is room the same request is stored."""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import sqlite3
from pathlib import Path

import httpx
import pytest

from chatloop.data.prompts import PromptStore
from chatloop.errors import DiskFull
from chatloop.labeling.secret import load_secret
from chatloop.labeling.store import LabelStore
from tests.conftest import tmpfs
from tests.test_label import FAST_HASH, PASSWORD, free_port, ranking_items
from tests.test_label_load import start
from tests.test_serve import LiveServer, config, feedback_post, model_dir  # noqa: F401 - model_dir: a fixture

DISK = 4 << 20


def fill(directory: Path) -> Path:
    """A file that takes every free byte of the file system at `directory` (written until ENOSPC)."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        for chunk in (1 << 20, 4096, 1):
            try:
                while True:
                    f.write(bytes(chunk))
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
    return filler


def test_a_label_sent_to_a_full_disk_is_refused_with_507_reads_go_on_and_it_is_stored_once_there_is_room(tmp_path):
    disk = tmp_path / "disk"
    with tmpfs(disk, DISK):
        db = disk / "label.db"
        store = LabelStore(str(db), load_secret(tmp_path / "label.secret"))
        store.create_batch("b", "ranking", ranking_items(10), overlap=1, source="test", actor="t")
        clients = []
        for name in ("ann", "bob"):  # sessions made in the store: no password hashing
            token = store.create_session(store.accept_invite(store.create_invite(name, "labeler", "t"),
                                                             FAST_HASH.hash(PASSWORD)))
            csrf = hmac.new(store.secret, b"csrf:" + token.encode(), hashlib.sha256).hexdigest()
            clients.append((token, csrf))
        store.close()  # the last connection checkpoints the WAL away: the server's writes need new pages
        port = free_port()
        process = start(db, tmp_path / "label.secret", port)
        acked: dict[str, str] = {}  # assignment -> the label the server acknowledged
        try:
            ann, bob = (httpx.Client(base_url=f"http://127.0.0.1:{port}", cookies={"chatloop_session": token},
                                     headers={"X-CSRF-Token": csrf}, timeout=10) for token, csrf in clients)

            def submit(client: httpx.Client, aid: str, **params: str) -> httpx.Response:
                reply = client.post(f"/api/assignments/{aid}", params=params, json={"ranks": [1, 2, 3, 4]})
                if reply.status_code == 200:
                    acked[aid] = reply.json()["label"]
                return reply

            first = ann.get("/api/next").json()["assignment"]["id"]
            assert submit(ann, first).status_code == 200
            held = {c: c.get("/api/next").json()["assignment"]["id"] for c in (ann, bob)}  # leased with room
            filler = fill(disk)
            refused = [submit(ann, held[ann]), submit(bob, held[bob], next="1")]  # submit, and submit-then-next
            for reply in refused:
                assert reply.status_code == 507, reply.text
                assert reply.json() == {"error": reply.json()["error"], "stored": False}
                assert reply.json()["error"].startswith("not stored: the server's disk is full")
                assert "send it again" in reply.json()["error"] and reply.headers["retry-after"] == "60"
            # reads go on
            assert ann.get("/healthz").status_code == 200
            again = ann.get("/api/next")
            assert again.status_code == 200 and again.json()["assignment"]["id"] == held[ann]  # still leased
            view = ann.get(f"/api/assignments/{first}")
            assert view.status_code == 200 and view.json()["status"] == "done"
            assert ann.get(f"/api/assignments/{held[ann]}").json()["status"] == "leased"  # nothing half-stored
            assert ann.get("/").status_code == 200  # a page
            filler.unlink()
            for client in (ann, bob):
                assert submit(client, held[client]).status_code == 200
                nxt = client.get("/api/next").json()["assignment"]["id"]
                assert submit(client, nxt).status_code == 200
        finally:
            process.terminate()
            process.wait(30)
        with sqlite3.connect(db) as conn:
            stored = dict(conn.execute("SELECT assignment_id, id FROM labels").fetchall())
        conn.close()
    assert len(acked) == 5 and stored == acked  # every acknowledged label, each once, and nothing else


def test_a_prompt_or_judgement_that_cannot_be_logged_is_refused_with_507_and_logged_once_there_is_room(
        model_dir, tmp_path):  # noqa: F811 - the fixture
    """`chatloop serve` logs each prompt before answering it: with no room for its request log the request is
    refused unanswered, the log is not left with half a line, and the page's feedback is refused the same way."""
    disk = tmp_path / "disk"
    with tmpfs(disk, DISK):
        cfg = config(model_dir, disk)
        server = LiveServer(cfg)
        try:
            def ask(question: str) -> httpx.Response:
                return httpx.post(f"{server.url}/v1/completions", headers={"Authorization": "Bearer sk-alice"},
                                  json={"model": "tiny-chat", "prompt": question, "max_tokens": 2}, timeout=30)

            judgement = {"id": "thumb-0001", "kind": "thumb", "answer": "To the river.", "value": "up",
                         "messages": [{"role": "user", "content": "Where does the fox run?"}]}
            filler = fill(disk)
            for reply in (ask("Refused: where does the fox run?"), feedback_post(server.url, "sk-alice", judgement)):
                assert reply.status_code == 507, reply.text
                assert reply.json()["error"] == {
                    "message": "The server's disk is full (or failing): nothing of this request was stored (a prompt "
                               "is answered only once it is logged); retry later.",
                    "type": "server_error", "param": None, "code": "insufficient_storage"}
            models = httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer sk-alice"})
            assert models.status_code == 200  # reads go on
            assert Path(cfg.request_log).read_bytes() == b""  # no half line
            filler.unlink()
            assert ask("Answered: where does the fox run?").status_code == 200
            assert feedback_post(server.url, "sk-alice", judgement).json() == {"logged": True, "new": True}
        finally:
            server.close()
        lines = Path(cfg.request_log).read_text(encoding="utf-8").splitlines()
        assert [json.loads(line)["prompt"] for line in lines] == ["Answered: where does the fox run?"]
        store = PromptStore(cfg.db, create=False)
        assert [r.prompt for r in store.load_rows()] == ["Answered: where does the fox run?"]
        assert [r["answers"] for r in store.feedback_rows()] == [["To the river."]]
        store.engine.dispose()


def test_an_ingest_into_a_full_disk_is_disk_full_stores_nothing_and_runs_again_once_there_is_room(tmp_path):
    records = tmp_path / "prompts.jsonl"
    records.write_text("".join(json.dumps({"prompt": f"question {i} " + "x" * 200, "user_id": f"u{i % 7}"}) + "\n"
                               for i in range(2000)))
    disk = tmp_path / "disk"
    with tmpfs(disk, DISK):
        store = PromptStore(str(disk / "prompts.db"))
        filler = fill(disk)
        with pytest.raises(DiskFull, match=rf"^{disk}/prompts.db: cannot write to the prompt store: database or disk "
                                           r"is full \(0 bytes free there\); nothing of this write was stored: make "
                                           "room and run it again$"):
            store.ingest_file(records)
        assert store.stats()["prompts"] == 0 and store.stats()["ingests"] == 0
        filler.unlink()
        result = store.ingest_file(records)
        assert (result.added, store.stats()["prompts"]) == (2000, 2000)
        store.engine.dispose()
