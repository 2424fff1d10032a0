"""The labeling app under load: concurrent scripted labelers against `chatloop label serve` on SQLite.

    .venv/bin/python benchmarks/label_throughput.py                     # 50 clients, 20 s timed
    .venv/bin/python benchmarks/label_throughput.py --clients 50 --seconds 30 --k 9

The server is its own process (`chatloop label serve`, as deployed: uvicorn, one process, SQLite in WAL
mode); the clients run in this process (asyncio and a minimal keep-alive HTTP/1.1 client, so that the load
generator takes little of the machine), one labeler each with its own session, in a loop: submit a K-wise
ranking for the current assignment and get the next assignment in the same reply
(`POST /api/assignments/ID?next=1`, one round trip per task). Timed: the submissions completed in the window
after a warm-up; latency is each submission's round trip as the client sees it (so it includes queueing on
this shared machine). Afterwards the database must hold exactly one label per submitted assignment.

Targets (issue 9): at least 300 submissions/s sustained with 50 clients; p99 latency under 200 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from argon2 import PasswordHasher  # noqa: E402

from chatloop.labeling.answers import task_item  # noqa: E402
from chatloop.labeling.secret import load_secret  # noqa: E402
from chatloop.labeling.store import LabelStore  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Connection:
    """A minimal HTTP/1.1 keep-alive client (asyncio streams): the load generator should cost little CPU, so
    that the machine's cores go to the server (httpx costs about as much CPU per request as the server)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, headers: str) -> None:
        self.reader, self.writer, self.headers = reader, writer, headers

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        self.writer.write(f"{method} {path} HTTP/1.1\r\nHost: bench\r\n{self.headers}Content-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
        return status, await self.reader.readexactly(length)


async def labeler(port: int, token: str, csrf: str, k: int, start: float, stop: float,
                  out: list[tuple[float, float]], submitted: list[str]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conn = Connection(reader, writer, f"Cookie: chatloop_session={token}\r\nX-CSRF-Token: {csrf}\r\n")
    view = json.loads((await conn.request("GET", "/api/next"))[1])["assignment"]
    body = json.dumps({"ranks": list(range(1, k + 1))}).encode()
    while view is not None and time.perf_counter() < stop:
        t0 = time.perf_counter()
        status, reply = await conn.request("POST", f"/api/assignments/{view['id']}?next=1", body)
        t1 = time.perf_counter()
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {reply[:200]!r}")
        submitted.append(view["id"])
        if t1 >= start:
            out.append((t1, t1 - t0))
        view = json.loads(reply)["next"]
    writer.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=20.0, help="timed window")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--k", type=int, default=4, help="responses per ranking task")
    ap.add_argument("--tasks", type=int, default=30000)
    ap.add_argument("--port", type=int, default=18731)
    ap.add_argument("--out", default=str(RESULTS / "label_throughput.json"))
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="label-bench-"))
    db, secret_file = tmp / "label.db", tmp / "label.secret"
    store = LabelStore(str(db), load_secret(secret_file))
    items = [task_item("ranking", {"prompt": f"Question {i}: which answer is best?",
                                   "responses": [f"Answer {j} to question {i}. " * 8 for j in range(args.k)]}, "x")
             for i in range(args.tasks)]
    store.create_batch("bench", "ranking", items, overlap=1, source="benchmark", actor="bench")
    hasher = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    tokens = []
    for i in range(args.clients):
        uid = store.accept_invite(store.create_invite(f"labeler{i:03d}", "labeler", "bench"), hasher.hash("x" * 12))
        tokens.append(store.create_session(uid))
    store.close()

    server = subprocess.Popen([sys.executable, "-m", "chatloop.cli", "label", "serve", f"--db={db}",
                               f"--secret_file={secret_file}", f"--port={args.port}"],
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    url = f"http://127.0.0.1:{args.port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        samples: list[tuple[float, float]] = []
        submitted: list[str] = []
        csrfs = [httpx.get(f"{url}/api/csrf", cookies={"chatloop_session": tok}).json()["csrf"] for tok in tokens]

        async def run() -> None:
            await asyncio.gather(*(labeler(args.port, tok, csrf, args.k, start, stop, samples, submitted)
                                   for tok, csrf in zip(tokens, csrfs)))

        cpu0, client0 = cpu_seconds(server.pid), time.process_time()
        t0 = time.perf_counter()
        start, stop = t0 + args.warmup, t0 + args.warmup + args.seconds
        asyncio.run(run())
        server_cpu, client_cpu = cpu_seconds(server.pid) - cpu0, time.process_time() - client0
    finally:
        server.terminate()
        server.wait(30)

    timed = [s for s in samples if start <= s[0] <= stop]
    latencies = sorted(d for _, d in timed)

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1000

    store = LabelStore(str(db), load_secret(secret_file))
    rows = store.label_rows()
    store.close()
    assert len(rows) == len(submitted) == len(set(submitted)), (len(rows), len(submitted))
    result = {
        "clients": args.clients, "k": args.k, "seconds": args.seconds,
        "submissions_per_s": len(timed) / args.seconds,
        "latency_ms": {"p50": pct(50), "p90": pct(90), "p99": pct(99), "max": latencies[-1] * 1000,
                       "mean": statistics.fmean(latencies) * 1000},
        "labels_in_db": len(rows), "submissions": len(submitted),
        "server_cpu_ms_per_submission": 1000 * server_cpu / max(1, len(submitted)),
        "client_cpu_ms_per_submission": 1000 * client_cpu / max(1, len(submitted)),
        "load_average_after": os.getloadavg(), "cpus": os.cpu_count(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
