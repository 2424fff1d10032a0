"""`chatloop sft`: supervised fine-tuning on demonstrations (docs/RECIPE.md §2: InstructGPT §3.5, Appendix C.1).

Steps:
  1. Skip if OUT already holds a finished checkpoint.
  2. Read demonstrations (chat messages, prompt/completion pairs, OpenAssistant trees), render them with the
     tokenizer's chat format into token ids and a loss mask (assistant tokens only), truncate (cut the
     prompt from the left, or drop the example; never cut an answer), and hold out a validation split.
  3. Load the model to fine-tune (residual dropout set from the config) and the AdamW optimizer.
  4. Resume from the newest training state in OUT/train_state, if any.
  5. Train for `epochs` epochs: each epoch a seeded shuffle, examples packed into rows of at most seq_len
     tokens (attention confined to each example by a block-diagonal mask and per-example position ids),
     cosine decay to min_lr_ratio of the peak.
  6. After each epoch: validation loss, optionally the mean reward-model score of sampled answers to the
     validation prompts, and a checkpoint in OUT/epochs/epoch-N.
  7. Select the epoch (by validation loss, or by RM score when a reward model is given: InstructGPT's rule,
     since RM score keeps improving after validation loss overfits) and write it as the stage's checkpoint.

Logged metrics:
  train/loss       mean cross-entropy per assistant token of the step
  train/lr         learning rate; train/grad_norm: global gradient norm before clipping
  perf/tokens_per_s  tokens of the examples (prompt and answer, padding not counted) per second
  data/epoch       epoch of the step
  val/loss         validation cross-entropy per assistant token, after each epoch
  val/rm_score     mean reward of sampled validation answers (only with --reward_model)
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from chatloop import distributed, lora
from chatloop.checkpoint import data_record, load_model, read_lineage, save_model
from chatloop.data.readers import read_demonstrations
from chatloop.device import autocast
from chatloop.engine import generate
from chatloop.errors import UserError
from chatloop.lora import LoraFields
from chatloop.model import GPT
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
class SFTConfig(StepConfig, LoraFields):
    out: str = "runs/sft"
    """Output directory: the selected checkpoint, epochs/epoch-N checkpoints, train_state/, metrics.jsonl."""
    model: str = ""
    """Checkpoint to fine-tune (a pretrained chatloop checkpoint, or an imported transformers one)."""
    data: list[str] = field(default_factory=list)
    """Demonstration files (JSONL): {"messages": [...]}, {"prompt", "completion"}, or OpenAssistant trees."""
    val_data: list[str] = field(default_factory=list)
    """Validation demonstrations; when empty, val_fraction of `data` is held out."""
    val_fraction: float = 0.05
    """Share of the demonstrations held out for validation when val_data is empty."""
    skip_invalid: bool = False
    """Skip invalid records (reporting how many and why) instead of stopping at the first one."""
    seq_len: int = 512
    """Longest example (prompt + answer) in tokens, and the length of a packed row."""
    truncation: Literal["cut_prompt", "drop"] = "cut_prompt"
    """An over-long example loses tokens from the start of its prompt ("cut_prompt") or is dropped ("drop");
    an answer is never cut: if cutting the prompt is not enough, the example is dropped."""
    packing: bool = True
    """Pack several examples into each row (attention stays within each example); else one per row."""
    epochs: int = 3
    """Passes over the demonstrations (InstructGPT: 16)."""
    max_steps: int = 0
    """Optimizer steps; 0 means epochs x steps per epoch."""
    lr: float = 1e-4
    """Peak learning rate (InstructGPT: 9.65e-6 at batch 32 for 1.3B/6B; tiny models want more)."""
    warmup_steps: int = 0
    """Linear warmup steps (InstructGPT: none)."""
    dropout: float = 0.1
    """Residual dropout during fine-tuning (InstructGPT: 0.2)."""
    batch_size: int = 8
    """Rows per micro-batch."""
    weight_decay: float = 0.0
    """Decoupled weight decay on weight matrices."""
    reward_model: str = ""
    """A reward-model checkpoint: select the epoch by the mean RM score of sampled validation answers."""
    select_by: Literal["auto", "val_loss", "rm_score"] = "auto"
    """Epoch selection: "auto" is rm_score when reward_model is given, else val_loss."""
    rm_prompts: int = 64
    """Validation prompts answered and scored per epoch for RM-score selection."""
    max_new_tokens: int = 64
    """Answer length budget when sampling for RM-score selection."""
    save_every: int = 200
    """Save the resumable training state every this many steps (and at each epoch's end)."""
    grad_checkpoint: bool = False
    """Recompute each block's activations in the backward pass instead of keeping them: about a third more compute
    for activation memory of one block instead of all (a real model at seq_len 512)."""


@dataclass
class Example:
    ids: list[int]
    """Token ids of the rendered conversation."""
    mask: list[bool]
    """True on tokens the loss falls on (assistant content and end of turn)."""
    prompt: list[dict[str, str]]
    """The conversation before the last assistant answer (for sampling at selection time)."""


def render_examples(conversations: list[list[dict[str, str]]], tokenizer: Tokenizer, seq_len: int,
                    truncation: str, report: Counter) -> list[Example]:
    """Rendered and truncated examples; `report` counts what truncation did."""
    examples = []
    for messages in conversations:
        ids, mask = tokenizer.render_chat(messages)
        if len(ids) > seq_len:
            first_learned = mask.index(True) if any(mask) else len(mask)
            excess = len(ids) - seq_len
            if truncation == "cut_prompt" and excess <= first_learned:
                ids, mask = ids[excess:], mask[excess:]
                report["prompt cut"] += 1
            else:
                report["dropped (too long)"] += 1
                continue
        if not any(mask):
            report["dropped (nothing to learn)"] += 1
            continue
        examples.append(Example(ids, mask, messages[:-1]))
    return examples


def pack_rows(order: np.ndarray, lengths: list[int], seq_len: int, packing: bool) -> list[list[int]]:
    """Rows of example indices in `order`; a row holds examples up to seq_len tokens (one if not packing)."""
    rows: list[list[int]] = []
    used = seq_len
    for i in order:
        if packing and rows and used + lengths[i] <= seq_len:
            rows[-1].append(int(i))
            used += lengths[i]
        else:
            rows.append([int(i)])
            used = lengths[i]
    return rows


def collate(rows: list[list[int]], examples: list[Example], pad_id: int, device: torch.device):
    """(B, T) ids, labels (-100 where no loss), position ids, and the attention mask: None when every row is
    one example (right padding under a causal mask changes nothing), else block-diagonal causal (B, 1, T, T)."""
    width = max(sum(len(examples[i].ids) for i in row) for row in rows)
    B = len(rows)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    labels = torch.full((B, width), -100, dtype=torch.long)
    positions = torch.zeros((B, width), dtype=torch.long)
    doc = torch.full((B, width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for d, i in enumerate(row):
            ex = examples[i]
            n = len(ex.ids)
            ids[r, at : at + n] = torch.tensor(ex.ids)
            # Position t predicts token t+1: the label of t is token t+1 where t+1 is learned.
            target = torch.tensor(ex.ids[1:] + [pad_id])
            learned = torch.tensor(ex.mask[1:] + [False])
            labels[r, at : at + n] = torch.where(learned, target, -100)
            positions[r, at : at + n] = torch.arange(n)
            doc[r, at : at + n] = d
            at += n
        doc[r, at:] = len(row) + torch.arange(width - at)  # each pad its own document: never attended to
    mask = None
    if any(len(row) > 1 for row in rows):
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        mask = ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]
        mask = mask.to(device)
        pos = positions.to(device)
    else:
        pos = None
    return ids.to(device), labels.to(device), pos, mask


def token_losses(model: GPT, ids, labels, positions, mask, device, precision) -> torch.Tensor:
    """(B, T) cross-entropy per position, 0 where the label is -100."""
    with autocast(device, precision):
        logits = model(ids, attention_mask=mask, position_ids=positions)
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none", ignore_index=-100)
    return loss.view(labels.shape)


@torch.no_grad()
def validation_loss(model: GPT, examples: list[Example], cfg: SFTConfig, pad_id: int, device, precision) -> float:
    model.eval()
    rows = pack_rows(np.arange(len(examples)), [len(e.ids) for e in examples], cfg.seq_len, cfg.packing)
    total, count = 0.0, 0
    for b in range(0, len(rows), cfg.batch_size):
        ids, labels, positions, mask = collate(rows[b : b + cfg.batch_size], examples, pad_id, device)
        total += token_losses(model, ids, labels, positions, mask, device, precision).sum().item()
        count += int((labels != -100).sum())
    model.train()
    return total / max(1, count)


def train_step(train_model: torch.nn.Module, model: GPT, optimizer: torch.optim.Optimizer,
               micro_batches: list[list[list[int]]], train: list[Example], pad_id: int, cfg: SFTConfig, device,
               precision: str, guard: StageGuard | None = None) -> tuple[float, float, int]:
    """Step 5's optimizer step over its micro-batches: the loss (this rank's), the gradient norm, the tokens seen.
    With `guard`, a non-finite loss or gradient norm stops the stage or skips the update (StageGuard.finite)."""
    # Under torchrun: this rank's share of the step's rows; the loss is normalised by the learned tokens of
    # the whole step and scaled by the number of ranks, whose gradients are averaged.
    micro_batches, weight = distributed.regroup(micro_batches, cfg.batch_size)
    batches = [collate(rows, train, pad_id, device) for rows in micro_batches]
    n_learned = distributed.all_sum(sum(int((b[1] != -100).sum()) for b in batches) * weight)[0]
    scale = weight * distributed.world_size()
    loss_sum = 0.0
    for i, (ids, labels, positions, mask) in enumerate(batches):
        with distributed.no_sync(train_model, enabled=i < len(batches) - 1):
            loss = token_losses(train_model, ids, labels, positions, mask, device, precision).sum() * scale / n_learned
            loss.backward()
        loss_sum += loss.item()
    tokens = sum(len(train[i].ids) for rows in micro_batches for row in rows for i in row)
    grad_norm = apply_update(optimizer, model.parameters(), cfg.grad_clip, loss_sum, guard)
    return loss_sum, grad_norm, tokens


def load_examples(cfg: SFTConfig, tokenizer: Tokenizer) -> tuple[list[Example], list[Example], Counter, Counter]:
    """Step 2: the rendered train and validation examples, the invalid records skipped and the truncations."""
    skipped: Counter = Counter()
    conversations = [c for path in cfg.data for c in read_demonstrations(path, cfg.skip_invalid, skipped)]
    train_conv, val_conv = split_validation(conversations, cfg, skipped)
    report: Counter = Counter()
    train = render_examples(train_conv, tokenizer, cfg.seq_len, cfg.truncation, report)
    val = render_examples(val_conv, tokenizer, cfg.seq_len, cfg.truncation, report)
    if not train or not val:
        raise UserError(f"no training or validation examples left after truncation to {cfg.seq_len} tokens")
    if skipped:
        print(f"sft: skipped {sum(skipped.values())} invalid record(s): "
              + "; ".join(f"{n} x {why}" for why, n in skipped.most_common()))
    if report:
        print("sft: truncation: " + ", ".join(f"{n} {what}" for what, n in report.items()))
    return train, val, skipped, report


def step_plan(train: list[Example], cfg: SFTConfig) -> tuple[list[tuple[int, list[list[list[int]]]]], set[int]]:
    """Every optimizer step of every epoch as (epoch, its micro-batches of rows), in a seeded order per epoch
    (packed rows with packing); and the steps that end an epoch."""
    lengths = [len(e.ids) for e in train]
    plan = []
    steps_per_epoch = []
    for epoch in range(cfg.epochs):
        rows = pack_rows(np.random.default_rng([cfg.seed, epoch]).permutation(len(train)), lengths, cfg.seq_len,
                         cfg.packing)
        micro = [rows[b : b + cfg.batch_size] for b in range(0, len(rows), cfg.batch_size)]
        n_steps = max(1, len(micro) // cfg.grad_accum)
        steps_per_epoch.append(n_steps)
        plan += [(epoch, micro[s * cfg.grad_accum : (s + 1) * cfg.grad_accum]) for s in range(n_steps)]
    return plan, set(np.cumsum(steps_per_epoch).tolist())


def end_of_epoch(model: GPT, reward_model: GPT | None, val: list[Example], tokenizer: Tokenizer, cfg: SFTConfig,
                 epoch: int, step: int, device, precision: str) -> dict:
    """Step 6: the epoch's validation loss (and RM score), and its checkpoint under epochs/epoch-N."""
    row = {"epoch": epoch, "step": step, "val/loss": validation_loss(model, val, cfg, tokenizer.pad_id, device,
                                                                      precision)}
    if reward_model is not None:
        prompts = [e.prompt for e in val[: cfg.rm_prompts]]
        row["val/rm_score"] = mean_rm_score(model, reward_model, tokenizer, prompts, cfg, device)
    plain = distributed.gathered(model)  # the whole model, on rank 0 only
    if plain is not None:
        save_model(plain, Path(cfg.out) / "epochs" / f"epoch-{epoch}", tokenizer,
                   lineage={"stage": "sft-epoch", "parent": cfg.model, "metrics": row})
    return row


@torch.no_grad()
def mean_rm_score(policy: GPT, reward_model: GPT, tokenizer: Tokenizer, prompts: list[list[dict[str, str]]],
                  cfg: SFTConfig, device) -> float:
    """Mean reward of answers sampled (temperature 1) to the prompts; the selection score of InstructGPT."""
    policy.eval()
    encoded = [tokenizer.render_chat(p, add_generation_prompt=True)[0] for p in prompts]
    room = policy.cfg.max_seq_len - max(len(e) for e in encoded)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    with distributed.whole_for_inference(policy) as whole:
        rollout = generate(whole, encoded, max(1, min(cfg.max_new_tokens, room)), tokenizer.pad_id,
                           tokenizer.stop_ids, temperature=1.0, generator=generator)
    policy.train()
    return reward_model.reward(rollout.tokens, rollout.attention_mask).mean().item()


def split_validation(conversations, cfg: SFTConfig, skipped: Counter):
    if cfg.val_data:
        val = [c for path in cfg.val_data for c in read_demonstrations(path, cfg.skip_invalid, skipped)]
        return conversations, val
    if not 0 < cfg.val_fraction < 1:
        raise UserError("--val_fraction: expected a number between 0 and 1 when no --val_data is given")
    order = np.random.default_rng(cfg.seed).permutation(len(conversations))
    n_val = max(1, int(len(conversations) * cfg.val_fraction))
    return [conversations[i] for i in order[n_val:]], [conversations[i] for i in order[:n_val]]


def require_inputs(cfg: SFTConfig) -> None:
    if not cfg.model:
        raise UserError("--model: give the checkpoint to fine-tune")
    if not cfg.data:
        raise UserError("--data: give at least one demonstrations file")


def sft(cfg: SFTConfig) -> Path:
    out = Path(cfg.out)
    # step 1
    opened = open_stage("sft", cfg)
    if opened is None:
        return out
    device, precision = opened
    require_inputs(cfg)
    tokenizer = Tokenizer.load(cfg.model)

    # step 2
    train, val, skipped, report = load_examples(cfg, tokenizer)

    # step 3
    model = lora.attach(load_model(cfg.model, device=device, dropout=cfg.dropout,
                                   grad_checkpoint=cfg.grad_checkpoint), cfg, cfg.model)
    if cfg.seq_len > model.cfg.max_seq_len:
        raise UserError(f"--seq_len={cfg.seq_len} exceeds the model's max_seq_len {model.cfg.max_seq_len}")
    train_model = distributed.wrap(model, cfg.parallel, device)  # under torchrun: DDP or FSDP2
    optimizer = make_optimizer(model, cfg, device)
    plan, epoch_ends = step_plan(train, cfg)
    total_steps = min(cfg.max_steps, len(plan)) if cfg.max_steps else len(plan)

    # step 4
    epoch_metrics: list[dict] = []
    start_step, state, log = resume(out, device, model, optimizer, "sft", total_steps)
    if state is not None:
        epoch_metrics = state["epoch_metrics"]
    reward_model = load_model(cfg.reward_model, device=device).eval() if cfg.reward_model else None
    select_by = cfg.select_by if cfg.select_by != "auto" else ("rm_score" if reward_model else "val_loss")
    if select_by == "rm_score" and reward_model is None:
        raise UserError("--select_by=rm_score needs --reward_model")
    print(f"sft: {len(train)} train / {len(val)} val examples, {total_steps} steps over {cfg.epochs} epochs, "
          f"{device} {precision}, selecting by {select_by}")

    # step 5
    if start_step == 0:
        initial = validation_loss(model, val, cfg, tokenizer.pad_id, device, precision)
        log.log(0, {"val/loss": initial})
        epoch_metrics.append({"epoch": 0, "step": 0, "val/loss": initial})
        print(f"sft: before fine-tuning: val/loss {initial:.4f}")
    model.train()
    bar = tqdm(total=total_steps, initial=start_step, disable=not cfg.progress or not distributed.is_main(),
               unit="step", dynamic_ncols=True)
    last_time, tokens_seen = time.perf_counter(), 0
    with StageGuard("sft", out, cfg.on_nonfinite) as guard:  # SIGTERM / SIGINT, non-finite numbers
        for step in range(start_step, total_steps):
            epoch, micro_batches = plan[step]
            lr = lr_at(step, cfg, total_steps)
            set_lr(optimizer, lr)
            loss_sum, grad_norm, tokens = train_step(train_model, model, optimizer, micro_batches, train,
                                                     tokenizer.pad_id, cfg, device, precision, guard.at(step + 1))
            tokens_seen += tokens
            done = step + 1
            metrics: dict[str, float] = {}
            if done % cfg.log_every == 0 or done == total_steps:
                now = time.perf_counter()
                loss_sum, tokens_seen = distributed.all_mean(loss_sum)[0], distributed.all_sum(tokens_seen)[0]
                metrics.update({"train/loss": loss_sum, "train/lr": lr, "train/grad_norm": grad_norm,
                                "perf/tokens_per_s": tokens_seen / (now - last_time), "data/epoch": epoch})
                last_time, tokens_seen = now, 0
                bar.set_postfix(loss=f"{loss_sum:.3f}", epoch=epoch)

            # step 6
            if done in epoch_ends or done == total_steps:
                row = end_of_epoch(model, reward_model, val, tokenizer, cfg, epoch + 1, done, device, precision)
                epoch_metrics.append(row)
                metrics.update({k: v for k, v in row.items() if k.startswith("val/")})
                last_time, tokens_seen = time.perf_counter(), 0
                print(f"sft: epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if "/" in k))
            if metrics:
                log.log(done, metrics)
            if guard.end_step(done, total_steps, done % cfg.save_every == 0 or done in epoch_ends
                              or done == total_steps,
                              lambda: {"model": distributed.model_state(model),
                                       "optimizer": distributed.optimizer_state(model, optimizer),
                                       "epoch_metrics": epoch_metrics}, cfg.keep_states, bar, log):
                last_time = time.perf_counter()
    bar.close()
    log.close()

    # step 7
    if not distributed.is_main():
        return out
    key = "val/rm_score" if select_by == "rm_score" else "val/loss"
    trained = [r for r in epoch_metrics if r["epoch"] > 0]
    best = (max if select_by == "rm_score" else min)(trained, key=lambda r: r[key])
    best_dir = out / "epochs" / f"epoch-{best['epoch']}"
    selected = load_model(best_dir, device=device, merge=False)  # an adapter stays one
    save_model(selected, out, tokenizer, lineage={
        "stage": "sft", "parent": cfg.model, "parent_lineage": (read_lineage(cfg.model) or {}).get("stage"),
        "data": data_record(cfg.data + cfg.val_data), "config": config_record(cfg),
        "metrics": {**best, "selected_by": select_by, "epochs": epoch_metrics, "truncation": dict(report),
                    "skipped_invalid": dict(skipped), "train_examples": len(train), "val_examples": len(val)},
    })
    print(f"sft: done. selected epoch {best['epoch']} by {select_by} ({key} {best[key]:.4f}) -> {out}")
    return out

