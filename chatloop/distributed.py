"""Many processes with the same code: `torchrun --nproc-per-node N chatloop STAGE ...`.

Not launched by torchrun (no WORLD_SIZE in the environment), every function here is the identity or a
no-op and a stage runs exactly as it always did. Launched by torchrun:

- `init` (called by chatloop.device.resolve_device) joins the process group: nccl with one GPU per process
  (cuda:LOCAL_RANK) when CUDA is there, gloo on CPU. Ranks other than 0 send stdout to /dev/null, so
  prints, progress bars and metrics come from rank 0 only (errors still reach stderr).
- `wrap` puts a model under DistributedDataParallel (parallel="ddp": every rank holds the whole model,
  gradients are averaged) or FSDP2's `fully_shard` (parallel="fsdp": each block's parameters, gradients
  and AdamW states are sharded over the ranks and gathered block by block when needed). The model object
  a stage keeps is still the GPT (`unwrap`); only the training forward goes through the wrapper.
- `shard` gives each rank its contiguous share of a step's global batch, so the global batch (and with
  it the schedule, the data order and the result) does not depend on the number of processes; a stage
  scales its loss by `share_weight` so that the averaged gradient is the one of the whole batch.
- Train states are gathered to full, single-process-format state dicts (`model_state`,
  `optimizer_state`) and written by rank 0, so a run resumes on any number of processes, with either
  wrapper. (This holds a full copy of the states in rank 0's CPU memory at save time: fine up to a few
  billion parameters; beyond that a torch.distributed.checkpoint of shards would be the next step.)
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from chatloop.errors import UserError

T = TypeVar("T")
_device: torch.device | None = None


# ---------------------------------------------------------------- process group


def launched() -> bool:
    """True in a process started by torchrun (or anything that sets its environment variables)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init(device_name: str) -> torch.device:
    """Join the process group once (later calls return the same device) and pick this rank's device."""
    global _device
    if _device is not None:
        return _device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        # One GPU per process, chosen by torchrun's LOCAL_RANK whatever --device names (untested on GPU here).
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    _device = device
    atexit.register(_finish)
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    return device


def finish() -> None:
    """The end of a stage that succeeded on every rank: all ranks meet, then the process ends at once.

    Tearing gloo down (destroy_process_group, then the interpreter's finalization) now and then aborted a rank
    after a finished stage ("terminate called without an active exception", SIGABRT; ~1 run in 10 of the
    2-process FSDP tests), with or without a barrier first. Everything a stage writes is on disk (atomically)
    when it returns, so the process skips that teardown: `os._exit(0)` after flushing its output."""
    if active():
        dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _finish() -> None:  # at exit, also after an error (no barrier: the other ranks may never come)
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or a single process): the one that logs and writes files."""
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


# ---------------------------------------------------------------- reductions


def _reduce(values: Sequence[float], op: str) -> list[float]:
    if not active():
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=_device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    if op == "mean":
        t /= world_size()
    return t.tolist()


def all_sum(*values: float) -> list[float]:
    """Sums over all ranks of each value (one all_reduce for all of them)."""
    return _reduce(values, "sum")


def all_mean(*values: float) -> list[float]:
    """Means over all ranks of each value."""
    return _reduce(values, "mean")


def mean_dict(metrics: dict[str, float]) -> dict[str, float]:
    """Each metric averaged over the ranks (all ranks must pass the same keys)."""
    return dict(zip(metrics, all_mean(*metrics.values()))) if active() else metrics


def all_gather_padded(x: torch.Tensor, pad_value: float | bool, left: bool = False) -> torch.Tensor:
    """Every rank's (B_r, L_r, ...) tensor, padded along dim 1 to the longest L (on the left for left=True)
    and concatenated along dim 0 in rank order. 1-D tensors are concatenated as they are."""
    if not active():
        return x
    if x.dtype == torch.bool:  # sent as bytes: not every backend reduces or gathers bool
        return all_gather_padded(x.to(torch.uint8), int(pad_value), left).bool()
    sizes = torch.tensor([x.shape[0], x.shape[1] if x.dim() > 1 else 0], device=x.device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(world_size())]
    dist.all_gather(all_sizes, sizes)
    rows, width = max(int(s[0]) for s in all_sizes), max(int(s[1]) for s in all_sizes)
    padded = x
    if x.dim() > 1 and x.shape[1] < width:
        fill = torch.full((x.shape[0], width - x.shape[1], *x.shape[2:]), pad_value, dtype=x.dtype, device=x.device)
        padded = torch.cat([fill, x] if left else [x, fill], dim=1)
    # all_gather needs equal shapes: pad rows too, and cut each rank's rows back out afterwards.
    if padded.shape[0] < rows:
        extra = torch.zeros((rows - padded.shape[0], *padded.shape[1:]), dtype=x.dtype, device=x.device)
        padded = torch.cat([padded, extra])
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[: int(s[0])] for p, s in zip(parts, all_sizes)])


def gather_rollout(rollout, pad_id: int, per_episode: list[torch.Tensor], per_token: list[torch.Tensor]):
    """Every rank's rollouts (engine.Rollout) and their (B_r,) and (B_r, N_r) companions, as one batch in
    rank order: prompts left-padded to the longest prompt, responses right-padded to the longest response,
    i.e. the batch one process would have built from all the prompts."""
    from chatloop.engine import Rollout

    P = rollout.prompt_len
    prompt = all_gather_padded(rollout.tokens[:, :P], pad_id, left=True)
    prompt_mask = all_gather_padded(rollout.attention_mask[:, :P], False, left=True)
    response = all_gather_padded(rollout.response, pad_id)
    mask = all_gather_padded(rollout.mask, False)
    whole = Rollout(tokens=torch.cat([prompt, response], 1), attention_mask=torch.cat([prompt_mask, mask], 1),
                    prompt_len=prompt.shape[1], response=response, logprobs=all_gather_padded(rollout.logprobs, 0.0),
                    mask=mask, ended=all_gather_padded(rollout.ended, False))
    return (whole, [all_gather_padded(x, 0.0) for x in per_episode], [all_gather_padded(x, 0.0) for x in per_token])


# ---------------------------------------------------------------- data


def shard(items: Sequence[T]) -> Sequence[T]:
    """This rank's contiguous share of a global batch (rank r gets items[r*n//W : (r+1)*n//W])."""
    n, r, w = len(items), rank(), world_size()
    return items[r * n // w : (r + 1) * n // w]


def micro_batches(ids: Sequence[T], batch_size: int) -> list[Sequence[T]]:
    """This rank's share of a step's global batch `ids`, cut into equal micro-batches of at most batch_size
    (equal, so that the mean of their mean losses is the mean over the share). One process: ids in chunks
    of batch_size, as before."""
    mine = shard(ids)
    n = len(mine)
    if n == 0:
        return []
    k = -(-n // batch_size)
    while n % k:
        k += 1
    return [mine[i * n // k : (i + 1) * n // k] for i in range(k)]


def regroup(micro_batches: Sequence[Sequence[T]], batch_size: int) -> tuple[list[Sequence[T]], float]:
    """This rank's share of a step's micro-batches (the step's items split over the ranks, in micro-batches
    of at most batch_size), and 1.0; unchanged in one process. A rank whose share is empty gets the
    step's first item with weight 0.0: it must still run forward and backward for the gradient all-reduce,
    and its loss, multiplied by the weight, adds nothing."""
    if not active():
        return list(micro_batches), 1.0
    mine = list(shard([item for micro in micro_batches for item in micro]))
    if not mine:
        return [[micro_batches[0][0]]], 0.0
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)], 1.0


def share_weight(local: float, total: float) -> float:
    """Factor on a rank's loss (a mean over its `local` items of a batch of `total`) that makes the ranks'
    averaged gradient the gradient of the mean over the whole batch: W * local / total."""
    return world_size() * local / total if total else 0.0


# ---------------------------------------------------------------- models


def wrap(model: nn.Module, parallel: str, device: torch.device, frozen: bool = False) -> nn.Module:
    """The module to train through: DDP around `model`, or `model` itself sharded in place by FSDP2.

    frozen: a model that is only evaluated (PPO's reference and reward model): left whole under DDP,
    sharded like the others under FSDP. Single process: `model` as it is.
    """
    if not active() or not isinstance(model, nn.Module):  # a WithoutAdapter view runs through its model's wrapper
        return model
    if parallel == "fsdp":
        if getattr(model, "adapter", None) is not None:
            raise UserError("--parallel=fsdp with --lora_rank: not supported (an adapter's frozen base is small "
                            "enough to replicate): use --parallel=ddp")
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world_size(),))
        for block in model.blocks:  # type: ignore[union-attr]
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)  # the rest (embeddings, final norm, head) in one group
        return model
    if parallel != "ddp":
        raise ValueError(f"parallel must be 'ddp' or 'fsdp', not {parallel!r}")
    if frozen:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The GPT inside a DDP wrapper (an FSDP2 model is its own module)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(unwrap(model), FSDPModule)


def reshard(model: nn.Module) -> None:
    """Under FSDP, put the parameters back into their shards before changing them in place: FSDP2 leaves the
    root's (embeddings, final norm, head) gathered after a forward, for the backward that usually follows, and
    a change to the gathered copy is lost."""
    if is_sharded(model):
        unwrap(model).reshard()  # type: ignore[operator]


@contextlib.contextmanager
def no_sync(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Skip the gradient all-reduce of backward passes inside (gradient accumulation: sync on the last)."""
    if not enabled or not active():
        yield
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif is_sharded(model):
        model.set_requires_gradient_sync(False)  # type: ignore[operator]
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)  # type: ignore[operator]
    else:
        yield


@contextlib.contextmanager
def whole_for_inference(model: nn.Module) -> Iterator[nn.Module]:
    """Decoding (PPO rollouts, sampled evaluations) makes a data-dependent number of forward passes, which
    sharded ranks cannot do in lockstep: under FSDP the parameters are gathered once for the whole block
    and gathered again only after it. Without FSDP, the model as it is."""
    if not is_sharded(model):
        yield unwrap(model)
        return
    from torch.distributed.fsdp import FSDPModule

    # The engine calls submodules directly (prefill); FSDP must first have seen the root run, or it takes the
    # first block to run for the root. Its lazy initialisation is what a first forward through the root does.
    model._get_fsdp_state()._lazy_init()  # type: ignore[operator]
    parts = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in parts:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield model
    finally:
        for m in parts:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


# ---------------------------------------------------------------- states


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict with a single GPT's keys (under FSDP a collective: full on rank 0, empty elsewhere)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=_options())
    inner = unwrap(model)
    state = inner.state_dict()
    trained = _adapter_trained(inner)
    if trained is not None:  # LoRA: the frozen base is its checkpoint's, not the state's
        state = {k: v for k, v in state.items() if k in trained}
    return state


def _adapter_trained(model: nn.Module) -> set[str] | None:
    """The names of a LoRA model's trained tensors (its adapters, a head); None for a model without an adapter."""
    if getattr(model, "adapter", None) is None:
        return None
    return {n for n, p in model.named_parameters() if p.requires_grad}


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict (as saved by one process or by `model_state`), sharding it under FSDP."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
    else:
        inner = unwrap(model)
        trained = _adapter_trained(inner)
        if trained is None:
            inner.load_state_dict(state)
            return
        if set(state) != trained:
            raise UserError(f"the train state holds {len(state)} tensors, but the model trains {len(trained)} (was "
                            "it saved with other --lora_* fields?): resume with the fields it was saved with")
        inner.load_state_dict(state, strict=False)


def _names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's order: the bridge between index-keyed and name-keyed states."""
    name_of = {id(p): n for n, p in unwrap(model).named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state in the single-process format (`optimizer.state_dict()`, keyed by index), full
    under FSDP too (a collective there; rank 0 gets it)."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    by_name = get_optimizer_state_dict(model, optimizer, options=_options())
    if not by_name:
        return {}
    index = {name: i for i, name in enumerate(_names(model, optimizer))}
    return {"state": {index[n]: s for n, s in by_name["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a single-process-format optimizer state, sharding it under FSDP."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _names(model, optimizer)
    by_name = {"state": {names[i]: s for i, s in state["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def gathered(model: nn.Module) -> nn.Module | None:
    """A plain single-device model with the full weights, for `checkpoint.save_model` on rank 0 (None on the
    other ranks). Under FSDP the weights are gathered (a collective: every rank calls this)."""
    inner = unwrap(model)
    if not is_sharded(inner):
        return inner if is_main() else None
    state = model_state(inner)
    if not is_main():
        return None
    from chatloop.model import GPT

    with torch.device("meta"):
        plain = GPT(inner.cfg)  # type: ignore[arg-type]
    plain = plain.to_empty(device="cpu")
    plain.load_state_dict(state)
    if plain.cfg.tie_embeddings and plain.lm_head is not None:
        plain.lm_head.weight = plain.tok_emb.weight
    plain.reward_bias = inner.reward_bias
    return plain


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. tokenizing into shared files), then the others (which find it done)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()
