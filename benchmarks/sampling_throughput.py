"""Sampling throughput: chatloop.engine.generate against transformers' generate on the same model.

    .venv/bin/python benchmarks/sampling_throughput.py            # tiny and small, ~1 min on 2 idle cores
    .venv/bin/python benchmarks/sampling_throughput.py --quick    # smoke run, well under a minute
    .venv/bin/python benchmarks/sampling_throughput.py --threads 1 --clock cpu   # steadier on a busy machine
                                                                  # (3 min on the 2-core box at load 5)
    .venv/bin/python benchmarks/sampling_throughput.py --device cuda --precision bf16

For each preset, the parent builds chatloop's GPT with a fixed seed and exports it with `save_model`; one
worker process per side loads those weights (in the benchmark precision: bf16 weights for bf16, as one
serves a model) and samples continuations of the same batch of prompts of varied lengths, left-padded:

- chatloop: `generate(model, prompts, max_new_tokens, pad_id, stop_ids=[], temperature=1.0)`;
- transformers: `model.generate(input_ids, attention_mask, do_sample=True, max_new_tokens=N,
  min_new_tokens=N, top_k=0, top_p=1.0, pad_token_id=pad)` under torch.no_grad (the exported config has
  no eos token, so neither side stops early: both produce exactly N tokens per row, which is checked).

Both sample at temperature 1 from the full distribution. One timed call is one whole generate (prefill and
N decoding steps); calls alternate between the sides after a warmup call, and the figure is the median.
tokens/s counts generated tokens (batch x N). --clock cpu times by the process's CPU time instead of the
wall clock (with --threads 1), which other processes on a shared machine do not inflate.

Peak memory: on a CPU, each worker's peak RSS over the timed work (reset after loading the model, via
/proc/self/clear_refs) and, in parentheses, over the whole process; both include the ~0.4 GB of a Python
process with torch (and transformers' imports on its side). On a GPU, torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench  # noqa: E402
import torch  # noqa: E402

TARGET_RATIO = 2.0
PAD = 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "small"], help="model.PRESETS names")
    p.add_argument("--vocab", type=int, nargs="+", default=[4096, 8192], help="vocabulary size per preset")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, nargs=2, default=[8, 64], metavar=("MIN", "MAX"),
                   help="prompt lengths spread evenly over [MIN, MAX]")
    p.add_argument("--warmup", type=int, default=1, help="untimed generate calls per side")
    p.add_argument("--calls", type=int, default=5, help="timed generate calls per side")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="time steps by elapsed time, or by CPU time (with --threads 1: steadier on a busy machine)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny only, 4 prompts, 8 new tokens")
    p.add_argument("--out", default="", help="results JSON (default benchmarks/results/sampling_throughput.json)")
    p.add_argument("--verbose", action="store_true", help="show the workers' stderr")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.presets, args.vocab, args.batch_size, args.new_tokens, args.calls = ["tiny"], [4096], 4, 8, 2
    if len(args.vocab) < len(args.presets):
        args.vocab += [args.vocab[-1]] * (len(args.presets) - len(args.vocab))
    args.out = Path(args.out) if args.out else _bench.RESULTS / (
        "sampling_throughput_quick.json" if args.quick else "sampling_throughput.json")
    return args


def make_prompts(batch: int, lengths: tuple[int, int], vocab: int) -> list[list[int]]:
    """Fixed prompts, lengths spread over [min, max], ids avoiding the pad id."""
    gen = torch.Generator().manual_seed(0)
    lo, hi = lengths
    sizes = [lo + (hi - lo) * i // max(1, batch - 1) for i in range(batch)]
    return [torch.randint(1, vocab, (n,), generator=gen).tolist() for n in sizes]


# ---------------------------------------------------------------- worker side


def worker(spec: dict[str, Any]) -> None:
    from chatloop.device import resolve_device

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = resolve_device(spec["device"])
    dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
    rss_start = _bench.rss_mb()
    now = _bench.clock(spec["clock"])
    prompts: list[list[int]] = spec["prompts"]
    n_new = spec["new_tokens"]
    generator = torch.Generator(device=device).manual_seed(0)

    if spec["side"] == "hf":
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(spec["dir"], attn_implementation="sdpa",
                                                                  dtype=dtype).to(device).eval()
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p):] = torch.tensor(p)
            attention_mask[i, width - len(p):] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)

        def run() -> int:
            with torch.no_grad():
                out = model.generate(input_ids, attention_mask=attention_mask, do_sample=True, max_new_tokens=n_new,
                                     min_new_tokens=n_new, top_k=0, top_p=1.0, temperature=1.0, pad_token_id=PAD)
            return out.shape[1] - width
    else:
        from chatloop.checkpoint import load_model
        from chatloop.engine import generate

        model = load_model(spec["dir"], device=device, dtype=dtype).eval()

        def run() -> int:
            rollout = generate(model, prompts, n_new, pad_id=PAD, stop_ids=[], temperature=1.0,
                               generator=generator)
            return rollout.response.shape[1]

    def timed(_: dict[str, Any]) -> dict[str, Any]:
        _bench.sync()
        start = now()
        produced = run()
        _bench.sync()
        if produced != n_new:
            raise RuntimeError(f"{spec['side']} produced {produced} tokens per row, expected {n_new}")
        return {"seconds": now() - start}

    def warmup(command: dict[str, Any]) -> dict[str, Any]:
        _bench.reset_peak_memory(device)
        # Wall clock whatever --clock says: compilation runs partly in inductor's worker processes.
        start = time.perf_counter()
        timed(command)
        first_wall = time.perf_counter() - start
        for _ in range(command["calls"] - 1):
            timed(command)
        return {"first_call_s": first_wall}

    def memory(_: dict[str, Any]) -> dict[str, Any]:
        return {**_bench.peak_memory(device), "rss_after_imports_mb": rss_start}

    _bench.serve({"warmup": warmup, "generate": timed, "memory": memory})


# ---------------------------------------------------------------- parent side


def run_preset(name: str, vocab: int, args: argparse.Namespace, device: torch.device, precision: str,
               tmp: Path) -> dict[str, Any]:
    from chatloop.checkpoint import save_model
    from chatloop.model import GPT, preset

    prompts = make_prompts(args.batch_size, tuple(args.prompt_len), vocab)
    torch.manual_seed(1337)
    model = GPT(preset(name, {"vocab_size": vocab, "max_seq_len": max(256, args.prompt_len[1] + args.new_tokens)}))
    directory = tmp / name
    save_model(model, directory, None)
    common = {"dir": str(directory), "prompts": prompts, "new_tokens": args.new_tokens, "device": str(device),
              "precision": precision, "threads": args.threads, "clock": args.clock}
    workers: dict[str, _bench.Worker] = {}
    try:
        warm: dict[str, dict[str, Any]] = {}
        for side in ("ours", "hf"):
            workers[side] = _bench.Worker(__file__, {**common, "side": side}, args.verbose)
            warm[side] = workers[side].call("warmup", calls=args.warmup)
        times = _bench.alternate(workers, "generate", args.calls)
        memory = {side: w.call("memory") for side, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()

    tokens = args.batch_size * args.new_tokens
    result: dict[str, Any] = {"params": model.num_params(), "vocab": vocab, "sides": {}}
    for side in ("ours", "hf"):
        s = _bench.summary(times[side])
        result["sides"][side] = {
            "tokens_per_s": round(tokens / s["median_s"], 1),
            "call_s": {k: round(v, 4) if isinstance(v, float) else v for k, v in s.items()},
            "first_call_s": round(warm[side]["first_call_s"], 3),
            "peak_mb": round(memory[side]["peak_mb"], 1),
            "process_peak_rss_mb": round(memory[side]["process_peak_rss_mb"], 1),
            "rss_after_imports_mb": round(memory[side]["rss_after_imports_mb"], 1),
        }
    result["ratio"] = round(result["sides"]["ours"]["tokens_per_s"] / result["sides"]["hf"]["tokens_per_s"], 3)
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return

    from chatloop.device import resolve_device, resolve_precision

    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    _bench.check_clock(args.clock, args.threads, device)
    info = _bench.machine(device)
    info["clock"] = args.clock
    print(f"# sampling throughput, {device} {precision}: {info.get('cpu', info.get('gpu'))}, "
          f"{info['threads']} threads, load average {info['load_average_1min']}")
    if device.type == "cpu" and precision == "fp32" and args.precision == "auto":
        print("precision auto -> fp32: this CPU has no AVX512-BF16/AMX, so bf16 matmuls would be emulated")
    print(f"batch {args.batch_size}, prompts of {args.prompt_len[0]}-{args.prompt_len[1]} tokens (left-padded), "
          f"{args.new_tokens} new tokens, temperature 1, no truncation; {args.warmup} warmup + {args.calls} timed "
          "calls per side (median)")

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, vocab in zip(args.presets, args.vocab):
            results[name] = run_preset(name, vocab, args, device, precision, Path(tmp))

    mem_unit = "peak CUDA MiB" if device.type == "cuda" else "peak RSS MiB, run (process)"
    print(f"\n| preset | params | side | tokens/s | call s, median (min) | {mem_unit} |")
    print("|---|---:|---|---:|---:|---:|")
    for name, r in results.items():
        for side, s in r["sides"].items():
            print(f"| {name} | {r['params'] / 1e6:.1f}M | {side} | {s['tokens_per_s']:,.0f} | "
                  f"{s['call_s']['median_s']:.3f} ({s['call_s']['min_s']:.3f}) | "
                  f"{s['peak_mb']:,.0f} ({s['process_peak_rss_mb']:,.0f}) |")
    print("\n| preset | chatloop / transformers | target |")
    print("|---|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['ratio']:.2f}x | >= {TARGET_RATIO}x ({_bench.verdict(r['ratio'], TARGET_RATIO)}) |")

    info["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    record = {"benchmark": "sampling_throughput",
              "command": " ".join(["benchmarks/sampling_throughput.py", *sys.argv[1:]]),
              "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": info, "precision": precision,
              "batch_size": args.batch_size, "new_tokens": args.new_tokens, "prompt_len": args.prompt_len,
              "warmup": args.warmup, "calls": args.calls, "targets": {"ratio": TARGET_RATIO}, "presets": results}
    _bench.write_results(args.out, record)


if __name__ == "__main__":
    main()
