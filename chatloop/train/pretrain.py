"""`chatloop pretrain`: next-token prediction on text.

Steps:
  1. Skip if OUT already holds a finished checkpoint.
  2. Tokenize the inputs once into token shards (reused while the inputs and tokenizer are unchanged).
  3. Build the model from a preset (or load a checkpoint to continue from) and the AdamW optimizer.
  4. Resume from the newest training state in OUT/train_state, if any.
  5. Train: per step, grad_accum micro-batches of packed windows, clip, step, schedule.
  6. Every eval_every steps, validation loss and perplexity; every save_every steps, the training state.
  7. Save the Hugging Face-format checkpoint with its lineage and final metrics.

Logged metrics (metrics.jsonl and TensorBoard):
  train/loss        mean cross-entropy (nats/token) of the step's micro-batches
  train/lr          learning rate of the step
  train/grad_norm   global gradient norm before clipping
  perf/tokens_per_s training tokens per second over the last log interval
  perf/mfu          model FLOPs utilisation: (6N + 12LTC) * tokens/s over the measured peak FLOP/s
  data/sample_index index of the step's first sample in the seeded order (consecutive steps differ by
                    the global batch: no batch repeated or skipped, also across resumes)
  val/loss          validation cross-entropy (nats/token); val/ppl = exp(val/loss)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from chatloop import distributed
from chatloop.checkpoint import data_record, load_model, save_model
from chatloop.data.corpus import TokenWindows, build_shards
from chatloop.device import autocast, measure_peak_flops
from chatloop.errors import UserError
from chatloop.model import GPT, PRESETS, ModelOverrides, lm_loss, preset
from chatloop.tokenizer import Tokenizer
from chatloop.train.trainer import (
    StageGuard,
    StepConfig,
    apply_update,
    config_record,
    lr_at,
    make_optimizer,
    open_stage,
    resume,
    set_lr,
)


@dataclass
class PretrainConfig(StepConfig):
    out: str = "runs/pretrain"
    """Output directory: the checkpoint, train_state/, tokens/, metrics.jsonl and tb/."""
    compile: bool = False
    """torch.compile the model and loss (faster steps after a compile of tens of seconds; pretraining only: the
    other stages' batches change shape every step)."""
    tokenizer: str = ""
    """Directory with tokenizer.json (from `chatloop tokenizer`); ignored when init_from has its own."""
    inputs: list[str] = field(default_factory=list)
    """Training text: .txt (one document), .jsonl with a text field (one document per line), .gz of either."""
    val_inputs: list[str] = field(default_factory=list)
    """Validation text; when empty, the last val_fraction of the training tokens."""
    val_fraction: float = 0.05
    """Share of the training token stream held out for validation when val_inputs is empty."""
    text_field: str = "text"
    """Field holding the document in .jsonl inputs."""
    preset: str = "tiny"
    """Model shape: tiny, small (~30M), gpt1, gpt2-small/medium/large/xl, 1.3b, 6b."""
    model: ModelOverrides = field(default_factory=ModelOverrides)  # type: ignore[valid-type]
    """Fields changed from the preset (e.g. --model.n_layer=2); vocab_size defaults to the tokenizer's."""
    init_from: str = ""
    """Continue from this checkpoint directory (ours, or transformers' Llama/Mistral/Qwen2/GPT-2) instead of a
    preset."""
    seq_len: int = 256
    """Tokens per training window (at most the model's max_seq_len)."""
    eval_every: int = 100
    """Run validation every this many steps (and at the end)."""
    eval_batches: int = 20
    """Micro-batches of validation data per evaluation."""
    peak_flops: float = 0.0
    """Peak FLOP/s of the device in the chosen precision, for MFU; 0 measures a matmul at start."""


def build_model(cfg: PretrainConfig, vocab_size: int, device: torch.device) -> GPT:
    if cfg.init_from:
        return load_model(cfg.init_from, device=device)
    try:
        overrides = {k: v for k, v in cfg.model.__dict__.items() if v is not None}
        overrides.setdefault("vocab_size", 64 * math.ceil(vocab_size / 64))  # multiple of 64: faster matmuls
        overrides.setdefault("max_seq_len", max(cfg.seq_len, 1))
        model_cfg = preset(cfg.preset, overrides)
    except ValueError as e:
        raise UserError(f"--preset/--model: {e}") from None
    if model_cfg.vocab_size < vocab_size:
        raise UserError(f"--model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's {vocab_size}")
    return GPT(model_cfg).to(device)


def forward_loss(model: GPT, compile: bool = False) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """(inputs, targets) -> mean loss. Compiled, the loss is in the same graph as the model, so the
    cross-entropy's softmax passes fuse too (a few % faster than compiling the model alone on CPU)."""

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return lm_loss(model(x), y)

    return torch.compile(loss_fn) if compile else loss_fn


def train_step(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    model: GPT,
    optimizer: torch.optim.Optimizer,
    micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    grad_accum: int,
    grad_clip: float,
    device: torch.device,
    precision: str,
    guard: StageGuard | None = None,
) -> tuple[float, float]:
    """One optimizer step: forward, loss and backward per micro-batch, then clip and AdamW.

    loss_fn comes from `forward_loss`. Returns the mean loss of the micro-batches and the gradient norm
    before clipping. benchmarks/train_throughput.py times exactly this function. Under torchrun, `model` is
    the DDP/FSDP wrapper and the gradients are averaged over the ranks at the last micro-batch. With `guard`, a
    non-finite loss or gradient norm stops the stage or skips the update (StageGuard.finite).
    """
    loss_sum = 0.0
    for i, (x, y) in enumerate(micro_batches):
        with distributed.no_sync(model, enabled=i < grad_accum - 1):
            with autocast(device, precision):
                loss = loss_fn(x, y)
            (loss / grad_accum).backward()
        loss_sum += loss.item()
    grad_norm = apply_update(optimizer, model.parameters(), grad_clip, loss_sum / grad_accum, guard)
    return loss_sum / grad_accum, grad_norm


@torch.no_grad()
def validation_loss(model: GPT, val: TokenWindows, cfg: PretrainConfig, device, precision) -> float:
    model.eval()
    total, count = 0.0, 0
    for x, y in val.sequential(cfg.batch_size, cfg.eval_batches, device):
        with autocast(device, precision):
            logits = model(x)
        total += lm_loss(logits, y, reduction="sum").item()
        count += y.numel()
    model.train()
    return total / count


def tokenizer_dir(cfg: PretrainConfig) -> Path:
    """init_from's own tokenizer, else --tokenizer."""
    tok_dir = Path(cfg.init_from) if cfg.init_from and (Path(cfg.init_from) / "tokenizer.json").is_file() \
        else Path(cfg.tokenizer)
    if not str(tok_dir) or str(tok_dir) == ".":
        raise UserError("--tokenizer: give the directory written by `chatloop tokenizer`")
    return tok_dir


def token_data(cfg: PretrainConfig, out: Path) -> tuple[Tokenizer, dict, TokenWindows, TokenWindows]:
    """Step 2: the tokenizer, the text tokenized once into OUT/tokens (its metadata), and the train and validation
    windows."""
    tok_dir = tokenizer_dir(cfg)
    tokenizer = Tokenizer.load(tok_dir)
    with distributed.main_first():  # one process writes the shards
        meta = build_shards(tokenizer, cfg.inputs, cfg.val_inputs, cfg.val_fraction, cfg.text_field,
                            out / "tokens", tok_dir / "tokenizer.json")
    train = TokenWindows(out / "tokens" / "train.bin", meta["dtype"], cfg.seq_len, cfg.seed)
    val = TokenWindows(out / "tokens" / "val.bin", meta["dtype"], cfg.seq_len, cfg.seed)
    return tokenizer, meta, train, val


def pretrain(cfg: PretrainConfig) -> Path:
    out = Path(cfg.out)
    # step 1
    opened = open_stage("pretrain", cfg)
    if opened is None:
        return out
    device, precision = opened
    if not cfg.init_from and cfg.preset not in PRESETS:
        raise UserError(f"--preset: unknown model preset {cfg.preset!r}; expected one of: {', '.join(PRESETS)}")

    # step 2
    tokenizer, meta, train, val = token_data(cfg, out)

    # step 3
    model = build_model(cfg, tokenizer.vocab_size, device)
    if cfg.seq_len > model.cfg.max_seq_len:
        raise UserError(f"--seq_len={cfg.seq_len} exceeds the model's max_seq_len {model.cfg.max_seq_len}")
    train_model = distributed.wrap(model, cfg.parallel, device)  # under torchrun: DDP or FSDP2
    optimizer = make_optimizer(model, cfg, device)
    loss_fn = forward_loss(train_model, cfg.compile)

    # step 4
    start_step, _, log = resume(out, device, model, optimizer, "pretrain", cfg.max_steps)

    global_batch = cfg.batch_size * cfg.grad_accum
    if global_batch % distributed.world_size():
        raise UserError(f"--batch_size x --grad_accum = {global_batch} must be divisible by the number of processes "
                        f"({distributed.world_size()})")
    tokens_per_step = global_batch * cfg.seq_len
    peak = (cfg.peak_flops or measure_peak_flops(device, precision)) * distributed.world_size()
    flops_per_token = model.flops_per_token(cfg.seq_len)
    n_params = model.num_params()
    print(f"pretrain: {n_params / 1e6:.2f}M parameters, {meta['train_tokens']:,} train tokens, "
          f"{tokens_per_step:,} tokens/step, {device} {precision}, unigram entropy "
          f"{meta['unigram_entropy_nats']:.3f} nats")

    # step 5
    model.train()
    bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not cfg.progress or not distributed.is_main(),
               unit="step", dynamic_ncols=True)
    last_time, last_step = time.perf_counter(), start_step
    val_loss = None
    with StageGuard("pretrain", out, cfg.on_nonfinite) as guard:  # SIGTERM / SIGINT, non-finite numbers
        for step in range(start_step, cfg.max_steps):
            lr = lr_at(step, cfg, cfg.max_steps)
            set_lr(optimizer, lr)
            # This rank's share of the step's samples (all of them in one process), in equal micro-batches.
            shares = distributed.micro_batches(step * global_batch + np.arange(global_batch), cfg.batch_size)
            loss, grad_norm = train_step(loss_fn, train_model, optimizer, (train.batch(ids, device) for ids in shares),
                                         len(shares), cfg.grad_clip, device, precision, guard.at(step + 1))
            done = step + 1

            # step 6
            metrics: dict[str, float] = {}
            if done % cfg.log_every == 0 or done == cfg.max_steps:
                now = time.perf_counter()
                tps = (done - last_step) * tokens_per_step / (now - last_time)
                last_time, last_step = now, done
                loss = distributed.all_mean(loss)[0]
                metrics.update({"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                                "perf/tokens_per_s": tps, "perf/mfu": tps * flops_per_token / peak,
                                "data/sample_index": int(step * global_batch)})
                bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", tok_s=f"{tps:,.0f}",
                                mfu=f"{100 * metrics['perf/mfu']:.0f}%")
            if done % cfg.eval_every == 0 or done == cfg.max_steps:
                val_loss = validation_loss(model, val, cfg, device, precision)
                metrics.update({"val/loss": val_loss, "val/ppl": math.exp(min(val_loss, 50))})
                last_time = time.perf_counter()  # evaluation time is not training throughput
            if metrics:
                log.log(done, metrics)
            if guard.end_step(done, cfg.max_steps, done % cfg.save_every == 0 or done == cfg.max_steps,
                              lambda: {"model": distributed.model_state(model),
                                       "optimizer": distributed.optimizer_state(model, optimizer)},
                              cfg.keep_states, bar, log):
                last_time = time.perf_counter()
    bar.close()
    log.close()

    # step 7
    if val_loss is None:
        val_loss = validation_loss(model, val, cfg, device, precision)
    final = {"val/loss": val_loss, "val/ppl": math.exp(min(val_loss, 50)),
             "unigram_entropy_nats": meta["unigram_entropy_nats"], "train_tokens": meta["train_tokens"],
             "steps": cfg.max_steps, "parameters": n_params}
    parent = str(cfg.init_from) if cfg.init_from else None
    plain = distributed.gathered(model)  # the whole model, on rank 0 only
    if plain is not None:
        save_model(plain, out, tokenizer, lineage={
            "stage": "pretrain", "parent": parent, "tokenizer": str(tokenizer_dir(cfg)),
            "data": data_record(cfg.inputs + cfg.val_inputs), "config": config_record(cfg), "metrics": final,
        })
    print(f"pretrain: done. val loss {val_loss:.3f} nats (ppl {final['val/ppl']:.2f}; unigram entropy "
          f"{meta['unigram_entropy_nats']:.3f}) -> {out}")
    return out
