"""`chatloop rm`: a reward model from K-wise rankings (docs/RECIPE.md §3: InstructGPT §3.5, C.2); `chatloop rm-eval`:
a reward model's accuracy on held-out rankings.

Steps:
  1. Skip if OUT already holds a finished checkpoint.
  2. Read rankings (chatloop K-wise rankings, pairwise chosen/rejected, OpenAssistant trees, Anthropic HH)
     and hold out a validation split (whole conversations: rankings sharing a first user message), and with
     --val_labelers every ranking of those labelers.
  3. Start from the SFT checkpoint with a scalar head ~ N(0, 1/sqrt(d+1)) in place of the unembedding.
  4. Resume from the newest training state, if any.
  5. Train (1 epoch by default, cosine to 10%): a batch is a set of prompts; all K responses of all its
     prompts go through ONE forward pass (K passes per prompt, not 2*C(K,2)); the reward is read at each
     response's last real token; each prompt contributes the mean over its C(K,2) pairs (ties give none) of
     -log sigmoid(r_w - r_l), so every prompt weighs the same whatever its K.
     With --members N, steps 3-5 run N times (seeds seed, seed+1, ...: each its own head initialisation and
     data order; train states in OUT/members/I) and the N models' weights are averaged into one (WARM).
  6. Normalise (in fp32): a gain so that the training answers to one prompt spread with std 1 on average (unless
     --no-normalize_gain), folded into the head's weights, and a bias so that the reference answers
     (demonstrations) score a mean of 0, stored in config.json ("reward_bias") and applied by `GPT.reward`.
  7. Evaluate on the held-out rankings (and on the held-out labelers' with --val_labelers: InstructGPT's two
     numbers) and save the sequence-classification checkpoint.

Logged metrics:
  train/loss      the grouped ranking loss of the step (nats)
  train/accuracy  share of the step's pairs ordered right by the model
  train/lr, train/grad_norm, perf/responses_per_s, perf/comparisons_per_s
  val/accuracy, val/log_loss  on held-out pairs (at the end)
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from chatloop import distributed, lora
from chatloop.checkpoint import data_record, load_model, save_model
from chatloop.data.formats import prompt_messages, ranking_pairs
from chatloop.data.readers import read_demonstrations, read_rankings
from chatloop.device import autocast, resolve_device, resolve_precision
from chatloop.errors import UserError
from chatloop.io import atomic_write_json
from chatloop.lora import LoraFields
from chatloop.model import GPT
from chatloop.tokenizer import Tokenizer
from chatloop.train.trainer import (
    StageGuard,
    StepConfig,
    apply_update,
    config_record,
    length_grouped_order,
    lr_at,
    make_optimizer,
    open_stage,
    resume,
    seed_everything,
    set_lr,
)


@dataclass
class RMConfig(StepConfig, LoraFields):
    out: str = "runs/rm"
    """Output directory: the reward-model checkpoint (sequence classification), train_state/, metrics, eval."""
    model: str = ""
    """The SFT checkpoint to start from (its unembedding is replaced by a scalar head)."""
    data: list[str] = field(default_factory=list)
    """Ranking files: chatloop rankings or pairwise records, OpenAssistant trees, Anthropic HH transcripts."""
    val_data: list[str] = field(default_factory=list)
    """Held-out rankings; when empty, val_fraction of the conversations of `data`."""
    val_fraction: float = 0.1
    """Share of the conversations (rankings grouped by first user message) held out when val_data is empty."""
    val_labelers: list[str] = field(default_factory=list)
    """Labelers (labeler_id) held out as well as conversations: the RM never trains on their rankings, and
    eval.json reports its accuracy on them (`held_out_labelers`) beside the held-out conversations of the
    training labelers (InstructGPT: 69.6% against 72.4%)."""
    skip_invalid: bool = False
    """Skip invalid records (reporting how many and why) instead of stopping at the first one."""
    reference: list[str] = field(default_factory=list)
    """Demonstrations whose answers define reward 0 (the bias); empty means the best-ranked training answers."""
    normalize_gain: bool = True
    """Also scale rewards so that the answers to one prompt (the training rankings' K answers) spread with std 1
    on average, folded into the head: what PPO's advantages see, so that its kl_coef weighs the same against any
    RM (Ziegler et al. scale to std 1 too). Without it, two RMs of the same data differ in scale by up to 1.4x."""
    normalize_prompts: int = 0
    """Training prompts whose answers set the gain and the bias (the first N of a seeded shuffle); 0: all. Scoring
    every training answer once more in fp32 costs a real model's RM as long as a third of its training."""
    members: int = 1
    """Reward models trained from the same start on the same rankings (seeds seed, seed+1, ...) and averaged
    weight by weight into the one saved: WARM (Ramé et al. 2024), an ensemble's robustness at the inference cost
    of one model, for N times the training. Not in the default loop: on the default world (seed 0, RM against
    the judge on SFT's own pairs / best-of-4) 2 members scored 0.734 / 60.5% where the first alone scores 0.755 /
    60.3% (BENCHMARKS.md, session 11)."""
    epochs: int = 1
    """Passes over the rankings (InstructGPT: 1; the RM overfits quickly)."""
    max_steps: int = 0
    """Optimizer steps; 0 means epochs x steps per epoch."""
    batch_size: int = 16
    """Prompts per micro-batch (each with all its K responses; InstructGPT: 64)."""
    lr: float = 5e-5
    """Peak learning rate (InstructGPT: 9e-6 for 6B; small models take more)."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    weight_decay: float = 0.0
    """Decoupled weight decay on weight matrices."""
    seq_len: int = 512
    """Longest prompt + response in tokens; longer ones keep the end of the prompt (the answer is kept)."""
    save_every: int = 200
    """Save the resumable training state every this many steps."""
    grad_checkpoint: bool = False
    """Recompute each block's activations in the backward pass instead of keeping them: about a third more compute
    for activation memory of one block instead of all (a real model's K answers at seq_len 384)."""


@dataclass
class RMEvalConfig:
    model: str = ""
    """The reward-model checkpoint to evaluate."""
    data: list[str] = field(default_factory=list)
    """Held-out rankings (the formats `chatloop rm` reads)."""
    out: str = ""
    """Where to write the report (JSON, atomically); empty prints it only."""
    skip_invalid: bool = False
    """Skip invalid records (reporting how many and why) instead of stopping at the first one."""
    seq_len: int = 512
    """Longest prompt + response in tokens; longer ones keep the end of the prompt (the answer is kept)."""
    batch_size: int = 16
    """Ranked prompts per forward pass."""
    device: str = "auto"
    """"auto", "cpu" or "cuda"."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Matmul precision (as in training)."""


def rm_eval(cfg: RMEvalConfig) -> dict:
    """Accuracy and log loss on the untied pairs of held-out rankings (and how many pairs were tied)."""
    if not cfg.model or not cfg.data:
        raise UserError("--model (a reward-model checkpoint) and --data (held-out rankings) are required")
    device = resolve_device(cfg.device)
    model = load_model(cfg.model, device=device)
    if model.score is None:
        raise UserError(f"--model={cfg.model}: not a reward model (no scalar head)")
    tokenizer = Tokenizer.load(cfg.model)
    groups = encode_rankings([r for p in cfg.data for r in read_rankings(p, cfg.skip_invalid)], tokenizer,
                             cfg.seq_len)
    report = evaluate_rm(model, groups, tokenizer.pad_id, device, resolve_precision(cfg.precision, device),
                         cfg.batch_size)
    print_eval(report)
    if cfg.out:
        atomic_write_json(cfg.out, report)
    return report


@dataclass
class RMGroup:
    """One ranked prompt: K tokenized responses (prompt + answer) and their pairs."""

    sequences: list[list[int]]
    ranks: list[int]
    pairs: list[tuple[int, int]]

    @property
    def ties(self) -> int:
        """Pairs of responses ranked equal: no preference, so in neither the loss nor the accuracy."""
        return len(self.ranks) * (len(self.ranks) - 1) // 2 - len(self.pairs)


def encode_rankings(rankings: list[dict], tokenizer: Tokenizer, seq_len: int) -> list[RMGroup]:
    """Tokenize each (prompt, response); rankings whose responses all tie (no pair) are dropped.

    Over-long sequences lose the prompt's start first; a response longer than seq_len - 1 is cut but keeps its
    end-of-turn token last, so every reward is read at an end of turn, as PPO reads it (OpenRLHF does the same).
    """
    groups = []
    for r in rankings:
        pairs = ranking_pairs(r["ranks"])
        if not pairs:
            continue
        prompt_ids = tokenizer.render_chat(prompt_messages(r["prompt"]), add_generation_prompt=True)[0]
        sequences = []
        for response in r["responses"]:
            answer = tokenizer.encode_reply(response) + [tokenizer.end_of_turn_id or tokenizer.eos_id]
            if len(answer) > seq_len - 1:
                answer = answer[: seq_len - 2] + answer[-1:]
            sequences.append(prompt_ids[-(seq_len - len(answer)):] + answer)
        groups.append(RMGroup(sequences, r["ranks"], pairs))
    return groups


def reward_scores(model: torch.nn.Module, sequences: list[list[int]], pad_id: int, device, precision: str = "fp32"
                  ) -> torch.Tensor:
    """(N,) rewards (GPT.reward): one forward pass over all sequences (right-padded). `model` is the reward model or,
    in training, its DDP/FSDP wrapper (the forward must be the wrapper's, for the gradients to synchronise)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = True
    with autocast(device, precision):
        return distributed.unwrap(model).reward(ids.to(device), mask.to(device), right_padded=True, through=model)


def grouped_loss(rewards: torch.Tensor, groups: list[RMGroup]) -> tuple[torch.Tensor, int, int]:
    """Mean over prompts of the mean over its pairs of -log sigmoid(r_w - r_l); (loss, correct, pairs)."""
    losses, correct, total, at = [], 0, 0, 0
    for g in groups:
        r = rewards[at : at + len(g.sequences)]
        at += len(g.sequences)
        w = torch.tensor([p[0] for p in g.pairs], device=r.device)
        l_ = torch.tensor([p[1] for p in g.pairs], device=r.device)
        margin = r[w] - r[l_]
        losses.append(-F.logsigmoid(margin).mean())  # the 1/C(K,2) of InstructGPT's loss
        correct += int((margin > 0).sum())
        total += len(g.pairs)
    return torch.stack(losses).mean(), correct, total


@torch.no_grad()
def evaluate_rm(model: GPT, groups: list[RMGroup], pad_id: int, device, precision: str, batch_size: int) -> dict:
    """Pairwise accuracy and log loss on the untied pairs (the tied ones are counted), split by K and by rank
    distance, and a calibration table."""
    model.eval()
    by_k, by_distance = defaultdict(list), defaultdict(list)
    margins, log_losses = [], []
    for b in range(0, len(groups), batch_size):
        batch = groups[b : b + batch_size]
        rewards = reward_scores(model, [s for g in batch for s in g.sequences], pad_id, device, precision)
        at = 0
        for g in batch:
            r = rewards[at : at + len(g.sequences)].cpu()
            at += len(g.sequences)
            for w, l_ in g.pairs:
                margin = float(r[w] - r[l_])
                margins.append(margin)
                log_losses.append(-float(F.logsigmoid(torch.tensor(margin))))
                by_k[len(g.sequences)].append(margin > 0)
                by_distance[g.ranks[l_] - g.ranks[w]].append(margin > 0)
    model.train()
    margins_arr = np.array(margins)
    probs = 1 / (1 + np.exp(-np.abs(margins_arr)))  # confidence in the predicted order
    right = margins_arr > 0
    bins = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0001]
    calibration = []
    for lo, hi in zip(bins, bins[1:]):
        sel = (probs >= lo) & (probs < hi)
        if sel.any():
            calibration.append({"confidence": f"{lo:.1f}-{min(hi, 1):.1f}", "pairs": int(sel.sum()),
                                "mean_confidence": float(probs[sel].mean()), "accuracy": float(right[sel].mean())})
    return {
        "accuracy": float(right.mean()) if len(right) else float("nan"),
        "log_loss": float(np.mean(log_losses)) if log_losses else float("nan"),
        "pairs": len(margins), "tied_pairs": sum(g.ties for g in groups), "prompts": len(groups),
        "accuracy_by_k": {int(k): float(np.mean(v)) for k, v in sorted(by_k.items())},
        "accuracy_by_rank_distance": {int(d): float(np.mean(v)) for d, v in sorted(by_distance.items())},
        "calibration": calibration,
    }


def print_eval(report: dict) -> None:
    print(f"rm eval: accuracy {report['accuracy']:.3f}, log loss {report['log_loss']:.3f} on {report['pairs']} pairs "
          f"of {report['prompts']} prompts ({report.get('tied_pairs', 0)} tied pairs left out)")
    print("  by K:             " + ", ".join(f"K={k}: {v:.3f}" for k, v in report["accuracy_by_k"].items()))
    print("  by rank distance: " + ", ".join(f"{d}: {v:.3f}" for d, v in report["accuracy_by_rank_distance"].items()))
    print("  calibration (confidence -> accuracy): " + ", ".join(
        f"{c['confidence']}: {c['accuracy']:.2f} (n={c['pairs']})" for c in report["calibration"]))


def split_by_conversation(rankings: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held out): about `fraction` of the conversations held out whole. Rankings that share their first
    user message (the ranked replies of one OpenAssistant tree at every depth, a prompt ranked twice) land on the
    same side, so no held-out pair has a sibling in training."""
    conversations = [next((m["content"] for m in prompt_messages(r["prompt"]) if m["role"] == "user"), "")
                     for r in rankings]
    keys = sorted(set(conversations))
    order = np.random.default_rng(seed).permutation(len(keys))
    held = {keys[i] for i in order[: min(max(1, int(len(keys) * fraction)), len(keys) - 1)]}  # train on >= 1
    return ([r for r, c in zip(rankings, conversations) if c not in held],
            [r for r, c in zip(rankings, conversations) if c in held])


def split_by_labeler(rankings: list[dict], names: list[str]) -> tuple[list[dict], list[dict]]:
    """(the other labelers' rankings, the named labelers' rankings)."""
    held = set(names)
    return ([r for r in rankings if r.get("labeler_id") not in held],
            [r for r in rankings if r.get("labeler_id") in held])


def check_held_out(names: list[str], rankings: list[dict]) -> None:
    """Names without a ranking are named on stdout; if none of them has one, it is an error (a misspelt name
    would hold out nobody)."""
    present = {r.get("labeler_id") for r in rankings}
    missing = set(names) - present
    if missing == set(names):
        raise UserError(f"--val_labelers: no rankings by {', '.join(sorted(missing))} (labelers in the data: "
                        f"{', '.join(sorted(str(x) for x in present)[:20])})")
    if missing:
        print(f"rm: no rankings by held-out labeler(s) {', '.join(sorted(missing))}")


def first_user_message(ranking: dict) -> str:
    return next((m["content"] for m in prompt_messages(ranking["prompt"]) if m["role"] == "user"), "")


def read_splits(cfg: RMConfig) -> tuple[list[dict], list[dict], list[dict]]:
    """Step 2's rankings: training, held-out conversations, and the held-out labelers' (every one of theirs)."""
    skipped: Counter = Counter()
    rankings = [r for p in cfg.data for r in read_rankings(p, cfg.skip_invalid, skipped)]
    val_given = [r for p in cfg.val_data for r in read_rankings(p, cfg.skip_invalid, skipped)]
    held_r: list[dict] = []
    if cfg.val_labelers:  # their rankings never train the RM, whichever file they are in
        check_held_out(cfg.val_labelers, rankings + val_given)
        rankings, held_r = split_by_labeler(rankings, cfg.val_labelers)
        val_given, held_val = split_by_labeler(val_given, cfg.val_labelers)
        held_r += held_val
    if cfg.val_data:
        train_r, val_r = rankings, val_given
    else:
        train_r, val_r = split_by_conversation(rankings, cfg.val_fraction, cfg.seed)
    if skipped:
        print(f"rm: skipped {sum(skipped.values())} invalid record(s): "
              + "; ".join(f"{n} x {why}" for why, n in skipped.most_common()))
    return train_r, val_r, held_r


def train_step(train_model: torch.nn.Module, model: GPT, optimizer: torch.optim.Optimizer, chosen: list[RMGroup],
               pad_id: int, cfg: RMConfig, device, precision: str, guard: StageGuard | None = None
               ) -> tuple[float, int, int, int, int, float]:
    """Step 5's optimizer step on the step's ranked prompts: (loss, pairs ordered right, pairs) of this rank,
    responses and pairs it scored, and the gradient norm. With `guard`, a non-finite loss or gradient norm stops
    the stage or skips the update (StageGuard.finite)."""
    loss_sum, correct, total, responses, pairs = 0.0, 0, 0, 0, 0
    micro_batches = [chosen[i : i + cfg.batch_size] for i in range(0, len(chosen), cfg.batch_size)]
    # Under torchrun: this rank's share of the step's prompts; the ranks' gradients are averaged, so each
    # rank's part of the mean over the step's prompts is scaled by their number (weight 0: an empty share).
    micro_batches, weight = distributed.regroup(micro_batches, cfg.batch_size)
    scale = weight * distributed.world_size()
    for m, groups in enumerate(micro_batches):
        with distributed.no_sync(train_model, enabled=m < len(micro_batches) - 1):
            rewards = reward_scores(train_model, [s for g in groups for s in g.sequences], pad_id, device, precision)
            loss, c, t = grouped_loss(rewards, groups)
            (loss * len(groups) / len(chosen) * scale).backward()
        loss_sum += loss.item() * len(groups) / len(chosen) * weight
        correct, total = correct + int(c * weight), total + int(t * weight)
        responses += sum(len(g.sequences) for g in groups)
        pairs += t
    grad_norm = apply_update(optimizer, model.parameters(), cfg.grad_clip, loss_sum, guard)
    return loss_sum, correct, total, responses, pairs, grad_norm


@torch.no_grad()
def normalise(model: GPT, train: list[RMGroup], tokenizer: Tokenizer, cfg: RMConfig, device) -> float:
    """Step 6 (in fp32, the precision of the checkpoint as saved: a bf16 bias would be off by its noise): the
    reference answers' mean reward becomes 0 (reward_bias) and, with normalize_gain, the training answers' mean
    spread within a prompt 1 (folded into the head); the gain."""
    if cfg.normalize_prompts and cfg.normalize_prompts < len(train):
        order = np.random.default_rng(cfg.seed).permutation(len(train))[: cfg.normalize_prompts]
        train = [train[i] for i in sorted(order)]
    if cfg.reference:
        reference = [c for p in cfg.reference for c in read_demonstrations(p)]
        ref_sequences = [tokenizer.render_chat(c)[0][-cfg.seq_len:] for c in reference]
    else:
        ref_sequences = [g.sequences[g.ranks.index(min(g.ranks))] for g in train]
    model.reward_bias = 0.0  # a reward model continued from another carries that one's bias: measure without it
    ref_scores = _scores_in_chunks(model, ref_sequences, tokenizer.pad_id, device)
    gain = 1.0
    if cfg.normalize_gain:
        answers = _scores_in_chunks(model, [s for g in train for s in g.sequences], tokenizer.pad_id, device)
        spread = torch.stack([k.std() for k in answers.split([len(g.sequences) for g in train])]).mean().item()
        gain = 1.0 / max(spread, 1e-6)
    distributed.reshard(model)
    model.score.weight.mul_(gain)
    model.reward_bias = -ref_scores.mean().item() * gain
    return gain


def _scores_in_chunks(model: GPT, sequences: list[list[int]], pad_id: int, device, chunk: int = 64) -> torch.Tensor:
    return torch.cat([reward_scores(model, sequences[i : i + chunk], pad_id, device, "fp32")
                      for i in range(0, len(sequences), chunk)])


def held_out_labelers_report(model: GPT, held: list[RMGroup], train_r: list[dict], held_r: list[dict], pad_id: int,
                             cfg: RMConfig, device, precision: str) -> dict:
    """Step 7 on the held-out labelers' rankings (InstructGPT's second number), and how many of them share a
    conversation with the training rankings."""
    seen = {first_user_message(r) for r in train_r}
    return {"labelers": sorted(set(cfg.val_labelers)), **evaluate_rm(model, held, pad_id, device, precision,
                                                                     cfg.batch_size),
            "conversations_in_training": sum(first_user_message(r) in seen for r in held_r)}


def steps(cfg: RMConfig, prompts: int) -> tuple[int, int]:
    """(optimizer steps per epoch, in all) of one reward model trained on `prompts` ranked prompts."""
    per_epoch = max(1, math.ceil(prompts / (cfg.batch_size * cfg.grad_accum)))
    return per_epoch, min(cfg.max_steps, per_epoch * cfg.epochs) if cfg.max_steps else per_epoch * cfg.epochs


def train_member(cfg: RMConfig, seed: int, out: Path, name: str, train: list[RMGroup], tokenizer: Tokenizer, device,
                 precision: str) -> GPT:
    """Steps 3-5 for one reward model (its head's initialisation and its data order from `seed`), its train
    states and metrics in `out`; the trained model (sharded under FSDP)."""
    # step 3
    seed_everything(seed)  # the head's initialisation
    model = lora.attach(load_model(cfg.model, device=device, head="scalar", dropout=0.0,
                                   grad_checkpoint=cfg.grad_checkpoint), cfg, cfg.model)
    train_model = distributed.wrap(model, cfg.parallel, device)  # under torchrun: DDP or FSDP2
    optimizer = make_optimizer(model, cfg, device)
    per_epoch, total_steps = steps(cfg, len(train))

    # step 4
    start_step, _, log = resume(out, device, model, optimizer, name, total_steps)

    # step 5
    model.train()
    bar = tqdm(total=total_steps, initial=start_step, disable=not cfg.progress or not distributed.is_main(),
               unit="step", dynamic_ncols=True, desc=None if name == "rm" else name)
    last_time, responses_seen, pairs_seen = time.perf_counter(), 0, 0
    prompts_per_step = cfg.batch_size * cfg.grad_accum
    lengths = [max(len(s) for s in g.sequences) for g in train]
    with StageGuard(name, out, cfg.on_nonfinite) as guard:  # SIGTERM / SIGINT, non-finite numbers
        for step in range(start_step, total_steps):
            epoch, within = divmod(step, per_epoch)
            order = length_grouped_order(lengths, seed, epoch, cfg.batch_size)
            chosen = order[within * prompts_per_step : (within + 1) * prompts_per_step]
            lr = lr_at(step, cfg, total_steps)
            set_lr(optimizer, lr)
            loss_sum, correct, total, responses, pairs, grad_norm = train_step(
                train_model, model, optimizer, [train[i] for i in chosen], tokenizer.pad_id, cfg, device, precision,
                guard.at(step + 1))
            responses_seen, pairs_seen = responses_seen + responses, pairs_seen + pairs
            done = step + 1
            if done % cfg.log_every == 0 or done == total_steps:
                elapsed = time.perf_counter() - last_time
                loss_sum, correct, total, responses_seen, pairs_seen = distributed.all_sum(
                    loss_sum, correct, total, responses_seen, pairs_seen)
                log.log(done, {"train/loss": loss_sum, "train/accuracy": correct / max(1, total), "train/lr": lr,
                               "train/grad_norm": grad_norm, "perf/responses_per_s": responses_seen / elapsed,
                               "perf/comparisons_per_s": pairs_seen / elapsed})
                last_time, responses_seen, pairs_seen = time.perf_counter(), 0, 0
                bar.set_postfix(loss=f"{loss_sum:.3f}", acc=f"{correct / max(1, total):.2f}")
            if guard.end_step(done, total_steps, done % cfg.save_every == 0 or done == total_steps,
                              lambda: {"model": distributed.model_state(model),
                                       "optimizer": distributed.optimizer_state(model, optimizer)},
                              cfg.keep_states, bar, log):
                last_time = time.perf_counter()
    bar.close()
    log.close()
    return model


def reward_model(cfg: RMConfig) -> Path:
    out = Path(cfg.out)
    # step 1
    opened = open_stage("rm", cfg)
    if opened is None:
        return out
    device, precision = opened
    if not cfg.model or not cfg.data:
        raise UserError("--model (an SFT checkpoint) and --data (ranking files) are required")
    if cfg.members < 1:
        raise UserError(f"--members: expected 1 or more reward models to average, got {cfg.members}")

    # step 2
    tokenizer = Tokenizer.load(cfg.model)
    train_r, val_r, held_r = read_splits(cfg)
    train, val = encode_rankings(train_r, tokenizer, cfg.seq_len), encode_rankings(val_r, tokenizer, cfg.seq_len)
    held = encode_rankings(held_r, tokenizer, cfg.seq_len)
    if not train:
        raise UserError("no ranked prompt with at least one untied pair in --data")
    if held_r:
        print(f"rm: {len(held)} ranked prompts of the held-out labelers {', '.join(cfg.val_labelers)}")
    members = f" x {cfg.members} members (averaged)" if cfg.members > 1 else ""
    print(f"rm: {len(train)} train / {len(val)} val ranked prompts "
          f"({sum(len(g.pairs) for g in train)} comparisons, {sum(g.ties for g in train)} tied pairs left out), "
          f"{steps(cfg, len(train))[1]} steps{members}, {device} {precision}")

    # steps 3-5, once per member: with --members N, N reward models whose weights are then averaged into one
    model: GPT | None = None
    for i in range(cfg.members):
        alone = cfg.members == 1
        member = train_member(cfg, cfg.seed + i, out if alone else out / "members" / str(i),
                              "rm" if alone else f"rm member {i}", train, tokenizer, device, precision)
        if model is None:
            model = member
        else:  # the running mean of the members' weights (elementwise, so shard by shard under FSDP)
            distributed.reshard(model)
            distributed.reshard(member)
            with torch.no_grad():
                for mean, weight in zip(model.parameters(), member.parameters()):
                    mean.lerp_(weight, 1 / (i + 1))
            del member

    # step 6
    assert model is not None
    model.eval()
    gain = normalise(model, train, tokenizer, cfg, device)

    # step 7
    report = evaluate_rm(model, val, tokenizer.pad_id, device, precision, cfg.batch_size) if val else {}
    if held:
        report["held_out_labelers"] = held_out_labelers_report(model, held, train_r, held_r, tokenizer.pad_id, cfg,
                                                               device, precision)
    final = distributed.gathered(model)  # the whole model, on rank 0 only
    if final is None:
        return out
    if report:
        if "accuracy" in report:
            print_eval(report)
        if held:
            h = report["held_out_labelers"]
            print(f"rm eval, held-out labelers ({', '.join(h['labelers'])}): accuracy {h['accuracy']:.3f}, log loss "
                  f"{h['log_loss']:.3f} on {h['pairs']} pairs of {h['prompts']} prompts "
                  f"({h['conversations_in_training']} of their rankings share a conversation with training)")
        atomic_write_json(out / "eval.json", report)
    save_model(final, out, tokenizer, lineage={
        "stage": "rm", "parent": cfg.model, "data": data_record(cfg.data + cfg.val_data + cfg.reference),
        "config": config_record(cfg),
        "metrics": {"val/accuracy": report.get("accuracy"), "val/log_loss": report.get("log_loss"),
                    "val/held_out_labelers_accuracy": report.get("held_out_labelers", {}).get("accuracy"),
                    "reward_bias": model.reward_bias, "reward_gain": gain, "train_prompts": len(train),
                    "train_comparisons": sum(len(g.pairs) for g in train)},
    }, extra_config={"reward_bias": model.reward_bias, "reward_gain": gain})
    print(f"rm: done -> {out}")
    return out
