"""What the throughput benchmarks share: the machine description, worker subprocesses, results files.

Each side of a comparison (chatloop, transformers) runs in a worker subprocess of its own, so that its peak
memory is its own. The parent drives both workers step by step and alternates which one goes first, so a
change in the machine's load (other processes on a shared machine) hits both sides alike instead of
whichever happened to run during it; the per-step times are summarised by their median.

Protocol: the parent writes one JSON command per line to a worker's stdin; the worker answers with one JSON
line on a private copy of its stdout (anything libraries print goes to stderr).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import torch

RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------- machine


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def clock(kind: str) -> Callable[[], float]:
    """"wall": elapsed time. "cpu": this process's CPU time, which other processes on a shared machine do not
    inflate (they still share caches and memory bandwidth); only meaningful with one thread, since idle
    OpenMP threads spin and would count."""
    return time.process_time if kind == "cpu" else time.perf_counter


def check_clock(kind: str, threads: int, device: torch.device) -> None:
    if kind == "cpu" and (threads != 1 or device.type != "cpu"):
        raise SystemExit("--clock cpu needs --threads 1 on a CPU device")


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, reps: int, clock_kind: str = "wall") -> float:
    """Best-of-three FLOP/s of an n x n matmul: the bf16 figure (chatloop's measure_peak_flops would take a
    minute where bf16 is emulated) and, with the CPU clock, the peak in CPU time."""
    now = clock(clock_kind)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync()
    best = float("inf")
    for _ in range(3):
        start = now()
        for _ in range(reps):
            a @ b
        sync()
        best = min(best, now() - start)
    return 2 * n**3 * reps / best


def machine(device: torch.device) -> dict[str, Any]:
    import transformers

    info: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        flags = cpu_flags()
        info.update(cpu=cpu_model(), cores=os.cpu_count(), avx2="avx2" in flags, avx512="avx512f" in flags,
                    avx512_bf16="avx512_bf16" in flags, amx="amx_bf16" in flags)
    return info


def uptime() -> str:
    """`uptime`'s line (the load average), to record with figures measured on a shared machine."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---------------------------------------------------------------- workers


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (Linux), MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def rss_mb() -> float:
    """Current resident set size of this process, MiB."""
    return _status_mb("VmRSS")


_peak_before_reset_mb = 0.0


def reset_peak_memory(device: torch.device) -> None:
    """Start the peak over from here, so that it covers the benchmarked work and not the model loading
    (which briefly holds two copies of the weights). Linux resets the peak RSS when "5" is written to
    /proc/self/clear_refs; that resets getrusage's figure too, so the peak so far is kept first."""
    global _peak_before_reset_mb
    _peak_before_reset_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak memory since reset_peak_memory (CUDA allocations on a GPU, resident set size on a CPU) and the
    process's overall peak RSS (getrusage), MiB."""
    process_peak = max(_peak_before_reset_mb, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if device.type == "cuda":
        return {"peak_mb": torch.cuda.max_memory_allocated(device) / 2**20, "process_peak_rss_mb": process_peak}
    since_reset = _status_mb("VmHWM")
    return {"peak_mb": since_reset if since_reset == since_reset else process_peak,  # NaN: no /proc
            "process_peak_rss_mb": process_peak}


def serve(handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]]) -> None:
    """Worker side: answer commands from stdin until "exit"."""
    channel: TextIO = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # library output (progress bars, warnings) must not corrupt the protocol
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "exit":
            break
        channel.write(json.dumps(handlers[command["op"]](command)) + "\n")
        channel.flush()


class Worker:
    """Parent side: one worker subprocess running `script --worker SPEC`."""

    def __init__(self, script: str, spec: dict[str, Any], verbose: bool, env: dict[str, str] | None = None) -> None:
        # The worker's stderr, kept to show if it dies; it lives as long as the worker, hence no `with`.
        self.log = None if verbose else tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, script, "--worker", json.dumps(spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.log, text=True, cwd=Path(script).resolve().parents[1], env={**os.environ, **(env or {})},
        )

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            detail = ""
            if self.log is not None:
                self.log.seek(0)
                detail = self.log.read()[-4000:]
            raise RuntimeError(f"benchmark worker died (exit {self.proc.returncode}):\n{detail}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)
        if self.log is not None:
            self.log.close()


def alternate(workers: dict[str, Worker], op: str, rounds: int) -> dict[str, list[float]]:
    """Run `op` on every worker `rounds` times, one worker at a time, flipping the order each round;
    collect each answer's "seconds"."""
    names = list(workers)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(workers[name].call(op)["seconds"])
    return times


def run_sides(script: str, spec: dict[str, Any], sides: tuple[str, ...], tmp: Path, warmup: int, steps: int,
              verbose: bool) -> tuple[dict[str, list[dict[str, Any]]], dict[str, float], dict[str, dict[str, Any]]]:
    """Each side's worker started and warmed up in turn (a setup must not overlap another side's warmup), then
    `steps` rounds of one "step" per side in an order that flips every round; each side's step replies, setup
    seconds and memory report."""
    workers: dict[str, Worker] = {}
    setup: dict[str, float] = {}
    replies: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    try:
        for side in sides:
            start = time.perf_counter()
            workers[side] = Worker(script, {**spec, "side": side, "out": str(tmp / f"out-{side}")}, verbose)
            workers[side].call("ready")
            setup[side] = time.perf_counter() - start
            for _ in range(warmup):
                workers[side].call("step")
        for r in range(steps):
            for side in sides if r % 2 == 0 else sides[::-1]:
                replies[side].append(workers[side].call("step"))
        memory = {side: w.call("memory") for side, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()
    return replies, setup, memory


def summary(seconds: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds), "n": len(seconds)}


# ---------------------------------------------------------------- output


def verdict(ratio: float, target: float) -> str:
    return "met" if ratio >= target else "not met"


def write_results(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"\nwrote {path}")
