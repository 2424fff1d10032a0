"""What every training stage shares: the config fields, the stage's opening (`open_stage`: skip a finished stage,
seed, device and precision), the optimizer and its schedule, resumable state (`resume`, `save_state`), logging
(metrics.jsonl and TensorBoard; each stage draws its own tqdm bar). Device and precision are chatloop.device's.

Resumable state lives in `OUT/train_state/step-NNNNNNNN/` (written to a temporary directory, then renamed)
and `OUT/train_state/latest` names the newest one. A stage killed at any moment (even `kill -9`) restarts
from the newest complete state with the same data order, because batches are a pure function of
(seed, step) and the RNG states are restored.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from chatloop import distributed
from chatloop.checkpoint import is_complete
from chatloop.device import resolve_device, resolve_precision
from chatloop.errors import UserError
from chatloop.io import atomic_write_text


@dataclass
class TrainConfig:
    """Fields every training stage has (PPO's are these and its own)."""

    out: str = "runs/stage"
    """Output directory: the checkpoint, train_state/, metrics.jsonl and tb/ (TensorBoard events)."""
    seed: int = 1337
    """Seed of the model init, the data order and dropout."""
    device: str = "auto"
    """"auto" (cuda if available, else cpu), "cpu", "cuda" or "cuda:N"."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Matmul precision. bf16 runs under autocast (weights and optimizer stay fp32). "auto" picks bf16 on
    GPUs that support it and on CPUs with AMX or AVX512-BF16 units, fp32 otherwise (on CPUs without them
    bf16 matmuls are emulated and far slower than fp32)."""
    batch_size: int = 16
    """Sequences per micro-batch."""
    lr: float = 1e-3
    """Peak learning rate."""
    warmup_steps: int = 50
    """Linear warmup from 0 to lr over this many steps."""
    beta1: float = 0.9
    """Adam beta1 (InstructGPT: 0.9)."""
    beta2: float = 0.95
    """Adam beta2 (InstructGPT: 0.95)."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay on weight matrices (not on embeddings, norm gains or biases)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    save_every: int = 100
    """Save the resumable training state every this many steps (and at the end)."""
    log_every: int = 10
    """Write a metrics row every this many steps."""
    keep_states: int = 2
    """How many resumable states to keep on disk."""
    progress: bool = True
    """Show a progress bar."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun (several processes): "ddp" keeps a whole model on every rank and averages gradients;
    "fsdp" shards parameters, gradients and optimizer states over the ranks (FSDP2), for models that do not
    fit on one device. Ignored in a single process. See docs/SCALING.md."""


@dataclass
class StepConfig(TrainConfig):
    """The stages that take optimizer steps over a dataset (pretrain, SFT, RM, DPO): a step budget, gradient
    accumulation and the warmup + cosine schedule (`lr_at`)."""

    max_steps: int = 1000
    """Optimizer steps to train for."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (global batch = batch_size * grad_accum)."""
    min_lr_ratio: float = 0.1
    """The cosine schedule decays to lr * min_lr_ratio (InstructGPT: 10%)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def open_stage(stage: str, cfg: TrainConfig) -> tuple[torch.device, str] | None:
    """Every stage's opening: None when cfg.out holds the stage's finished checkpoint (the stage then skips
    itself: `chatloop run` and a stage run by hand share this rule); else the seeded RNGs, and the device
    (under torchrun: this rank's, the process group joined) and precision to run in."""
    if is_complete(Path(cfg.out)):
        print(f"{stage}: {Path(cfg.out)} is already finished; skipping (remove it to train again)")
        return None
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    return device, resolve_precision(cfg.precision, device)


# ---------------------------------------------------------------- optimizer and schedule


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    decay, no_decay = [], []
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        # Matrices decay; norms' gains, biases and the embedding table do not (as in GPT-2 / nanoGPT).
        (decay if p.ndim >= 2 and "emb" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel (CUDA and CPU) makes one pass over each tensor instead of a dozen elementwise ops:
    # on a 2-core CPU, 0.04 s instead of 0.4 s per step for a 30M-parameter model.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=device.type in ("cuda", "cpu"))


def lr_at(step: int, cfg: StepConfig, total_steps: int) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio at total_steps (the steps the stage takes)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def length_grouped_order(lengths: list[int], seed: int, epoch: int, batch_size: int) -> np.ndarray:
    """An epoch's order of examples whose consecutive `batch_size` blocks hold examples of similar length.

    A seeded shuffle is cut into windows of 32 batches; each window is sorted by length and cut into batches, and
    the batches are shuffled again. Batches stay random in content and order (Hugging Face's group_by_length), but
    a batch pads to a length near its own examples' instead of the longest of a random draw: on ranked prompts of
    the synthetic world, 77% of the padded tokens are real instead of 47%. A pure function of (seed, epoch), so a
    resumed run sees the same batches.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    window = 32 * batch_size
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: -lengths[i])
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    return np.array([i for b in rng.permutation(len(batches)) for i in batches[b]], dtype=np.int64)


# ---------------------------------------------------------------- resumable state


def _state_dir(out: Path) -> Path:
    return out / "train_state"


def save_state(out: Path, step: int, state: dict[str, Any], keep: int) -> None:
    """Write state atomically: a temporary directory, renamed, then the `latest` pointer replaced.

    Under torchrun every rank calls this with the full states (distributed.model_state) and rank 0 writes.
    """
    if not distributed.is_main():
        distributed.barrier()  # wait until rank 0 has written it
        return
    root = _state_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    with open(tmp / "state.pt", "wb") as f:
        torch.save({"step": step, "rng": rng, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write_text(root / "latest", name + "\n")
    states = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    for old in states[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()


def load_state(out: Path, device: torch.device) -> dict[str, Any] | None:
    """The newest complete state, with RNGs restored; None if the stage never saved one."""
    pointer = _state_dir(out) / "latest"
    if not pointer.is_file():
        return None
    path = _state_dir(out) / pointer.read_text().strip() / "state.pt"
    if not path.is_file():
        raise UserError(f"{pointer} names {path.parent.name}, which is missing: remove {pointer} to start over")
    state = torch.load(path, map_location=device, weights_only=False)
    rng = state["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"].cpu())
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
    return state


# ---------------------------------------------------------------- logging


def resume(out: Path, device: torch.device, model: torch.nn.Module, optimizer: torch.optim.Optimizer, stage: str,
           total: int, keys: tuple[str, str] = ("model", "optimizer"), unit: str = "step"
           ) -> tuple[int, dict[str, Any] | None, MetricsLog]:
    """The newest train state of `out`, loaded into the model and its optimizer (under `keys`): its step (0
    without a state), the whole state (for what else the stage keeps in it), and the metrics log truncated to
    that step."""
    start, state = 0, load_state(out, device)
    if state is not None:
        distributed.load_model_state(model, state[keys[0]])
        distributed.load_optimizer_state(model, optimizer, state[keys[1]])
        start = state["step"]
        print(f"{stage}: resuming from {unit} {start} of {total}")
    return start, state, MetricsLog(out, resume_step=start if state is not None else None)


class MetricsLog:
    """metrics.jsonl (one JSON object per row, flushed) and TensorBoard scalars under `tb/`.

    On resume, rows past the resumed step are dropped first, so every step appears once in the file even
    after a crash replayed part of the run. Under torchrun only rank 0 writes; on the others it does nothing.
    """

    def __init__(self, out: Path, resume_step: int | None) -> None:
        self.enabled = distributed.is_main()
        if not self.enabled:
            return
        self.path = out / "metrics.jsonl"
        out.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            if resume_step is None:
                self.path.unlink()
            else:
                rows = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
                kept = []
                for ln in rows:
                    try:
                        if json.loads(ln).get("step", 0) <= resume_step:
                            kept.append(ln)
                    except json.JSONDecodeError:
                        break  # a torn last line from a kill
                atomic_write_text(self.path, "".join(k + "\n" for k in kept))
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (held open for the run; closed by close())
        from torch.utils.tensorboard import SummaryWriter  # slow import, only where logging happens

        self.tb = SummaryWriter(str(out / "tb"), purge_step=resume_step + 1 if resume_step is not None else None)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        self.tb.close()


def config_record(cfg: Any) -> dict[str, Any]:
    return asdict(cfg)
