"""Training throughput: chatloop's pretraining step against Hugging Face transformers on the same model.

    .venv/bin/python benchmarks/train_throughput.py            # tiny and small, ~4 min on 2 idle cores
    .venv/bin/python benchmarks/train_throughput.py --quick    # smoke run, under a minute
    .venv/bin/python benchmarks/train_throughput.py --threads 1 --clock cpu   # steadier on a busy machine
                                                               # (10 min on the 2-core box at load 5)
    .venv/bin/python benchmarks/train_throughput.py --device cuda --precision bf16 --batch-size 32

For each preset, the parent builds chatloop's GPT with a fixed seed and exports it with `save_model`; then
one worker process per side loads those same weights and trains on the same (batch, seq_len) token batch:

- chatloop: `load_model`, `make_optimizer` (AdamW) and `train_step` from chatloop/train/pretrain.py, the
  very function the pretrain loop calls (forward under `autocast`, `lm_loss`, backward, gradient clipping,
  AdamW step). "ours" is eager; "ours-compiled" compiles model and loss with `forward_loss(model, True)`,
  as `pretrain --compile` does (--compile picks the rows; with a fresh inductor cache, so the first step
  shows the whole compilation).
- transformers: `AutoModelForCausalLM.from_pretrained` (LlamaForCausalLM, attn_implementation="sdpa", its
  default), `model(input_ids, labels=input_ids).loss`, backward, `clip_grad_norm_`, torch.optim.AdamW with
  the same hyperparameters and the same decay groups, fused=True as the transformers Trainer's default
  optimizer ("adamw_torch_fused" with torch >= 2.8) is; `--hf-adamw default` gives torch's default instead.

Steps are timed one at a time, alternating sides, after warmup steps (the first of which includes any
compilation and is reported on its own, wall clock); the figure is the median step. --clock cpu times by the
process's CPU time instead of the wall clock (with --threads 1), which other processes on a shared machine
do not inflate. MFU is chatloop's FLOPs per token (6N + 12LTC, as pretrain logs it) times tokens/s over
the matmul peak measured by chatloop's `measure_peak_flops` in the same precision (with --clock cpu, the
same matmul timed in CPU time).

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

TARGET_RATIO = 2.5
TARGET_MFU = 0.40  # for the ~30M preset ("small")
LR, BETAS, EPS, WEIGHT_DECAY, GRAD_CLIP = 3e-4, (0.9, 0.95), 1e-8, 0.1, 1.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "small"], help="model.PRESETS names")
    p.add_argument("--vocab", type=int, nargs="+", default=[4096, 8192], help="vocabulary size per preset")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side (compilation happens here)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per side")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--compile", default="", choices=["off", "on", "both"],
                   help="chatloop side: eager (off), torch.compile (on) or a row for each (both; the default, "
                        "off with --quick)")
    p.add_argument("--hf-adamw", default="fused", choices=["fused", "default"],
                   help="transformers side: fused AdamW (Trainer's default) or torch.optim.AdamW's default")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="time steps by elapsed time, or by CPU time (with --threads 1: steadier on a busy machine)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny only, small batch, few steps")
    p.add_argument("--out", default="", help="results JSON (default benchmarks/results/train_throughput.json)")
    p.add_argument("--verbose", action="store_true", help="show the workers' stderr")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.presets, args.vocab, args.batch_size, args.seq_len, args.warmup, args.steps = \
            ["tiny"], [4096], 2, 64, 1, 2
    args.compile = args.compile or ("off" if args.quick else "both")
    if len(args.vocab) < len(args.presets):
        args.vocab += [args.vocab[-1]] * (len(args.presets) - len(args.vocab))
    args.out = Path(args.out) if args.out else _bench.RESULTS / (
        "train_throughput_quick.json" if args.quick else "train_throughput.json")
    return args


# ---------------------------------------------------------------- worker side


def worker(spec: dict[str, Any]) -> None:
    from chatloop.device import resolve_device

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = resolve_device(spec["device"])
    precision = spec["precision"]
    rss_start = _bench.rss_mb()
    now = _bench.clock(spec["clock"])
    gen = torch.Generator().manual_seed(0)
    windows = torch.randint(0, spec["vocab"], (spec["batch_size"], spec["seq_len"] + 1), generator=gen)
    x, y = windows[:, :-1].to(device), windows[:, 1:].to(device)

    if spec["side"] == "hf":
        import transformers

        from chatloop.device import autocast

        model = transformers.AutoModelForCausalLM.from_pretrained(spec["dir"], attn_implementation="sdpa")
        model.to(device).train()
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
        no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
            lr=LR, betas=BETAS, eps=EPS, fused=spec["hf_adamw"] == "fused")

        def step() -> float:
            with autocast(device, precision):  # what a user does for bf16: torch.autocast around the forward
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()
    else:
        from chatloop.checkpoint import load_model
        from chatloop.train.pretrain import forward_loss, train_step
        from chatloop.train.trainer import TrainConfig, make_optimizer

        model = load_model(spec["dir"], device=device).train()
        cfg = TrainConfig(lr=LR, beta1=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY,
                          grad_clip=GRAD_CLIP)
        optimizer = make_optimizer(model, cfg, device)
        loss_fn = forward_loss(model, compile=spec["side"] == "ours-compiled")

        def step() -> float:
            loss, _ = train_step(loss_fn, model, optimizer, [(x, y)], 1, cfg.grad_clip, device, precision)
            return loss

    def timed(_: dict[str, Any]) -> dict[str, Any]:
        _bench.sync()
        start = now()
        loss = step()
        _bench.sync()
        return {"seconds": now() - start, "loss": loss}

    def warmup(command: dict[str, Any]) -> dict[str, Any]:
        _bench.reset_peak_memory(device)
        # Wall clock whatever --clock says: compilation runs partly in inductor's worker processes.
        start = time.perf_counter()
        first = timed(command)
        first_wall = time.perf_counter() - start
        for _ in range(command["steps"] - 1):
            timed(command)
        return {"first_step_s": first_wall, "loss": first["loss"]}

    def memory(_: dict[str, Any]) -> dict[str, Any]:
        return {**_bench.peak_memory(device), "rss_after_imports_mb": rss_start}

    _bench.serve({"warmup": warmup, "step": timed, "memory": memory})


# ---------------------------------------------------------------- parent side


def run_preset(name: str, vocab: int, args: argparse.Namespace, device: torch.device, precision: str,
               peak: float, tmp: Path) -> dict[str, Any]:
    from chatloop.checkpoint import save_model
    from chatloop.model import GPT, preset

    torch.manual_seed(1337)
    model = GPT(preset(name, {"vocab_size": vocab, "max_seq_len": args.seq_len}))
    directory = tmp / name
    save_model(model, directory, None)
    flops_per_token = model.flops_per_token(args.seq_len)
    tokens = args.batch_size * args.seq_len

    ours = {"off": ["ours"], "on": ["ours-compiled"], "both": ["ours", "ours-compiled"]}[args.compile]
    sides = [*ours, "hf"]
    common = {"dir": str(directory), "vocab": vocab, "batch_size": args.batch_size, "seq_len": args.seq_len,
              "device": str(device), "precision": precision, "threads": args.threads, "clock": args.clock,
              "hf_adamw": args.hf_adamw}
    workers: dict[str, _bench.Worker] = {}
    try:
        # Workers start one after the other: a compile or a model load must not overlap the other's warmup.
        warm: dict[str, dict[str, Any]] = {}
        for side in sides:
            # A fresh inductor cache: the first step then shows the whole compilation, not a cache hit.
            env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp / f"inductor-{name}")}
            workers[side] = _bench.Worker(__file__, {**common, "side": side}, args.verbose, env)
            start = time.perf_counter()
            warm[side] = workers[side].call("warmup", steps=args.warmup)
            warm[side]["warmup_s"] = time.perf_counter() - start
        times = _bench.alternate(workers, "step", args.steps)
        memory = {side: w.call("memory") for side, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()

    result: dict[str, Any] = {"params": model.num_params(), "vocab": vocab, "flops_per_token": flops_per_token,
                              "sides": {}}
    for side in sides:
        s = _bench.summary(times[side])
        tps = tokens / s["median_s"]
        result["sides"][side] = {
            "tokens_per_s": round(tps, 1), "mfu": round(tps * flops_per_token / peak, 4),
            "step_s": {k: round(v, 4) if isinstance(v, float) else v for k, v in s.items()},
            "first_step_s": round(warm[side]["first_step_s"], 2), "warmup_s": round(warm[side]["warmup_s"], 2),
            "first_loss": round(warm[side]["loss"], 4),
            "peak_mb": round(memory[side]["peak_mb"], 1),
            "process_peak_rss_mb": round(memory[side]["process_peak_rss_mb"], 1),
            "rss_after_imports_mb": round(memory[side]["rss_after_imports_mb"], 1),
        }
    best = max(ours, key=lambda side: result["sides"][side]["tokens_per_s"])
    result["best_ours"] = best
    result["ratio"] = round(result["sides"][best]["tokens_per_s"] / result["sides"]["hf"]["tokens_per_s"], 3)
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return

    from chatloop.device import measure_peak_flops, resolve_device, resolve_precision

    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    _bench.check_clock(args.clock, args.threads, device)
    info = _bench.machine(device)
    info["clock"] = args.clock
    if args.clock == "cpu":
        # The same 1024^3 matmul as measure_peak_flops, timed on the same clock as the steps.
        peak = _bench.matmul_peak(device, torch.bfloat16 if precision == "bf16" else torch.float32, 1024, 8, "cpu")
    else:
        peak = measure_peak_flops(device, precision)
    info["peak_flops_" + precision] = peak
    if device.type == "cpu" and precision == "fp32":
        # bf16 is emulated on CPUs without AVX512-BF16/AMX: a small matmul is enough to show how slow it is.
        info["peak_flops_bf16"] = _bench.matmul_peak(device, torch.bfloat16, 256, 2)
    print(f"# training throughput, {device} {precision}: {info.get('cpu', info.get('gpu'))}, "
          f"{info['threads']} threads, load average {info['load_average_1min']}")
    print(f"matmul peak ({precision}, {args.clock} clock): {peak / 1e9:,.1f} GFLOP/s"
          + (f"; bf16: {info['peak_flops_bf16'] / 1e9:,.2f} GFLOP/s" if "peak_flops_bf16" in info else ""))
    if device.type == "cpu" and precision == "fp32" and args.precision == "auto":
        print("precision auto -> fp32: this CPU has no AVX512-BF16/AMX, so bf16 matmuls would be emulated")
    print(f"batch {args.batch_size} x seq_len {args.seq_len}, {args.warmup} warmup + {args.steps} timed steps "
          f"per side (median); transformers AdamW: {args.hf_adamw}")

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, vocab in zip(args.presets, args.vocab):
            results[name] = run_preset(name, vocab, args, device, precision, peak, Path(tmp))

    mem_unit = "peak CUDA MiB" if device.type == "cuda" else "peak RSS MiB, run (process)"
    print(f"\n| preset | params | side | tokens/s | step s, median (min) | MFU | {mem_unit} | first step s |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        for side, s in r["sides"].items():
            print(f"| {name} | {r['params'] / 1e6:.1f}M | {side} | {s['tokens_per_s']:,.0f} | "
                  f"{s['step_s']['median_s']:.3f} ({s['step_s']['min_s']:.3f}) | {100 * s['mfu']:.1f}% | "
                  f"{s['peak_mb']:,.0f} ({s['process_peak_rss_mb']:,.0f}) | {s['first_step_s']:.1f} |")
    print(f"\n| preset | chatloop ({'/'.join(r['best_ours'] for r in results.values())}) / transformers | "
          f"target | MFU (chatloop) | target |")
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        mfu = r["sides"][r["best_ours"]]["mfu"]
        mfu_target = f">= {TARGET_MFU:.0%} ({_bench.verdict(mfu, TARGET_MFU)})" if name == "small" else "-"
        print(f"| {name} | {r['ratio']:.2f}x | >= {TARGET_RATIO}x ({_bench.verdict(r['ratio'], TARGET_RATIO)}) | "
              f"{100 * mfu:.1f}% | {mfu_target} |")

    info["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    record = {"benchmark": "train_throughput", "command": " ".join(["benchmarks/train_throughput.py", *sys.argv[1:]]),
              "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": info, "precision": precision,
              "batch_size": args.batch_size, "seq_len": args.seq_len, "warmup": args.warmup, "steps": args.steps,
              "hf_adamw": args.hf_adamw, "targets": {"ratio": TARGET_RATIO, "mfu_small": TARGET_MFU},
              "presets": results}
    _bench.write_results(args.out, record)


if __name__ == "__main__":
    main()
