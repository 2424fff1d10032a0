"""What every training stage shares: the config fields, the stage's opening (`open_stage`: skip a finished stage,
seed, device and precision), the optimizer and its schedule, resumable state (`resume`, `save_state`), logging
(metrics.jsonl and TensorBoard; each stage draws its own tqdm bar). Device and precision are chatloop.device's.

Resumable state lives in `OUT/train_state/step-NNNNNNNN/` (written to a temporary directory, then renamed)
and `OUT/train_state/latest` names the newest one. A stage killed at any moment (even `kill -9`) restarts
from the newest complete state with the same data order, because batches are a pure function of
(seed, step) and the RNG states are restored. Each state's state.json records the size and sha256 of its
state.pt: a resumed stage falls back to the previous kept state when the newest is corrupt.

The faults of a long run (docs/FAULTS.md): a save that finds no room is a DiskFull error (its temporary removed,
the older states untouched), a free-space check comes before a stage's first save (`resume`), and `StageGuard`
turns SIGTERM / SIGINT into a saved state and exit 0 and a non-finite loss, gradient or reward into an error
naming the step (or a skipped step), never a saved NaN.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from chatloop import distributed
from chatloop.checkpoint import checkpoint_problem, is_complete
from chatloop.device import resolve_device, resolve_precision
from chatloop.errors import DiskFull, Diverged, Stopped, UserError
from chatloop.io import (
    atomic_write_json,
    atomic_write_text,
    check_room,
    disk_full,
    free_bytes,
    human_bytes,
    no_room,
    sha256_file,
)


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
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A non-finite loss or gradient norm (in PPO also a non-finite score of the reward): "stop" ends the stage with
    an error naming the step, the metric and the last saved state (exit 2; the step's update is not applied and
    nothing non-finite is ever saved); "skip" drops that step's update, says so and goes on. Either way, weights
    that an update made non-finite stop the stage (a skip cannot undo them)."""


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
    problem = checkpoint_problem(Path(cfg.out))
    if problem is not None:
        print(f"{stage}: {problem}: the checkpoint is corrupt; training it again (from its last saved state, if any)")
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


def state_tensors(obj: Any, name: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(dotted name, tensor) of every tensor in nested dicts, lists and tuples (a train state)."""
    if isinstance(obj, torch.Tensor):
        yield name, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from state_tensors(v, f"{name}.{k}" if name else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from state_tensors(v, f"{name}.{i}" if name else str(i))


def state_bytes(state: dict[str, Any]) -> int:
    """About the size of `state` as torch.save writes it: its tensors' bytes."""
    return sum(t.nbytes for _, t in state_tensors(state))


def last_good_state(out: Path) -> str:
    """Where a stopped stage would go on from: the state `latest` names, or that there is none."""
    pointer = _state_dir(out) / "latest"
    if pointer.is_file():
        newest = pointer.parent / pointer.read_text().strip()
        return f"the last good state is {newest} (the same command resumes from it)"
    return "no state was saved yet (the same command starts over)"


class _WatchedFile:
    """The file torch.save writes state.pt through: it hashes what is written (state.json's sha256 without reading
    the file back) and keeps the OSError of a failed write, which torch reports only as "unexpected pos"."""

    def __init__(self, f: Any) -> None:
        self.f, self.sha256, self.bytes, self.error = f, hashlib.sha256(), 0, None

    def write(self, data: Any) -> int:
        try:
            n = self.f.write(data)
        except OSError as e:
            self.error = e
            raise
        self.sha256.update(data)
        self.bytes += n
        return n

    def flush(self) -> None:
        self.f.flush()


def save_state(out: Path, step: int, state: dict[str, Any], keep: int) -> None:
    """Write state atomically: a temporary directory, renamed, then the `latest` pointer replaced.

    Non-finite tensors are refused (Diverged), and so is a state that would not fit (DiskFull, checked before
    writing and caught while writing); either way the temporary directory is removed and older states are
    untouched. Under torchrun every rank calls this with the full states (distributed.model_state) and rank 0
    writes.
    """
    if not distributed.is_main():
        distributed.barrier()  # wait until rank 0 has written it
        return
    root = _state_dir(out)
    name = f"step-{step:08d}"
    for key, t in state_tensors(state):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise Diverged(f"{root / name}: not saved: {key} holds nan or inf (the training diverged at or before "
                           f"step {step}); {last_good_state(out)}")
    needed = state_bytes(state)
    check_room(root / name / "state.pt", needed)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    final = root / name
    watched = None
    try:
        tmp.mkdir()
        with open(tmp / "state.pt", "wb") as f:
            watched = _WatchedFile(f)
            torch.save({"step": step, "rng": rng, **state}, watched)
            f.flush()
            os.fsync(f.fileno())
        atomic_write_json(tmp / "state.json", {"step": step, "bytes": watched.bytes,
                                               "sha256": watched.sha256.hexdigest()})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        error = watched.error if watched is not None and watched.error is not None else e
        if no_room(error):
            raise disk_full(final / "state.pt", needed, error) from None
        raise
    atomic_write_text(root / "latest", name + "\n")
    states = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    for old in states[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()


def _state_problem(directory: Path) -> str | None:
    """What is wrong with a saved state against its state.json (missing, another size, another sha256), or None
    (also for states saved before state.json was written)."""
    path = directory / "state.pt"
    if not path.is_file():
        return f"{path} is missing"
    record_path = directory / "state.json"
    if not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{record_path} is not valid JSON"
    size = path.stat().st_size
    if size != record["bytes"]:
        return f"{path} is {size:,} bytes, not the {record['bytes']:,} written (truncated or changed)"
    if sha256_file(path) != record["sha256"]:
        return f"{path} differs from what was written (its sha256 changed)"
    return None


def load_state(out: Path, device: torch.device, stage: str = "") -> dict[str, Any] | None:
    """The newest complete state that is not corrupt (each checked against its state.json; a corrupt one is named
    and the previous kept one tried), with RNGs restored; None if the stage never saved one."""
    pointer = _state_dir(out) / "latest"
    if not pointer.is_file():
        return None
    newest = pointer.read_text().strip()
    candidates = sorted((p for p in _state_dir(out).iterdir() if p.is_dir() and p.name.startswith("step-")
                         and p.name <= newest), reverse=True)
    if not candidates or candidates[0].name != newest:
        candidates.insert(0, _state_dir(out) / newest)
    prefix = f"{stage}: " if stage else ""
    state = None
    for i, directory in enumerate(candidates):
        problem = _state_problem(directory)
        if problem is None:
            try:
                state = torch.load(directory / "state.pt", map_location=device, weights_only=False)
                break
            except Exception as e:  # noqa: BLE001 - any unreadable state is a corrupt one; the previous may do
                problem = f"{directory / 'state.pt'} cannot be read ({str(e).splitlines()[0][:200]})"
        after = f"falling back to the previous state {candidates[i + 1]}" if i + 1 < len(candidates) else ""
        print(f"{prefix}{problem}: the state is corrupt" + (f"; {after}" if after else ""))
    if state is None:
        raise UserError(f"{_state_dir(out)}: no readable train state left (see above): remove it to start over")
    rng = state["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"].cpu())
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
    return state


# ---------------------------------------------------------------- stop signals and divergence


class StageGuard:
    """A training stage's watch over what ends a long run early (docs/FAULTS.md): SIGTERM / SIGINT, and numbers
    that are not finite.

    Inside `with StageGuard(...) as guard:` the first SIGTERM or SIGINT only sets a flag and says so (a second one
    does what it would have done: SIGINT raises KeyboardInterrupt, SIGTERM ends the process). At each step boundary
    the stage asks `stop_requested()` (under torchrun the ranks agree: one all_reduce of the flag), saves its
    resumable state when it is set and raises `stopped(...)`, which the CLI prints and exits 0 with. So the stop
    comes within one step and one save; the handler says how long those took so far. Leaving the block puts the
    previous handlers back.

    `at(step).finite(metrics)` checks a step's numbers before its update is applied (the ranks agree): all finite
    is True; else on_nonfinite "stop" raises Diverged naming the step, the metric and the last saved state, and
    "skip" says so and is False (the stage drops the update). `weights_finite` checks a model after its update.
    """

    def __init__(self, stage: str, out: Path, on_nonfinite: str = "stop", unit: str = "step") -> None:
        self.stage, self.out, self.on_nonfinite, self.unit = stage, Path(out), on_nonfinite, unit
        self.step = 0
        self.signal: int | None = None
        self.previous: dict[int, Any] = {}
        self.intervals: deque[float] = deque(maxlen=50)
        self.last = time.perf_counter()

    def __enter__(self) -> StageGuard:
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        self.last = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # the second one: what it would have done without the guard
            previous = self.previous.get(signum, signal.SIG_DFL)
            self._restore()
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:
                signal.raise_signal(signum)
            return
        self.signal = signum
        if distributed.is_main():
            took = f"; a {self.unit} and a save took at most {max(self.intervals):.2g} s so far" \
                if self.intervals else ""
            # os.write, not print: a handler may run in the middle of a print to the same stream
            os.write(2, (f"{self.stage}: {signal.Signals(signum).name}: saving the state at the end of this "
                         f"{self.unit} and stopping{took} (send it again to stop at once, unsaved)\n").encode())

    def at(self, step: int) -> StageGuard:
        """The guard, its messages about `step` (the step being taken, counted from 1)."""
        self.step = step
        return self

    def stop_requested(self) -> bool:
        """At a step boundary (every rank, every step): whether a stop signal came."""
        now = time.perf_counter()
        self.intervals.append(now - self.last)
        self.last = now
        flag = self.signal is not None
        if distributed.active():
            flag = distributed.all_sum(float(flag))[0] > 0
        return flag

    def stopped(self, done: int, total: int, *closing: Any) -> Stopped:
        """The Stopped error to raise after the state is saved (`closing`: the progress bar, the log: closed)."""
        for thing in closing:
            thing.close()
        name = signal.Signals(self.signal).name if self.signal is not None else "a signal"
        return Stopped(f"{self.stage}: stopped by {name} after {self.unit} {done} of {total}, its state saved in "
                       f"{_state_dir(self.out)}: run the same command to resume")

    def end_step(self, done: int, total: int, due: bool, state: Callable[[], dict[str, Any]], keep: int, bar: Any,
                 log: MetricsLog) -> bool:
        """A step's end (every rank): save `state()` when `due` or when a stop signal came, move the progress bar on,
        and after a stop's save raise `stopped` (bar and log closed). Whether it saved (for the stage's timer)."""
        stop = self.stop_requested()
        if stop or due:
            save_state(self.out, done, state(), keep)
        bar.update(1)
        if stop:
            raise self.stopped(done, total, bar, log)
        return due

    def finite(self, metrics: dict[str, float]) -> bool:
        bad = [(k, v) for k, v in metrics.items() if not math.isfinite(v)]
        if distributed.active() and distributed.all_sum(float(len(bad)))[0] > 0 and not bad:
            bad = [("a metric on another rank", float("nan"))]
        if not bad:
            return True
        what = ", ".join(f"{k} is {v}" for k, v in bad)
        if self.on_nonfinite == "skip":
            print(f"{self.stage}: {self.unit} {self.step}: {what}; skipping its update (--on_nonfinite=skip)")
            return False
        raise Diverged(f"{self.stage}: {self.unit} {self.step}: {what}; stopped before applying it (nothing "
                       f"non-finite was saved); {last_good_state(self.out)}: lower --lr, or pass "
                       "--on_nonfinite=skip to skip such steps")

    def weights_finite(self, model: torch.nn.Module, what: str) -> None:
        """After an update: refuse to go on with non-finite weights (Diverged, whatever on_nonfinite says)."""
        local = [p.detach().to_local() if hasattr(p, "to_local") else p.detach() for p in model.parameters()]
        ok = bool(torch.stack([torch.isfinite(t).all() for t in local]).all()) if local else True
        if distributed.active():
            ok = distributed.all_sum(float(not ok))[0] == 0
        if not ok:
            raise Diverged(f"{self.stage}: {self.unit} {self.step}: the update made the {what}'s weights nan or "
                           f"inf (nothing non-finite was saved); {last_good_state(self.out)}: lower --lr")


def apply_update(optimizer: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter], grad_clip: float,
                 loss: float, guard: StageGuard | None = None, prefix: str = "train/") -> float:
    """Clip the gradients and step the optimizer, unless `guard` finds the loss or the gradient norm non-finite
    (it raises, or the update is dropped); the gradients are cleared either way. The norm before clipping."""
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or float("inf")).item()
    if guard is None or guard.finite({f"{prefix}loss": loss, f"{prefix}grad_norm": grad_norm}):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


# ---------------------------------------------------------------- logging


def resume(out: Path, device: torch.device, model: torch.nn.Module, optimizer: torch.optim.Optimizer, stage: str,
           total: int, keys: tuple[str, str] = ("model", "optimizer"), unit: str = "step"
           ) -> tuple[int, dict[str, Any] | None, MetricsLog]:
    """The newest train state of `out`, loaded into the model and its optimizer (under `keys`): its step (0
    without a state), the whole state (for what else the stage keeps in it), and the metrics log truncated to
    that step."""
    start, state = 0, load_state(out, device, stage)
    if state is not None:
        distributed.load_model_state(model, state[keys[0]])
        distributed.load_optimizer_state(model, optimizer, state[keys[1]])
        start = state["step"]
        print(f"{stage}: resuming from {unit} {start} of {total}")
    elif distributed.is_main():
        # Before the first save, not after hours of training: room for a state of the model and its AdamW moments.
        params = {id(p): p for p in model.parameters()}.values()
        needed = sum(p.numel() * p.element_size() + (8 * p.numel() if p.requires_grad else 0) for p in params)
        free = free_bytes(out)
        if free is not None and free < needed:
            raise DiskFull(f"{stage}: {out}: no room for its train states: one takes about {human_bytes(needed)}, "
                           f"{human_bytes(free)} free there: make room (or give another --out) and run again")
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
        line = json.dumps(row) + "\n"
        try:
            self.file.write(line)
            self.file.flush()
        except OSError as e:  # a torn last line is what a resumed run drops anyway
            if no_room(e):
                raise disk_full(self.path, len(line), e) from None
            raise
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
