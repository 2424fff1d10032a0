"""Serving throughput: generated tokens/s and request latency of `chatloop serve` with 1, 8 and 32 clients.

    .venv/bin/python benchmarks/serve_throughput.py                 # tiny preset, ~2 min on 2 idle cores
    .venv/bin/python benchmarks/serve_throughput.py --preset small --clients 1 8
    .venv/bin/python benchmarks/serve_throughput.py --quick         # smoke run

The parent trains a small tokenizer, builds the preset with random weights (seeded) and saves it with
`save_model`, then starts `chatloop serve` on it in a subprocess (its torch on --threads threads) and drives
it with C concurrent streaming clients (httpx, one asyncio task each, in this process). Each client sends
--requests requests one after another to /v1/chat/completions with `stream: true`, `max_tokens: N` and
`min_tokens: N` (chatloop's extension, as in vLLM: stop tokens are masked until N tokens), so that every
request generates exactly N tokens, which is checked from the `include_usage` chunk.

Figures per C: aggregate tokens/s (all generated tokens / the wall time of the whole round), p50 and p99
of request latency (request sent -> [DONE]) and of time to first token, and the batcher's mean rows per
decoding step over the round (from /v1/stats). A warmup round of one request runs first. The target: with
8 clients, at least 3x the tokens/s of one client (batching, not serving one request after another).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench  # noqa: E402
import httpx  # noqa: E402
import torch  # noqa: E402

TARGET_RATIO = 3.0
KEY = "sk-bench"
WORDS = [
    "red", "blue", "green", "brown", "fox", "dog", "cat", "bird", "jumps", "runs", "sleeps", "over", "under", "near",
    "the", "a", "lazy", "quick", "small", "big", "river", "hill", "town", "forest", "and", "then", "because", "why",
    "how", "where", "when", "what", "who", "answer", "question", "tell", "me",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", help="model.PRESETS name (random weights)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients per round")
    p.add_argument("--requests", type=int, default=4, help="requests per client per round")
    p.add_argument("--tokens", type=int, default=64, help="tokens generated per request (max_tokens = min_tokens)")
    p.add_argument("--max-batch", type=int, default=32, help="chatloop serve --max_batch")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server process")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 request per client, 16 tokens")
    p.add_argument("--out", default=str(_bench.RESULTS / "serve_throughput.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.tokens = 1, 16
    return args


def build_checkpoint(root: Path, preset_name: str) -> Path:
    from chatloop.checkpoint import save_model
    from chatloop.model import GPT, preset
    from chatloop.tokenizer import TokenizerConfig, train_tokenizer

    rng = random.Random(0)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(3000)) + "\n")
    tokenizer = train_tokenizer(TokenizerConfig(inputs=[str(corpus)], out=str(root / "tokenizer"), vocab_size=2048))
    torch.manual_seed(0)
    model = GPT(preset(preset_name, {"vocab_size": tokenizer.vocab_size}))  # every sampled id is text
    out = root / f"{preset_name}-random"
    save_model(model, out, tokenizer)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompt(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(8 + i % 9)) + "?"}]


async def one_request(client: httpx.AsyncClient, i: int, tokens: int) -> dict[str, float]:
    body = {"model": "bench", "messages": prompt(i), "stream": True, "max_tokens": tokens, "min_tokens": tokens,
            "temperature": 1.0, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    usage = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {await response.aread()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
            if chunk.get("usage"):
                usage = chunk["usage"]
    end = time.perf_counter()
    if usage is None or usage["completion_tokens"] != tokens:
        raise RuntimeError(f"expected {tokens} generated tokens, got usage {usage}")
    return {"latency": end - start, "ttft": (first or end) - start, "tokens": tokens}


async def round_(url: str, clients: int, requests: int, tokens: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=600,
                                 limits=limits) as client:
        before = (await client.get("/v1/stats")).json()

        async def worker(c: int) -> list[dict[str, float]]:
            return [await one_request(client, c * requests + r, tokens) for r in range(requests)]

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(c) for c in range(clients))) for r in rs]
        wall = time.perf_counter() - start
        after = (await client.get("/v1/stats")).json()
    latencies = sorted(r["latency"] for r in results)
    ttfts = sorted(r["ttft"] for r in results)

    def pct(values: list[float], q: float) -> float:
        return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]

    steps = after["steps"] - before["steps"]
    return {
        "clients": clients, "requests": len(results), "tokens_per_request": tokens, "wall_s": wall,
        "tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "latency_p50_s": pct(latencies, 50), "latency_p99_s": pct(latencies, 99),
        "ttft_p50_s": pct(ttfts, 50), "ttft_p99_s": pct(ttfts, 99),
        "mean_rows_per_step": (after["row_steps"] - before["row_steps"]) / max(steps, 1),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = build_checkpoint(root, args.preset)
        port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(Path(__file__).parents[1])}
        server = subprocess.Popen(
            [sys.executable, "-m", "chatloop.cli", "serve", "--model", str(model_dir), "--model_name", "bench",
             "--port", str(port), "--api_keys", f"{KEY}:bench", "--db", str(root / "prompts.db"),
             "--request_log", str(root / "requests.jsonl"), "--max_batch", str(args.max_batch),
             "--max_queue", "256", "--device", args.device], env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 900  # minutes on a loaded machine
            while True:
                try:
                    httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).raise_for_status()
                    break
                except httpx.TransportError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit("chatloop serve did not start") from None
                    time.sleep(0.3)
            asyncio.run(round_(url, 1, 1, args.tokens))  # warmup
            rounds = []
            for clients in args.clients:
                result = asyncio.run(round_(url, clients, args.requests, args.tokens))
                rounds.append(result)
                print(f"{clients:>3} clients: {result['tokens_per_s']:8.1f} tokens/s, latency p50 "
                      f"{result['latency_p50_s']:.2f} s p99 {result['latency_p99_s']:.2f} s, ttft p50 "
                      f"{result['ttft_p50_s']:.3f} s, {result['mean_rows_per_step']:.1f} rows/step "
                      f"(load {result['load_average_1min']})", flush=True)
        finally:
            server.terminate()
            server.wait(timeout=30)
    by_clients = {r["clients"]: r for r in rounds}
    report: dict[str, Any] = {"machine": _bench.machine(torch.device(args.device)), "args": vars(args),
                              "rounds": rounds}
    if 1 in by_clients and 8 in by_clients:
        ratio = by_clients[8]["tokens_per_s"] / by_clients[1]["tokens_per_s"]
        report["ratio_8_vs_1"] = ratio
        print(f"8 clients / 1 client: {ratio:.2f}x (target >= {TARGET_RATIO}x): "
              f"{'met' if ratio >= TARGET_RATIO else 'NOT met'}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
