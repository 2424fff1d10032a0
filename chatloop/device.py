"""Device and precision: which device a command runs on (one per process under torchrun) and in which precision
(bf16 autocast where the hardware has fast bf16: CUDA with bf16, or a CPU with AMX or AVX512-BF16)."""

from __future__ import annotations

import contextlib
import math
import time
from functools import cache
from pathlib import Path

import torch

from chatloop import distributed
from chatloop.errors import UserError


def resolve_device(name: str) -> torch.device:
    initialize_cpu_math()
    if distributed.launched():
        return distributed.init(name)  # torchrun: join the process group, one device per rank
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device={name}: CUDA is not available on this machine")
    return device


@cache
def initialize_cpu_math() -> None:
    """MKL sets up its vector math (PyTorch's cos, sin, exp, ... on CPU) on first use. When that first use runs on
    two threads at once, one of them now and then computes that call at low accuracy: RoPE's cos came out up to
    1.5e-4 off on half the tensor in 4 of 30 processes on an Intel Xeon, and identical fp32 trainings drifted apart
    (session 12). One call on one thread first: 0 of 30."""
    torch.cos(torch.zeros(1))


@cache
def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: without them PyTorch emulates bf16 matmuls, far slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def measure_peak_flops(device: torch.device, precision: str) -> float:
    """FLOP/s of a large square matmul in the training precision: the MFU denominator."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    reps = 20 if device.type == "cuda" else 8
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # Best of three timings: a peak is what the hardware can do, and a busy machine only ever slows a run.
    best = math.inf
    for _ in range(3):
        sync()
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * reps / best
