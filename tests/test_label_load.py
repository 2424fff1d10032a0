"""kill -9 of a real `chatloop label serve` process, twice, under 30 concurrent labelers: every label the
server acknowledged is in the database afterwards, and none is stored twice."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from chatloop.labeling.secret import load_secret
from chatloop.labeling.store import LabelStore
from tests.test_label import FAST_HASH, PASSWORD, free_port, ranking_items

LABELERS, OVERLAP = 30, 2


def start(db: Path, secret: Path, port: int) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "chatloop.cli", "label", "serve", f"--db={db}",
                                f"--secret_file={secret}", f"--port={port}"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        assert process.poll() is None and time.monotonic() < deadline, "chatloop label serve did not start"
        time.sleep(0.05)


@pytest.mark.slow
def test_kill_9_twice_under_load_loses_and_duplicates_no_acknowledged_label(tmp_path):
    db, secret = tmp_path / "label.db", tmp_path / "label.secret"
    store = LabelStore(str(db), load_secret(secret))
    store.create_batch("b", "ranking", ranking_items(3000), overlap=OVERLAP, source="test", actor="t")
    people = []
    for i in range(LABELERS):  # sessions made in the store: no password hashing in the timed part
        uid = store.accept_invite(store.create_invite(f"l{i}", "labeler", "test"), FAST_HASH.hash(PASSWORD))
        token = store.create_session(uid)
        people.append((token, hmac.new(store.secret, b"csrf:" + token.encode(), hashlib.sha256).hexdigest()))
    store.close()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    acked: dict[str, str] = {}  # assignment -> the label id the server acknowledged
    errors: list[str] = []
    retries = [0]
    stop = threading.Event()

    async def labeler(token: str, csrf: str) -> None:
        async with httpx.AsyncClient(base_url=url, cookies={"chatloop_session": token},
                                     headers={"X-CSRF-Token": csrf}, timeout=10) as client:
            view = None
            while not stop.is_set():
                try:
                    if view is None:
                        view = (await client.get("/api/next")).json()["assignment"]
                        if view is None:
                            return
                    reply = await client.post(f"/api/assignments/{view['id']}", params={"next": "1"},
                                              json={"ranks": [1, 2, 3, 4]})
                except httpx.TransportError:  # the server is down: send the same submission again
                    retries[0] += 1
                    await asyncio.sleep(0.05)
                    continue
                if reply.status_code != 200:
                    errors.append(f"{reply.status_code}: {reply.text[:200]}")
                    return
                body = reply.json()
                if acked.get(view["id"], body["label"]) != body["label"]:
                    errors.append(f"assignment {view['id']}: acknowledged as two labels")
                acked[view["id"]] = body["label"]
                view = body["next"]

    async def everyone() -> None:
        await asyncio.gather(*(labeler(token, csrf) for token, csrf in people))

    started = time.monotonic()
    process = start(db, secret, port)
    load = threading.Thread(target=asyncio.run, args=(everyone(),))
    load.start()
    counts = []
    try:
        for _ in range(2):
            time.sleep(3)
            process.send_signal(signal.SIGKILL)
            process.wait()
            counts.append(len(acked))
            process = start(db, secret, port)
        time.sleep(3)
    finally:
        stop.set()
        load.join(60)
        counts.append(len(acked))
        process.terminate()
        process.wait(30)
    elapsed = time.monotonic() - started
    conn = sqlite3.connect(db)
    stored = dict(conn.execute("SELECT assignment_id, id FROM labels").fetchall())
    lost = [aid for aid, label in acked.items() if stored.get(aid) != label]
    duplicated = conn.execute("SELECT COUNT(*) FROM (SELECT task_id, user_id FROM labels GROUP BY task_id, user_id "
                              "HAVING COUNT(*) > 1)").fetchone()[0]
    over = conn.execute("SELECT COUNT(*) FROM (SELECT task_id FROM labels GROUP BY task_id HAVING COUNT(*) > ?)",
                        (OVERLAP,)).fetchone()[0]
    not_done = conn.execute("SELECT COUNT(*) FROM labels JOIN assignments ON assignments.id = labels.assignment_id "
                            "WHERE assignments.status != 'done'").fetchone()[0]
    print(f"kill -9 twice under {LABELERS} labelers in {elapsed:.0f} s: {len(acked)} acknowledged labels "
          f"(after each kill: {counts}), {len(stored)} stored, {retries[0]} retried requests, {len(lost)} lost, "
          f"{duplicated} duplicated")
    assert not errors, errors[:5]
    assert counts[0] > 0 and counts[1] > counts[0] and counts[2] > counts[1]  # work went on after each restart
    assert not lost and duplicated == 0 and over == 0 and not_done == 0
    assert len(stored) >= len(acked)  # the rest: committed, then killed before the reply went out
