"""`chatloop dpo`: Direct Preference Optimization on K-wise rankings (Rafailov et al. 2023), the baseline of PPO
that needs no reward model and no sampling.

DPO's implicit reward of an answer y to a prompt x is r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)), where
log pi(y|x) is the sum of the log-probs of the answer's tokens; its loss is the reward model's Bradley-Terry
loss on those rewards. A ranking of K answers holds C(K,2) pairs, so, as in `chatloop rm`, each answer goes
through the policy once (and the frozen reference once) and all pairs are formed from the K log-probs.

Steps:
  1. Skip if OUT already holds a finished checkpoint.
  2. Read rankings (the readers of `chatloop rm`: chatloop K-wise rankings, pairwise chosen/rejected,
     OpenAssistant trees, Anthropic HH) and hold out a validation split of whole conversations, as the RM
     does. Render each (prompt, answer) with the chat template; the answer's tokens are the last assistant
     turn of the loss mask (tokenizer.render_chat, as SFT learns them). Over-long sequences lose the
     prompt's start first, then the answer's end. Tied pairs give no pair (they are counted and reported);
     a ranking whose answers all tie is dropped.
  3. Load the policy (the SFT checkpoint, dropout off so that the policy equals the reference at step 0)
     and the frozen reference (the same checkpoint unless --reference), and the AdamW optimizer.
  4. Resume from the newest training state, if any.
  5. Train (1 epoch by default, cosine to 10%): a batch is a set of prompts; all K answers of all its
     prompts go through ONE policy forward pass, and, the first time a prompt is seen, one no-grad forward
     pass of the reference (its log-probs are kept for later epochs). Implicit rewards r_i = beta *
     (logp_i - ref_logp_i). Per prompt, loss "pairwise": the mean over its untied pairs (w, l) of
     -log sigmoid(r_w - r_l); loss "plackett_luce": the mean over its answers i that beat at least one other of
     -log(exp(r_i) / sum of exp(r_j) over j = i and every answer ranked strictly below i), the Plackett-Luce
     likelihood of the ranking's order. Ties in Plackett-Luce: an answer competes only against the answers
     ranked strictly below it, never against those tied with it, so no arbitrary tie-break enters the loss
     (without ties this is exactly the Plackett-Luce likelihood; for K = 2 it is the pairwise loss). The
     batch's loss is the mean over its prompts, so every prompt weighs the same whatever its K.
  6. Evaluate on the held-out rankings (eval.json) and save the policy with its lineage.

Logged metrics (docs/METRICS.md): over the step's untied pairs (w beats l) unless noted
  train/loss             the step's DPO loss (nats; log 2 = 0.693 per pair at step 0, where policy = reference)
  train/reward_accuracy  share of pairs with r_w > r_l (0 at step 0: every margin is exactly 0)
  train/reward_margin    mean r_w - r_l
  train/chosen_reward, train/rejected_reward   mean r_w and mean r_l
  train/chosen_logp, train/rejected_logp       mean policy log-prob (summed over the answer's tokens) of w, of l
  train/implicit_kl      mean over the step's answers of logp - ref_logp (= r / beta): the log-ratio to the
                         reference on the ranked answers (the data, not the policy's own samples)
  train/lr, train/grad_norm, perf/pairs_per_s, perf/responses_per_s
  val/loss, val/reward_accuracy, val/reward_margin, val/implicit_kl   on held-out rankings (every eval_every
                         steps if set, and at the end)
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
from chatloop.data.readers import read_rankings
from chatloop.device import autocast
from chatloop.errors import UserError
from chatloop.io import atomic_write_json
from chatloop.lora import LoraFields
from chatloop.model import GPT
from chatloop.tokenizer import Tokenizer
from chatloop.train.reward import split_by_conversation
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
    set_lr,
)


@dataclass
class DPOConfig(StepConfig, LoraFields):
    out: str = "runs/dpo"
    """Output directory: the DPO policy checkpoint, train_state/, metrics.jsonl, eval.json."""
    policy: str = ""
    """The SFT checkpoint to start from."""
    reference: str = ""
    """The frozen reference policy; empty means the SFT checkpoint itself (--policy)."""
    data: list[str] = field(default_factory=list)
    """Ranking files: chatloop rankings or pairwise records, OpenAssistant trees, Anthropic HH transcripts."""
    val_data: list[str] = field(default_factory=list)
    """Held-out rankings; when empty, val_fraction of the conversations of `data`."""
    val_fraction: float = 0.1
    """Share of the conversations (rankings grouped by first user message) held out when val_data is empty."""
    skip_invalid: bool = False
    """Skip invalid records (reporting how many and why) instead of stopping at the first one."""
    beta: float = 0.1
    """DPO's beta: the implicit reward is beta * (log pi - log pi_ref); larger keeps the policy closer to it."""
    loss: Literal["pairwise", "plackett_luce"] = "pairwise"
    """"pairwise": per prompt, the mean over its C(K,2) untied pairs of the DPO loss; "plackett_luce": the
    listwise likelihood of the ranking's order (ties: an answer competes only against those ranked strictly
    below it). The two agree for K = 2."""
    epochs: int = 1
    """Passes over the rankings."""
    max_steps: int = 0
    """Optimizer steps; 0 means epochs x steps per epoch."""
    batch_size: int = 8
    """Prompts per micro-batch (each with all its K answers)."""
    lr: float = 1e-5
    """Peak learning rate (Rafailov et al.: 1e-6 for large models; small models take more)."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    weight_decay: float = 0.0
    """Decoupled weight decay on weight matrices."""
    seq_len: int = 512
    """Longest prompt + answer in tokens; longer ones lose the prompt's start, then the answer's end."""
    save_every: int = 200
    """Save the resumable training state every this many steps."""
    eval_every: int = 0
    """Evaluate on the held-out rankings every this many steps (0: only at the end)."""
    grad_checkpoint: bool = False
    """Recompute the policy's block activations in the backward pass (less memory, ~1/3 more compute)."""


@dataclass
class DPOGroup:
    """One ranked prompt: K tokenized (prompt + answer) sequences, where each answer starts, ranks and pairs."""

    sequences: list[list[int]]
    starts: list[int]
    """Index of each sequence's first answer token (the tokens before it are the prompt)."""
    ranks: list[int]
    pairs: list[tuple[int, int]]
    ref_logps: torch.Tensor | None = None
    """(K,) the reference's log-probs of the answers, once computed (kept on the CPU)."""


def answer_span(mask: list[bool]) -> tuple[int, int]:
    """[start, end) of the last run of True in a loss mask: the final assistant turn of a rendering."""
    end = len(mask)
    while end and not mask[end - 1]:
        end -= 1
    start = end
    while start and mask[start - 1]:
        start -= 1
    return start, end


def encode_rankings(rankings: list[dict], tokenizer: Tokenizer, seq_len: int, report: Counter) -> list[DPOGroup]:
    """Render each (prompt, answer) with the chat template; `report` counts tied pairs, dropped rankings and
    truncations. Rankings whose answers all tie (no pair) are dropped."""
    groups = []
    for r in rankings:
        pairs = ranking_pairs(r["ranks"])
        report["tied pairs"] += math.comb(len(r["ranks"]), 2) - len(pairs)
        if not pairs:
            report["rankings dropped (all answers tie)"] += 1
            continue
        messages = prompt_messages(r["prompt"])
        sequences, starts = [], []
        for response in r["responses"]:
            ids, mask = tokenizer.render_chat([*messages, {"role": "assistant", "content": response}])
            start, end = answer_span(mask)
            if start == 0 or start == end:
                raise UserError(f"the chat template renders no answer tokens for response {response[:40]!r}")
            prompt, answer = ids[:start], ids[start:end]
            if len(answer) > seq_len - 1:
                answer = answer[: seq_len - 1]  # one prompt token must remain: it predicts the answer's first
                report["answer cut"] += 1
            elif len(prompt) + len(answer) > seq_len:
                report["prompt cut"] += 1
            prompt = prompt[-(seq_len - len(answer)):]
            sequences.append(prompt + answer)
            starts.append(len(prompt))
        groups.append(DPOGroup(sequences, starts, r["ranks"], pairs))
    return groups


def collate(groups: list[DPOGroup], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T) right-padded ids of every answer of the groups, and (N, T) labels: at position t the next token
    where it is an answer token, else -100."""
    sequences = [s for g in groups for s in g.sequences]
    starts = [a for g in groups for a in g.starts]
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), -100, dtype=torch.long)
    for i, (s, a) in enumerate(zip(sequences, starts)):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, a - 1 : len(s) - 1] = torch.tensor(s[a:])  # position t predicts token t + 1
    return ids.to(device), labels.to(device)


def answer_logps(model: GPT, ids: torch.Tensor, labels: torch.Tensor, device, precision: str) -> torch.Tensor:
    """(N,) log-prob of each row's answer (summed over its tokens): one forward pass over all rows. Right
    padding under a causal mask leaves real tokens untouched, so no attention mask is needed (fast path)."""
    flat = labels.flatten()
    where = (flat != -100).nonzero().squeeze(1)  # the unembedding and log-softmax run on answer positions only
    with autocast(device, precision):
        logits = model(ids, only_at=where)
    nll = F.cross_entropy(logits.float(), flat[where], reduction="none")
    return torch.zeros(ids.shape[0], device=ids.device).index_add(0, where // ids.shape[1], -nll)


def group_loss(rewards: torch.Tensor, group: DPOGroup, kind: str) -> torch.Tensor:
    """One prompt's DPO loss from its K implicit rewards (see step 5 of the module docstring)."""
    if kind == "pairwise":
        w = torch.tensor([p[0] for p in group.pairs], device=rewards.device)
        l_ = torch.tensor([p[1] for p in group.pairs], device=rewards.device)
        return -F.logsigmoid(rewards[w] - rewards[l_]).mean()
    ranks = torch.tensor(group.ranks, device=rewards.device)
    competes = (ranks[None, :] > ranks[:, None]) | torch.eye(len(ranks), dtype=torch.bool, device=rewards.device)
    lse = torch.logsumexp(torch.where(competes, rewards[None, :], -torch.inf), dim=1)
    beats_some = (ranks[None, :] > ranks[:, None]).any(1)  # the worst (and those tied only with it) add no term
    return -(rewards - lse)[beats_some].mean()


VAL_METRICS = ("loss", "reward_accuracy", "reward_margin", "implicit_kl")
STATS = ("pairs", "correct", "margin", "chosen_reward", "rejected_reward", "chosen_logp", "rejected_logp",
         "responses", "log_ratio")


def dpo_loss(logps: torch.Tensor, ref_logps: torch.Tensor, groups: list[DPOGroup], beta: float, kind: str
             ) -> tuple[torch.Tensor, dict[str, float]]:
    """The mean over the groups of their loss, and sums over their pairs / answers of the logged statistics.
    The pairs of all groups are indexed at once, so the statistics cost one device-to-host copy, not one per group."""
    rewards = beta * (logps - ref_logps)
    offsets = np.cumsum([0] + [len(g.sequences) for g in groups]).tolist()
    w = torch.tensor([at + p[0] for at, g in zip(offsets, groups) for p in g.pairs], device=rewards.device)
    l_ = torch.tensor([at + p[1] for at, g in zip(offsets, groups) for p in g.pairs], device=rewards.device)
    margin = rewards[w] - rewards[l_]
    if kind == "pairwise":
        # The mean over groups of the mean over each group's pairs: each pair weighs 1 / (its group's pairs).
        share = torch.tensor([1 / len(g.pairs) for g in groups for _ in g.pairs], device=rewards.device)
        loss = (-F.logsigmoid(margin) * share).sum() / len(groups)
    else:
        loss = torch.stack([group_loss(rewards[at : at + len(g.sequences)], g, kind)
                            for at, g in zip(offsets, groups)]).mean()
    with torch.no_grad():
        sums = torch.stack([(margin > 0).sum().float(), margin.sum(), rewards[w].sum(), rewards[l_].sum(),
                            logps[w].sum(), logps[l_].sum(), (rewards / beta).sum()]).tolist()
    stats = {"pairs": float(len(w)), "responses": float(offsets[-1]),
             **dict(zip(("correct", "margin", "chosen_reward", "rejected_reward", "chosen_logp", "rejected_logp",
                         "log_ratio"), sums))}
    return loss, {k: stats[k] for k in STATS}


def summarize(stats: dict[str, float], prefix: str) -> dict[str, float]:
    """The logged means of summed statistics."""
    pairs, responses = max(1.0, stats["pairs"]), max(1.0, stats["responses"])
    return {f"{prefix}/reward_accuracy": stats["correct"] / pairs, f"{prefix}/reward_margin": stats["margin"] / pairs,
            f"{prefix}/chosen_reward": stats["chosen_reward"] / pairs,
            f"{prefix}/rejected_reward": stats["rejected_reward"] / pairs,
            f"{prefix}/chosen_logp": stats["chosen_logp"] / pairs,
            f"{prefix}/rejected_logp": stats["rejected_logp"] / pairs,
            f"{prefix}/implicit_kl": stats["log_ratio"] / responses}


def reference_logps(reference: GPT, groups: list[DPOGroup], ids: torch.Tensor, labels: torch.Tensor, device,
                    precision: str) -> torch.Tensor:
    """(N,) the reference's log-probs of the groups' answers: computed in this micro-batch the first time any
    of them is needed (every rank runs the forward then: under FSDP it is a collective), then kept."""
    missing = any(g.ref_logps is None for g in groups)
    if distributed.all_sum(float(missing))[0] > 0:
        with torch.no_grad():
            fresh = answer_logps(reference, ids, labels, device, precision).cpu()
        at = 0
        for g in groups:
            if g.ref_logps is None:
                g.ref_logps = fresh[at : at + len(g.sequences)]
            at += len(g.sequences)
    return torch.cat([g.ref_logps for g in groups]).to(device)  # type: ignore[misc]


@torch.no_grad()
def evaluate_dpo(policy: GPT, reference: GPT, groups: list[DPOGroup], cfg: DPOConfig, pad_id: int, device,
                 precision: str) -> dict:
    """Held-out loss, reward accuracy (overall and by K), margins and implicit KL."""
    policy.eval()
    total = dict.fromkeys(STATS, 0.0)
    loss_sum = 0.0
    by_k: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for b in range(0, len(groups), cfg.batch_size):
        batch = groups[b : b + cfg.batch_size]
        ids, labels = collate(batch, pad_id, device)
        logps = answer_logps(policy, ids, labels, device, precision)
        ref = reference_logps(reference, batch, ids, labels, device, precision)
        loss, stats = dpo_loss(logps, ref, batch, cfg.beta, cfg.loss)
        loss_sum += loss.item() * len(batch)
        for key, value in stats.items():
            total[key] += value
        at = 0
        for g in batch:  # accuracy by K
            k = len(g.sequences)
            _, s = dpo_loss(logps[at : at + k], ref[at : at + k], [g], cfg.beta, cfg.loss)
            by_k[k][0] += s["correct"]
            by_k[k][1] += s["pairs"]
            at += k
    policy.train()
    return {"loss": loss_sum / max(1, len(groups)), **{k.split("/")[1]: v for k, v in summarize(total, "val").items()},
            "pairs": int(total["pairs"]), "prompts": len(groups),
            "reward_accuracy_by_k": {int(k): c / max(1, n) for k, (c, n) in sorted(by_k.items())}}


def read_data(cfg: DPOConfig, tokenizer: Tokenizer) -> tuple[list[DPOGroup], list[DPOGroup], Counter, Counter]:
    """Step 2: the encoded training and held-out rankings, the invalid records skipped, what encoding cut."""
    skipped: Counter = Counter()
    rankings = [r for p in cfg.data for r in read_rankings(p, cfg.skip_invalid, skipped)]
    if cfg.val_data:
        train_r, val_r = rankings, [r for p in cfg.val_data for r in read_rankings(p, cfg.skip_invalid, skipped)]
    else:
        train_r, val_r = split_by_conversation(rankings, cfg.val_fraction, cfg.seed)
    if skipped:
        print(f"dpo: skipped {sum(skipped.values())} invalid record(s): "
              + "; ".join(f"{n} x {why}" for why, n in skipped.most_common()))
    report: Counter = Counter()
    train = encode_rankings(train_r, tokenizer, cfg.seq_len, report)
    val = encode_rankings(val_r, tokenizer, cfg.seq_len, Counter())
    if not train:
        raise UserError("no ranked prompt with at least one untied pair in --data")
    if any(report.values()):
        print("dpo: " + ", ".join(f"{n} {what}" for what, n in report.items() if n))
    return train, val, skipped, report


def train_step(train_policy: torch.nn.Module, policy: GPT, reference: GPT, optimizer: torch.optim.Optimizer,
               chosen: list[DPOGroup], pad_id: int, cfg: DPOConfig, device, precision: str,
               guard: StageGuard | None = None) -> tuple[float, dict[str, float], float]:
    """Step 5's optimizer step on the step's ranked prompts: this rank's loss and sums of STATS, the gradient
    norm. With `guard`, a non-finite loss or gradient norm stops the stage or skips the update (StageGuard.finite)."""
    micro_batches = [chosen[i : i + cfg.batch_size] for i in range(0, len(chosen), cfg.batch_size)]
    # Under torchrun: this rank's share of the step's prompts; the ranks' gradients are averaged, so each
    # rank's part of the mean over the step's prompts is scaled by their number (weight 0: an empty share).
    micro_batches, weight = distributed.regroup(micro_batches, cfg.batch_size)
    scale = weight * distributed.world_size()
    loss_sum, totals = 0.0, dict.fromkeys(STATS, 0.0)
    for m, groups in enumerate(micro_batches):
        ids, labels = collate(groups, pad_id, device)
        ref = reference_logps(reference, groups, ids, labels, device, precision)
        with distributed.no_sync(train_policy, enabled=m < len(micro_batches) - 1):
            logps = answer_logps(train_policy, ids, labels, device, precision)
            loss, stats = dpo_loss(logps, ref, groups, cfg.beta, cfg.loss)
            (loss * len(groups) / len(chosen) * scale).backward()
        loss_sum += loss.item() * len(groups) / len(chosen) * weight
        for key, value in stats.items():
            totals[key] += value * weight
    grad_norm = apply_update(optimizer, policy.parameters(), cfg.grad_clip, loss_sum, guard)
    return loss_sum, totals, grad_norm


def print_eval(evaluation: dict) -> None:
    print(f"dpo eval: loss {evaluation['loss']:.4f}, reward accuracy {evaluation['reward_accuracy']:.3f}, "
          f"margin {evaluation['reward_margin']:.3f}, implicit KL {evaluation['implicit_kl']:.3f} on "
          f"{evaluation['pairs']} pairs of {evaluation['prompts']} prompts")


def require_inputs(cfg: DPOConfig) -> None:
    if not cfg.policy or not cfg.data:
        raise UserError("--policy (an SFT checkpoint) and --data (ranking files) are required")
    if cfg.beta <= 0:
        raise UserError(f"--beta={cfg.beta}: expected a positive number")


def dpo(cfg: DPOConfig) -> Path:
    out = Path(cfg.out)
    # step 1
    opened = open_stage("dpo", cfg)
    if opened is None:
        return out
    device, precision = opened
    require_inputs(cfg)

    # step 2
    tokenizer = Tokenizer.load(cfg.policy)
    train, val, skipped, report = read_data(cfg, tokenizer)

    # step 3
    policy = load_model(cfg.policy, device=device, dropout=0.0, grad_checkpoint=cfg.grad_checkpoint)
    if policy.lm_head is None:
        raise UserError(f"--policy={cfg.policy}: not a language model (it has a scalar head)")
    policy = lora.attach(policy, cfg, cfg.policy)
    reference = (lora.WithoutAdapter(policy)  # the same weights, adapter off: no second copy
                 if cfg.lora_rank and lora.same_checkpoint(cfg.reference or cfg.policy, cfg.policy) else
                 load_model(cfg.reference or cfg.policy, device=device, dropout=0.0).eval().requires_grad_(False))
    if cfg.seq_len > policy.cfg.max_seq_len:
        raise UserError(f"--seq_len={cfg.seq_len} exceeds the policy's max_seq_len {policy.cfg.max_seq_len}")
    train_policy = distributed.wrap(policy, cfg.parallel, device)  # under torchrun: DDP or FSDP2
    distributed.wrap(reference, cfg.parallel, device, frozen=True)  # whole under DDP, sharded under FSDP
    optimizer = make_optimizer(policy, cfg, device)
    per_epoch = max(1, math.ceil(len(train) / (cfg.batch_size * cfg.grad_accum)))
    total_steps = min(cfg.max_steps, per_epoch * cfg.epochs) if cfg.max_steps else per_epoch * cfg.epochs

    # step 4
    start_step, _, log = resume(out, device, policy, optimizer, "dpo", total_steps)
    print(f"dpo: {len(train)} train / {len(val)} val ranked prompts ({sum(len(g.pairs) for g in train)} pairs), "
          f"{cfg.loss} loss, beta {cfg.beta:g}, {total_steps} steps, {device} {precision}")

    # step 5
    policy.train()
    bar = tqdm(total=total_steps, initial=start_step, disable=not cfg.progress or not distributed.is_main(),
               unit="step", dynamic_ncols=True)
    last_time, responses_seen, pairs_seen = time.perf_counter(), 0.0, 0.0
    prompts_per_step = cfg.batch_size * cfg.grad_accum
    lengths = [max(len(s) for s in g.sequences) for g in train]
    evaluation: dict = {}
    with StageGuard("dpo", out, cfg.on_nonfinite) as guard:  # SIGTERM / SIGINT, non-finite numbers
        for step in range(start_step, total_steps):
            epoch, within = divmod(step, per_epoch)
            order = length_grouped_order(lengths, cfg.seed, epoch, cfg.batch_size)
            chosen = order[within * prompts_per_step : (within + 1) * prompts_per_step]
            lr = lr_at(step, cfg, total_steps)
            set_lr(optimizer, lr)
            loss_sum, totals, grad_norm = train_step(train_policy, policy, reference, optimizer,
                                                     [train[i] for i in chosen], tokenizer.pad_id, cfg, device,
                                                     precision, guard.at(step + 1))
            responses_seen, pairs_seen = responses_seen + totals["responses"], pairs_seen + totals["pairs"]
            done = step + 1
            metrics: dict[str, float] = {}
            if done % cfg.log_every == 0 or done == total_steps:
                elapsed = time.perf_counter() - last_time
                summed = distributed.all_sum(loss_sum, responses_seen, pairs_seen, *totals.values())
                totals = dict(zip(STATS, summed[3:]))
                metrics.update({"train/loss": summed[0], **summarize(totals, "train"), "train/lr": lr,
                                "train/grad_norm": grad_norm, "perf/pairs_per_s": summed[2] / elapsed,
                                "perf/responses_per_s": summed[1] / elapsed})
                bar.set_postfix(loss=f"{summed[0]:.3f}", acc=f"{metrics['train/reward_accuracy']:.2f}")
                last_time, responses_seen, pairs_seen = time.perf_counter(), 0.0, 0.0
            if val and (done == total_steps or (cfg.eval_every and done % cfg.eval_every == 0)):
                evaluation = evaluate_dpo(policy, reference, val, cfg, tokenizer.pad_id, device, precision)
                metrics.update({f"val/{k}": evaluation[k] for k in VAL_METRICS})
                last_time = time.perf_counter()
            if metrics:
                log.log(done, metrics)
            if guard.end_step(done, total_steps, done % cfg.save_every == 0 or done == total_steps,
                              lambda: {"model": distributed.model_state(policy),
                                       "optimizer": distributed.optimizer_state(policy, optimizer)},
                              cfg.keep_states, bar, log):
                last_time = time.perf_counter()
    bar.close()
    log.close()

    # step 6
    if val and not evaluation:  # resumed from the last state: the loop had nothing left to do
        evaluation = evaluate_dpo(policy, reference, val, cfg, tokenizer.pad_id, device, precision)
    final = distributed.gathered(policy)  # the whole model, on rank 0 only
    if final is None:
        return out
    if evaluation:
        print_eval(evaluation)
        atomic_write_json(out / "eval.json", evaluation)
    save_model(final, out, tokenizer, lineage={
        "stage": "dpo", "parent": cfg.policy, "reference": cfg.reference or cfg.policy,
        "data": data_record(cfg.data + cfg.val_data), "config": config_record(cfg),
        "metrics": {"val/loss": evaluation.get("loss"), "val/reward_accuracy": evaluation.get("reward_accuracy"),
                    "val/reward_margin": evaluation.get("reward_margin"),
                    "val/implicit_kl": evaluation.get("implicit_kl"), "train_prompts": len(train),
                    "train_pairs": sum(len(g.pairs) for g in train), "tied_pairs_skipped": report["tied pairs"],
                    "rankings_dropped_all_tied": report["rankings dropped (all answers tie)"],
                    "truncation": {k: v for k, v in report.items() if k.endswith("cut")},
                    "skipped_invalid": dict(skipped)},
    })
    print(f"dpo: done -> {out}")
    return out
