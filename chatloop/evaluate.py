"""`chatloop eval`: compare checkpoints on held-out prompts.

For every checkpoint: answers sampled on the held-out prompts, scored by the synthetic world's gold judge
(mean score, Likert, metadata-flag rates, share ending with a stop token), by the reward model if given, the
KL to a reference checkpoint (mean over answers of the summed per-token log-ratio), and the pretraining
validation loss (the alignment tax). Between checkpoints: gold win rates (the better gold score wins a prompt,
a tie counts half) with 95% confidence intervals, and RM win rates. A table of samples side by side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from chatloop.checkpoint import load_model
from chatloop.data.formats import prompt_messages, read_records
from chatloop.data.world import World
from chatloop.engine import generate
from chatloop.errors import UserError
from chatloop.io import atomic_write_json, iter_texts
from chatloop.model import GPT, last_token_values
from chatloop.tokenizer import Tokenizer
from chatloop.train.trainer import resolve_device


@dataclass
class EvalConfig:
    models: list[str] = field(default_factory=list)
    """Checkpoints to compare, oldest first: each one's win rates are against every one before it."""
    names: list[str] = field(default_factory=list)
    """Display names of the checkpoints (default: directory names)."""
    prompts: str = ""
    """Held-out prompt records (JSONL)."""
    world: str = ""
    """The synthetic world directory, for the gold judge (empty: no gold metrics)."""
    reward_model: str = ""
    """A reward model for RM scores and RM win rates (optional)."""
    reference: str = ""
    """Checkpoint the KL is measured against (usually the SFT model; optional)."""
    pretrain_val: str = ""
    """Pretraining validation text for the alignment tax (optional)."""
    limit: int = 200
    """Use the first N prompts."""
    max_new_tokens: int = 48
    """Answer length budget."""
    temperature: float = 1.0
    """Sampling temperature of the answers (1: the policy as trained)."""
    seed: int = 0
    """Sampler seed (the same for every checkpoint)."""
    out: str = ""
    """Write the report as JSON here (optional)."""
    device: str = "auto"
    """"auto", "cpu" or "cuda"."""


@dataclass
class Answers:
    prompts: list
    """The prompts (text or messages), in order."""
    texts: list[str]
    """Decoded answers (special tokens removed)."""
    ended: list[bool]
    """Whether each answer ended with a stop token within the length budget."""
    tokens: list[torch.Tensor] = field(default_factory=list)
    """Per batch: (B, P + N) prompt and answer ids as sampled (for KL and RM scoring)."""
    masks: list[torch.Tensor] = field(default_factory=list)
    """Per batch: the attention masks of `tokens`."""
    prompt_lens: list[int] = field(default_factory=list)
    """Per batch: the padded prompt width."""


@torch.no_grad()
def answer(model: GPT, tokenizer: Tokenizer, prompts: list, max_new_tokens: int = 64, temperature: float = 1.0,
           seed: int = 0, batch_size: int = 64) -> Answers:
    """Sample one answer per prompt, in batches, with a fixed seed."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    result = Answers(prompts, [], [])
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        ids = [tokenizer.render_chat(prompt_messages(p), add_generation_prompt=True)[0] for p in chunk]
        ids = [i[-(model.cfg.max_seq_len - max_new_tokens):] for i in ids]  # keep the end of over-long prompts
        rollout = generate(model, ids, max_new_tokens, tokenizer.pad_id, tokenizer.stop_ids,
                           temperature=temperature, generator=generator)
        result.texts += [tokenizer.decode(r) for r in rollout.response_ids()]
        result.ended += rollout.ended.tolist()
        result.tokens.append(rollout.tokens)
        result.masks.append(rollout.attention_mask)
        result.prompt_lens.append(rollout.prompt_len)
    return result


def gold_report(world: World, answers: Answers) -> tuple[dict[str, float], list[float]]:
    """Mean gold score, Likert, stop rate and each metadata flag's rate; and the per-prompt scores."""
    judgements = [world.judge(p, t, ended=e) for p, t, e in zip(answers.prompts, answers.texts, answers.ended)]
    n = max(1, len(judgements))
    report = {"gold_score": sum(j.score for j in judgements) / n, "likert": sum(j.likert for j in judgements) / n,
              "ended": sum(answers.ended) / n}
    for flag in judgements[0].flags if judgements else []:
        report[f"flag/{flag}"] = sum(bool(j.flags[flag]) for j in judgements) / n
    return report, [j.score for j in judgements]


def win_rate(a: list[float], b: list[float]) -> dict[str, float]:
    """How often a beats b (ties count half), with a 95% normal-approximation interval."""
    wins = np.array([1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)])
    p = float(wins.mean())
    half = 1.96 * float(wins.std(ddof=1)) / math.sqrt(len(wins)) if len(wins) > 1 else float("nan")
    return {"win_rate": p, "ci_low": max(0.0, p - half), "ci_high": min(1.0, p + half), "n": len(wins)}


@torch.no_grad()
def rm_scores(reward_model: GPT, answers: Answers) -> list[float]:
    scores = []
    for tokens, mask in zip(answers.tokens, answers.masks):
        values = reward_model(tokens, attention_mask=mask).float()
        scores += (last_token_values(values, mask) + reward_model.reward_bias).tolist()
    return scores


@torch.no_grad()
def kl_to(policy: GPT, reference: GPT, answers: Answers, temperature: float) -> float:
    """Mean over answers of sum over answer tokens of log pi(y_t) - log pi_ref(y_t)."""
    total, count = 0.0, 0
    for tokens, mask, P in zip(answers.tokens, answers.masks, answers.prompt_lens):
        logps = []
        for model in (policy, reference):
            logits = model(tokens, attention_mask=mask)[:, P - 1 : -1].float() / temperature
            logps.append(F.log_softmax(logits, -1).gather(-1, tokens[:, P:, None]).squeeze(-1))
        answer_mask = mask[:, P:].float()
        total += ((logps[0] - logps[1]) * answer_mask).sum().item()
        count += tokens.shape[0]
    return total / max(1, count)


@torch.no_grad()
def text_loss(model: GPT, tokenizer: Tokenizer, path: str, seq_len: int = 128, max_windows: int = 64) -> float:
    """Mean next-token loss on a text file (the pretraining validation loss: the alignment tax)."""
    ids = [i for text in iter_texts(path) for i in tokenizer.encode(text) + [tokenizer.eos_id]]
    seq_len = min(seq_len, model.cfg.max_seq_len - 1)
    n = min(max_windows, (len(ids) - 1) // seq_len)
    if n < 1:
        raise UserError(f"{path}: too short for one window of {seq_len + 1} tokens")
    device = next(model.parameters()).device
    data = torch.tensor(ids[: n * seq_len + 1], device=device)
    x = torch.stack([data[i * seq_len : (i + 1) * seq_len] for i in range(n)])
    y = torch.stack([data[i * seq_len + 1 : (i + 1) * seq_len + 1] for i in range(n)])
    total = 0.0
    for b in range(0, n, 16):
        logits = model(x[b : b + 16]).float()
        total += F.cross_entropy(logits.flatten(0, 1), y[b : b + 16].flatten(), reduction="sum").item()
    return total / (n * seq_len)


def rm_accuracy_vs_gold(per_prompt: dict[str, dict[str, list[float]]]) -> dict:
    """How often the RM orders two checkpoints' answers to the same held-out prompt as the gold judge does,
    over all pairs of checkpoints and for each pair ("b vs a"); pairs the gold judge ties are left out.

    This is the reward model's accuracy against the truth, away from the labelers' noise. Pairs with a model
    whose answers the RM never saw in training (a base model's free text) test it off its distribution.
    """
    names = list(per_prompt)
    by_pair, agree_all, pairs_all = {}, 0, 0
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            agree, pairs = 0, 0
            for ga, gb, ra, rb in zip(per_prompt[a]["gold"], per_prompt[b]["gold"], per_prompt[a]["rm"],
                                      per_prompt[b]["rm"]):
                if ga != gb:
                    pairs += 1
                    agree += (ga > gb) == (ra > rb)
            by_pair[f"{b} vs {a}"] = {"accuracy": agree / pairs if pairs else float("nan"), "pairs": pairs}
            agree_all, pairs_all = agree_all + agree, pairs_all + pairs
    return {"accuracy": agree_all / pairs_all if pairs_all else float("nan"), "pairs": pairs_all, "by_pair": by_pair}


def evaluate(cfg: EvalConfig) -> dict:
    if not cfg.models or not cfg.prompts:
        raise UserError("--models (one or more checkpoints) and --prompts are required")
    device = resolve_device(cfg.device)
    names = cfg.names or [Path(m).name for m in cfg.models]
    if len(names) != len(cfg.models):
        raise UserError("--names: expected one name per model")
    prompts = [r["prompt"] for r in read_records(cfg.prompts, "prompt")][: cfg.limit]
    world = World.load(cfg.world) if cfg.world else None
    reward_model = load_model(cfg.reward_model, device=device).eval() if cfg.reward_model else None
    reference = load_model(cfg.reference, device=device).eval() if cfg.reference else None
    report: dict = {"prompts": len(prompts), "models": {}, "win_rates": {}, "samples": []}
    per_prompt: dict[str, dict[str, list[float]]] = {}
    texts: dict[str, list[str]] = {}
    for name, path in zip(names, cfg.models):
        model = load_model(path, device=device).eval()
        tokenizer = Tokenizer.load(path)
        answers = answer(model, tokenizer, prompts, cfg.max_new_tokens, cfg.temperature, cfg.seed)
        row: dict[str, float] = {}
        per_prompt[name] = {}
        if world is not None:
            gold, per_prompt[name]["gold"] = gold_report(world, answers)
            row.update(gold)
        if reward_model is not None:
            per_prompt[name]["rm"] = rm_scores(reward_model, answers)
            row["rm_score"] = float(np.mean(per_prompt[name]["rm"]))
        if reference is not None:
            row["kl"] = kl_to(model, reference, answers, cfg.temperature)
        if cfg.pretrain_val:
            row["pretrain_val_loss"] = text_loss(model, tokenizer, cfg.pretrain_val)
        row["length"] = float(np.mean([len(t) for t in answers.texts]))
        report["models"][name] = row
        texts[name] = answers.texts
    for i, name in enumerate(names):
        for baseline in names[:i]:  # every later checkpoint against every earlier one
            for kind in ("gold", "rm"):
                if kind in per_prompt[name]:
                    report["win_rates"][f"{name} vs {baseline} ({kind})"] = win_rate(per_prompt[name][kind],
                                                                                     per_prompt[baseline][kind])
    if world is not None and reward_model is not None:
        report["rm_accuracy_vs_gold"] = rm_accuracy_vs_gold(per_prompt)
    for i in range(min(8, len(prompts))):
        report["samples"].append({"prompt": prompts[i], **{n: texts[n][i] for n in names}})
    print_report(report)
    if cfg.out:
        atomic_write_json(cfg.out, report)
    return report


def print_report(report: dict) -> None:
    names = list(report["models"])
    keys = [k for k in ("gold_score", "likert", "ended", "rm_score", "kl", "pretrain_val_loss", "length")
            if any(k in report["models"][n] for n in names)]
    print(f"\n{'model':<14}" + "".join(f"{k:>18}" for k in keys))
    for n in names:
        print(f"{n:<14}" + "".join(f"{report['models'][n].get(k, float('nan')):>18.3f}" for k in keys))
    for pair, w in report["win_rates"].items():
        print(f"win rate {pair}: {w['win_rate']:.3f} (95% CI {w['ci_low']:.3f}-{w['ci_high']:.3f}, n={w['n']})")
    if "rm_accuracy_vs_gold" in report:
        acc = report["rm_accuracy_vs_gold"]
        print(f"RM accuracy against the gold judge: {acc['accuracy']:.3f} on {acc['pairs']} pairs of answers; "
              + ", ".join(f"{pair} {row['accuracy']:.3f}" for pair, row in acc["by_pair"].items()))
