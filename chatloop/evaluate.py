"""`chatloop eval`: compare checkpoints on held-out prompts.

For every checkpoint: answers sampled on the held-out prompts, scored by a gold judge if given (a `Judge`: the
synthetic world's, chatloop.world.gold; mean score, Likert, metadata-flag rates, what it marked answers down for,
share ending with a stop token; and the greedy answers' gold score),
by the reward model if given, the KL to a reference checkpoint (mean over answers of the summed per-token
log-ratio), and the pretraining validation loss (the alignment tax). Between checkpoints: gold win rates (the
better gold score wins a prompt, a tie counts half; also without the ties, and how many there were) with 95%
confidence intervals, and RM win rates. Gold scores per task kind. A table of samples side by side. With
--human, people's A/B verdicts and rankings (label exports) give human win rates, per labeler and overall,
beside the gold judge's and the RM's rows (rows "PAIR (human)" and "PAIR (human, rankings)").

The RM's score of an answer is the reward PPO optimizes: the reward model's, or --no_eos_score for an answer without
a stop token. With a reward model, the best-of-n policy is a row too: n answers of the reference checkpoint (the SFT
model) per prompt, the one the RM scores highest kept (no training; its KL to the reference is the analytic
log n - (n - 1)/n). Its n samples are also where the diagnostics of the loop come from (`diagnostics`):
  imitation_ceiling     mean gold score of the demonstrations (what perfect imitation of them would score)
  own_samples           the RM against the judge on pairs of the reference's own samples to one prompt (the
                        pairs PPO exploits): accuracy on the pairs the judge does not tie, the share of gold
                        ties and of identical texts among them
  oracle_best_of_n      the judge's own pick of the n samples against the reference's answer (gold win rate):
                        what a perfect RM's best-of-n reaches
  rm_probes             with --rm_probes, the RM's accuracy on pairs whose better answer is known, per group (the
                        world's: the refusal over compliance on harmful prompts, the answer over the refusal on
                        harmless ones): whether the RM pays for harm
With a judge, InstructGPT's three axes per model (`hhh`, each with a 95% interval; helpful, harmless, honest):
  helpful       gold win rate against the reference on the held-out prompts that do not ask for harm
  harmless      share of the harmful prompts (the held-out users' and the --redteam set) refused
  over_refusal  share of the harmless held-out prompts refused
  false_claims  share of the held-out answers that state something false (the honest model's is low)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from chatloop.checkpoint import load_model
from chatloop.config import resolve_function
from chatloop.data.formats import Prompt, read_records, validate
from chatloop.data.readers import read_demonstrations, read_rankings
from chatloop.device import resolve_device
from chatloop.errors import UserError
from chatloop.generate import Answers, answer
from chatloop.io import atomic_write_json, iter_texts, read_jsonl
from chatloop.model import GPT, lm_loss, response_logprobs
from chatloop.tokenizer import Tokenizer
from chatloop.train.reward import encode_rankings, evaluate_rm


@dataclass
class EvalConfig:
    models: list[str] = field(default_factory=list)
    """Checkpoints to compare, oldest first: each one's win rates are against every one before it."""
    names: list[str] = field(default_factory=list)
    """Display names of the checkpoints (default: directory names)."""
    prompts: str = ""
    """Held-out prompt records (JSONL)."""
    redteam: str = ""
    """Harmful prompts kept apart from the held-out users' (a red-team set: the synthetic world's
    redteam_prompts.jsonl): every model answers them too, for the harmless share (needs a judge)."""
    rm_probes: str = ""
    """Rankings whose better answer is known, each with a "group" (the world's rm_probes.jsonl): the RM's accuracy
    per group, a diagnostic (needs a reward model)."""
    judge: str = ""
    """A gold judge for the gold metrics, as `module:function`: function(judge_arg) returns a `Judge` (e.g.
    chatloop.world.gold:gold_judge with --judge_arg=runs/NAME/world, the synthetic world's judge). Empty: no gold
    metrics."""
    judge_arg: str = ""
    """What `judge`'s function is given (the synthetic world's: its directory)."""
    reward_model: str = ""
    """A reward model for RM scores and RM win rates (optional)."""
    no_eos_score: float = -1.0
    """The RM score of an answer without a stop token within the length budget: PPO's reward (ppo.no_eos_score),
    so the RM rows, best-of-n and the diagnostics judge answers by what PPO optimizes."""
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
    greedy: bool = True
    """Also score every checkpoint's greedy answers by the gold judge (gold_score_greedy)."""
    best_of: int = 4
    """n of the best-of-n row (the RM picks one of n answers of the reference checkpoint); 0 or no reward model:
    no such row."""
    sample_batch: int = 64
    """Answers sampled at once: the KV cache holds this many rows (a real model's 64 rows of 500 positions in fp32
    are 1.5 GB), and the same seed with another batch gives other samples."""
    demonstrations: str = ""
    """Demonstrations whose gold score is the imitation ceiling (a diagnostic; empty: none)."""
    seed: int = 0
    """Sampler seed (the same for every checkpoint)."""
    out: str = ""
    """Write the report as JSON here (optional)."""
    device: str = "auto"
    """"auto", "cpu" or "cuda"."""
    human: list[str] = field(default_factory=list)
    """Labels of people (`chatloop label export` directories, or comparison / ranking JSONL files) whose A/B
    verdicts and rankings of answers of several models become human win rates with 95% CIs, per model pair,
    overall and per labeler, beside the gold judge's and the RM's rows (`--models` optional then). Models are
    matched to --models by path or directory name; a pair reads "later vs earlier" (--models order, else the
    order of `label batch --compare`)."""


@dataclass
class Verdict:
    """A gold judge's verdict on one answer."""

    score: float
    """In [0, 1]: what gold win rates compare."""
    likert: int
    """A 1-7 rating."""
    flags: dict[str, bool]
    """Metadata flags (InstructGPT's: fails to follow, harmful, ...): the report has each one's rate."""
    marks: dict[str, bool]
    """What the judge marked the answer down for ("ideal" where nothing): the report card's "why" table."""
    refused: bool
    """The answer declines the request: right on a harmful prompt, an over-refusal on a harmless one."""
    false_claim: bool
    """The answer states something false (the honesty column)."""


class Judge(Protocol):
    """What the gold metrics score answers with: the synthetic world's judge (chatloop.world.gold.GoldJudge), or
    any other that knows the right answers."""

    def verdict(self, prompt: Prompt, answer: str, ended: bool = True) -> Verdict:
        """The verdict on `answer` to `prompt` (text or messages); `ended`: it ended with a stop token."""
        ...

    def kind(self, prompt: Prompt) -> str:
        """The prompt's kind, for the gold score per kind."""
        ...

    def harmful(self, prompt: Prompt) -> bool:
        """Whether the prompt asks for harm (the answer people want is a refusal)."""
        ...


def verdicts(judge: Judge, answers: Answers) -> list[Verdict]:
    return [judge.verdict(p, t, ended=e) for p, t, e in zip(answers.prompts, answers.texts, answers.ended)]


def gold_report(judge: Judge, answers: Answers) -> tuple[dict[str, float], list[Verdict]]:
    """Mean gold score, Likert, stop rate, each metadata flag's rate and each mark's share; and the verdicts."""
    judgements = verdicts(judge, answers)
    n = max(1, len(judgements))
    report = {"gold_score": sum(j.score for j in judgements) / n, "likert": sum(j.likert for j in judgements) / n,
              "ended": sum(answers.ended) / n}
    for flag in judgements[0].flags if judgements else []:
        report[f"flag/{flag}"] = sum(bool(j.flags[flag]) for j in judgements) / n
    for mark in judgements[0].marks if judgements else []:
        report[f"marked/{mark}"] = sum(j.marks[mark] for j in judgements) / n
    return report, judgements


def win_rate(a: list[float], b: list[float]) -> dict[str, float]:
    """How often a beats b (ties count half), with a 95% normal-approximation interval; and among the prompts
    that are not ties (win_rate_no_ties, with the number of ties)."""
    wins = np.array([1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)])
    p = float(wins.mean())
    half = 1.96 * float(wins.std(ddof=1)) / math.sqrt(len(wins)) if len(wins) > 1 else float("nan")
    decided = wins[wins != 0.5]
    return {"win_rate": p, "ci_low": max(0.0, p - half), "ci_high": min(1.0, p + half), "n": len(wins),
            "ties": int(len(wins) - len(decided)),
            "win_rate_no_ties": float(decided.mean()) if len(decided) else float("nan")}


def share(hits: list[bool]) -> dict[str, float]:
    """The share of hits with its 95% Wilson interval (which stays inside [0, 1] and is not empty at 0% or 100%)."""
    return wilson(sum(hits) / len(hits) if hits else float("nan"), len(hits))


def wilson(p: float, n: int) -> dict[str, float]:
    """A share p of n trials with its 95% Wilson interval."""
    if not n:
        return {"share": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0}
    z = 1.96
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (
        1 + z * z / n)
    return {"share": p, "ci_low": max(0.0, centre - half), "ci_high": min(1.0, centre + half), "n": n}


def helpful_harmless_honest(judge: Judge, prompts: list, held_out: dict[str, list[Verdict]],
                            redteam: dict[str, list[Verdict]], reference: str | None) -> dict[str, dict]:
    """The `hhh` table (module docstring) of every model with verdicts; helpful only against a reference."""
    harmful = [judge.harmful(p) for p in prompts]
    table = {}
    for name, answers in held_out.items():
        harmless_answers = [v for v, h in zip(answers, harmful) if not h]
        row = {"harmless": share([v.refused for v, h in zip(answers, harmful) if h]
                                 + [v.refused for v in redteam.get(name, [])]),
               "over_refusal": share([v.refused for v in harmless_answers]),
               "false_claims": share([v.false_claim for v in answers])}
        if reference in held_out and name != reference:
            baseline = [v.score for v, h in zip(held_out[reference], harmful) if not h]
            row["helpful"] = win_rate([v.score for v in harmless_answers], baseline)
        table[name] = row
    return table


def rm_probe_accuracy(reward_model: GPT, tokenizer: Tokenizer, path: str, device) -> dict[str, dict]:
    """The RM's accuracy and log loss on each group of known-better pairs (EvalConfig.rm_probes)."""
    by_group: dict[str, list[dict]] = {}
    for record in read_rankings(path):
        by_group.setdefault(str(record.get("group", "all")), []).append(record)
    table = {}
    for group, records in by_group.items():
        groups = encode_rankings(records, tokenizer, reward_model.cfg.max_seq_len)
        result = evaluate_rm(reward_model, groups, tokenizer.pad_id, device, "fp32", 16)
        interval = wilson(result["accuracy"], result["pairs"])
        table[group] = {"accuracy": result["accuracy"], "ci_low": interval["ci_low"], "ci_high": interval["ci_high"],
                        "log_loss": result["log_loss"], "pairs": result["pairs"]}
    reward_model.eval()
    return table


@torch.no_grad()
def rm_scores(reward_model: GPT, answers: Answers, no_eos_score: float | None = None) -> list[float]:
    """The RM's score of each answer; with no_eos_score, that score for an answer without a stop token instead
    (the reward PPO optimizes)."""
    scores = []
    for tokens, mask in zip(answers.tokens, answers.masks):
        scores += reward_model.reward(tokens, mask).tolist()
    if no_eos_score is None:
        return scores
    return [s if ended else no_eos_score for s, ended in zip(scores, answers.ended)]


@torch.no_grad()
def kl_to(policy: GPT, reference: GPT, answers: Answers, temperature: float) -> float:
    """Mean over answers of sum over answer tokens of log pi(y_t) - log pi_ref(y_t)."""
    total, count = 0.0, 0
    for batch, masks, P in zip(answers.tokens, answers.masks, answers.prompt_lens):
        # 4 rows at a time: a batch's (B, N, V) response logits are still large at a 49k vocabulary.
        for tokens, mask in zip(batch.split(4), masks.split(4)):
            logps = [response_logprobs(model, tokens, mask, P, temperature)[0] for model in (policy, reference)]
            total += ((logps[0] - logps[1]) * mask[:, P:].float()).sum().item()
        count += batch.shape[0]
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
    for b in range(0, n, 4):  # 4 windows at a time: a 49k-token vocabulary's logits of 16 were 0.4 GB, twice
        total += lm_loss(model(x[b : b + 4]), y[b : b + 4], reduction="sum").item()
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


def evaluate(cfg: EvalConfig, judge: Judge | None = None) -> dict:
    """The report (also written to cfg.out); gold metrics from `judge`, else from cfg.judge's if set."""
    if cfg.human and not cfg.models:  # people's verdicts only: no checkpoint to run
        report = {"models": {}, "win_rates": {}, "samples": []}
        add_human(report, human_win_rates(cfg.human, cfg.names, cfg.models))
        print_report(report)
        if cfg.out:
            atomic_write_json(cfg.out, report)
        return report
    if not cfg.models or not cfg.prompts:
        raise UserError("--models (one or more checkpoints) and --prompts are required (or --human alone)")
    device = resolve_device(cfg.device)
    names = cfg.names or [Path(m).name for m in cfg.models]
    if len(names) != len(cfg.models):
        raise UserError("--names: expected one name per model")
    prompts = [r["prompt"] for r in read_records(cfg.prompts, "prompt")][: cfg.limit]
    if judge is None and cfg.judge:
        judge = resolve_function(cfg.judge, "--judge")(cfg.judge_arg)
    reward_model = load_model(cfg.reward_model, device=device).eval() if cfg.reward_model else None
    reference = load_model(cfg.reference, device=device).eval() if cfg.reference else None
    redteam = [r["prompt"] for r in read_records(cfg.redteam, "prompt")] if cfg.redteam and judge else []
    report: dict = {"prompts": len(prompts), "models": {}, "win_rates": {}, "samples": []}
    per_prompt: dict[str, dict[str, list[float]]] = {}
    texts: dict[str, list[str]] = {}
    held_out_verdicts: dict[str, list[Verdict]] = {}
    redteam_verdicts: dict[str, list[Verdict]] = {}

    def load(path: str) -> GPT:
        """A model to evaluate: the reference itself when it is one of them (one copy of a real model, not two)."""
        if reference is not None and Path(path).resolve() == Path(cfg.reference).resolve():
            return reference
        return load_model(path, device=device).eval()

    for name, path in zip(names, cfg.models):
        model = load(path)
        tokenizer = Tokenizer.load(path)
        answers = answer(model, tokenizer, prompts, cfg.max_new_tokens, cfg.temperature, cfg.seed, cfg.sample_batch)
        row: dict[str, float] = {}
        per_prompt[name] = {}
        if judge is not None:
            gold, held_out_verdicts[name] = gold_report(judge, answers)
            per_prompt[name]["gold"] = [v.score for v in held_out_verdicts[name]]
            row.update(gold)
            if redteam:
                redteam_verdicts[name] = verdicts(judge, answer(model, tokenizer, redteam, cfg.max_new_tokens,
                                                                cfg.temperature, cfg.seed, cfg.sample_batch))
            if cfg.greedy:
                greedy = answer(model, tokenizer, prompts, cfg.max_new_tokens, 0.0, cfg.seed, cfg.sample_batch)
                row["gold_score_greedy"] = gold_report(judge, greedy)[0]["gold_score"]
        if reward_model is not None:
            per_prompt[name]["rm"] = rm_scores(reward_model, answers, cfg.no_eos_score)
            row["rm_score"] = float(np.mean(per_prompt[name]["rm"]))
        if reference is not None:
            row["kl"] = kl_to(model, reference, answers, cfg.temperature)
        if cfg.pretrain_val:
            row["pretrain_val_loss"] = text_loss(model, tokenizer, cfg.pretrain_val)
        row["length"] = float(np.mean([len(t) for t in answers.texts]))
        report["models"][name] = row
        texts[name] = answers.texts
        del model  # before the next one loads: two real models at once were a GB more at the peak
    if reward_model is not None and cfg.best_of > 0:
        base = cfg.reference or cfg.models[0]
        base_name = names[cfg.models.index(base)] if base in cfg.models else Path(base).name
        row_name, row, scores, diagnostics, picked = best_of_n(cfg, base_name, base, prompts, redteam, judge,
                                                               reward_model, load(base),
                                                               per_prompt.get(base_name, {}).get("gold"))
        report["models"][row_name], per_prompt[row_name], report["diagnostics"] = row, scores, diagnostics
        if picked:
            held_out_verdicts[row_name], redteam_verdicts[row_name] = picked
        names = [*names, row_name]
    if reward_model is not None and cfg.rm_probes:
        report.setdefault("diagnostics", {})["rm_probes"] = rm_probe_accuracy(
            reward_model, Tokenizer.load(cfg.reward_model), cfg.rm_probes, device)
    for i, name in enumerate(names):
        for baseline in names[:i]:  # every later checkpoint against every earlier one
            for kind in ("gold", "rm"):
                if kind in per_prompt[name] and kind in per_prompt[baseline]:
                    report["win_rates"][f"{name} vs {baseline} ({kind})"] = win_rate(per_prompt[name][kind],
                                                                                     per_prompt[baseline][kind])
    if judge is not None:
        report["gold_by_kind"] = gold_by_kind(judge, prompts, {n: per_prompt[n]["gold"] for n in names})
        if cfg.demonstrations:
            report.setdefault("diagnostics", {})["imitation_ceiling"] = imitation_ceiling(judge, cfg.demonstrations)
        reference = names[cfg.models.index(cfg.reference)] if cfg.reference in cfg.models else None
        report["hhh"] = helpful_harmless_honest(judge, prompts, held_out_verdicts, redteam_verdicts, reference)
        report["hhh_reference"], report["redteam_prompts"] = reference, len(redteam)
    if judge is not None and reward_model is not None:
        report["rm_accuracy_vs_gold"] = rm_accuracy_vs_gold({n: per_prompt[n] for n in names if n in texts})
    for i in range(min(8, len(prompts))):
        report["samples"].append({"prompt": prompts[i], **{n: texts[n][i] for n in texts}})
    if cfg.human:
        add_human(report, human_win_rates(cfg.human, names, cfg.models))
    print_report(report)
    if cfg.out:
        atomic_write_json(cfg.out, report)
    return report


def best_of_n(cfg: EvalConfig, base_name: str, base: str, prompts: list, redteam: list, judge: Judge | None,
              reward_model: GPT, model: GPT, base_gold: list[float] | None
              ) -> tuple[str, dict, dict[str, list[float]], dict, tuple[list[Verdict], list[Verdict]] | None]:
    """The best-of-n row: n answers of `base` (loaded as `model`) per prompt (a seed of their own), the RM's pick of
    each prompt's; the diagnostics its samples give (the RM on pairs of the base's own samples, the judge's own
    best-of-n); and, with a judge, the verdicts on its picks for the held-out and the red-team prompts."""
    n = cfg.best_of
    tokenizer = Tokenizer.load(base)

    def sample(of: list) -> tuple[Answers, np.ndarray]:
        answers = answer(model, tokenizer, [p for p in of for _ in range(n)], cfg.max_new_tokens, cfg.temperature,
                         cfg.seed + 1, cfg.sample_batch)
        return answers, np.array(rm_scores(reward_model, answers, cfg.no_eos_score)).reshape(len(of), n)

    answers, rm = sample(prompts)
    picks = rm.argmax(1)
    name = f"best-of-{n}"
    row: dict[str, float] = {"rm_score": float(rm.max(1).mean()), "kl": math.log(n) - (n - 1) / n,
                             "length": float(np.mean([len(answers.texts[i * n + j]) for i, j in enumerate(picks)]))}
    scores: dict[str, list[float]] = {"rm": rm.max(1).tolist()}
    diagnostics: dict = {"best_of_n": {"n": n, "base": base_name}}
    picked = None
    if judge is not None:
        every = verdicts(judge, answers)
        gold = np.array([v.score for v in every]).reshape(len(prompts), n)
        picked_redteam = []
        if redteam:
            redteam_answers, redteam_rm = sample(redteam)
            every_redteam = verdicts(judge, redteam_answers)
            picked_redteam = [every_redteam[i * n + j] for i, j in enumerate(redteam_rm.argmax(1))]
        picked = ([every[i * n + j] for i, j in enumerate(picks)], picked_redteam)
        scores["gold"] = gold[np.arange(len(prompts)), picks].tolist()
        row["gold_score"] = float(np.mean(scores["gold"]))
        agree = ties = identical = pairs = 0
        for i in range(len(prompts)):
            for a in range(n):
                for b in range(a + 1, n):
                    pairs += 1
                    identical += answers.texts[i * n + a] == answers.texts[i * n + b]
                    if gold[i, a] == gold[i, b]:
                        ties += 1
                    else:
                        agree += (gold[i, a] > gold[i, b]) == (rm[i, a] > rm[i, b])
        diagnostics["own_samples"] = {"pairs": pairs, "gold_tie_share": ties / max(1, pairs),
                                      "identical_share": identical / max(1, pairs),
                                      "rm_accuracy": agree / (pairs - ties) if pairs > ties else float("nan")}
        if base_gold is not None:
            diagnostics["oracle_best_of_n"] = win_rate(gold.max(1).tolist(), base_gold)
    return name, row, scores, diagnostics, picked


def gold_by_kind(judge: Judge, prompts: list, gold: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Mean gold score per prompt kind (and the number of prompts of the kind) for every model."""
    kinds = [judge.kind(p) for p in prompts]
    table: dict[str, dict[str, float]] = {}
    for kind in sorted(set(kinds)):
        rows = [i for i, k in enumerate(kinds) if k == kind]
        table[kind] = {"prompts": len(rows), **{n: float(np.mean([g[i] for i in rows])) for n, g in gold.items()}}
    return table


def imitation_ceiling(judge: Judge, path: str) -> float:
    """Mean gold score of the demonstrations' answers: what a model that imitates them perfectly scores."""
    scores = []
    for messages in read_demonstrations(path):
        *context, last = messages
        scores.append(judge.verdict(context, last["content"]).score)
    return float(np.mean(scores)) if scores else float("nan")


# -- people's verdicts ----------------------------------------------------------------------------------------


def human_records(paths: list[str]) -> tuple[list[dict], list[dict]]:
    """(A/B comparison records, ranking records) of label exports: a directory's comparisons.jsonl and
    rankings.jsonl, or JSONL files (a record with "a" and "b" is a comparison, one with "responses" a ranking)."""
    comparisons, rankings = [], []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            files = [path / name for name in ("comparisons.jsonl", "rankings.jsonl") if (path / name).is_file()]
            if not files:
                raise UserError(f"--human: {path} has neither comparisons.jsonl nor rankings.jsonl "
                                "(expected a `chatloop label export` directory)")
        elif path.is_file():
            files = [path]
        else:
            raise UserError(f"--human: no such file or directory: {path}")
        for file in files:
            for lineno, obj in read_jsonl(file):
                kind = "comparison" if "a" in obj and "b" in obj else "ranking"
                record = validate(kind, obj, f"{file}:{lineno}")
                (comparisons if kind == "comparison" else rankings).append(record)
    return comparisons, rankings


def _model_names(models: set[str], names: list[str], paths: list[str]) -> dict[str, str]:
    """Each model string of the labels -> its display name: the --names/--models name of the same checkpoint
    (same resolved path, or the name itself, or its directory name), else its directory name when unique."""
    by_path = {str(Path(p).resolve()): n for n, p in zip(names, paths)}
    short = {m: Path(m).name or m for m in models}
    out = {}
    for m in models:
        resolved = str(Path(m).resolve())
        if resolved in by_path:
            out[m] = by_path[resolved]
        elif m in names or short[m] in names:
            out[m] = m if m in names else short[m]
        else:
            out[m] = short[m] if list(short.values()).count(short[m]) == 1 else m
    return out


def _outcomes(comparisons: list[dict], rankings: list[dict]) -> list[tuple[str, str, str, float, str]]:
    """(source, model x, model y, x's outcome 1 / 0.5 / 0, labeler) for every pair of models people judged: an
    A/B verdict, or two answers of different models in one ranking (a copy of another model's answer ties)."""
    out = []
    for r in comparisons:
        models = r.get("models")
        if isinstance(models, list) and len(models) == 2 and models[0] != models[1]:
            out.append(("ab", models[0], models[1], {"a": 1.0, "b": 0.0, "tie": 0.5}[r["winner"]],
                        r.get("labeler_id", "?")))
    for r in rankings:
        models = r.get("models")
        if not isinstance(models, list) or len(models) != len(r["responses"]):
            continue  # the answers of one model (a sampled ranking batch): no pair of models
        rank = {m: r["ranks"][i] for i, m in enumerate(models)}
        rank.update({m: rank[twin] for m, twin in (r.get("same_answer") or {}).items() if twin in rank})
        names = list(rank)
        for i, x in enumerate(names):
            for y in names[i + 1 :]:
                if x != y:
                    outcome = 1.0 if rank[x] < rank[y] else 0.5 if rank[x] == rank[y] else 0.0
                    out.append(("rankings", x, y, outcome, r.get("labeler_id", "?")))
    return out


def human_win_rates(paths: list[str], names: list[str] | None = None, models: list[str] | None = None) -> dict:
    """Win rates by people per model pair, from A/B verdicts and from rankings, overall and per labeler.

    A pair reads "later vs earlier": the order of `names`/`models` when both are there (chatloop eval's), else
    the order in which the records first compare them (their `compare`: `label batch --compare A B` gives
    "B vs A"; else their `models`). Ties count half. Returns {"ab" | "rankings": {pair: {"overall", "labelers"}}}.
    """
    names, models = names or [Path(m).name for m in models or []], models or []
    comparisons, rankings = human_records(paths)
    outcomes = _outcomes(comparisons, rankings)
    if not outcomes:
        raise UserError(f"--human: no verdict between two models in {', '.join(paths)} (A/B records need "
                        "'models'; rankings need one model per answer: `chatloop label batch --compare`)")
    display = _model_names({m for o in outcomes for m in o[1:3]}, names, models)
    order: dict[str, int] = {}
    for r in [*comparisons, *rankings]:
        for m in r.get("compare") or r.get("models") or []:
            if isinstance(m, str):
                order.setdefault(display.get(m, m), len(order))

    def position(name: str) -> tuple[int, int]:
        return (0, names.index(name)) if name in names else (1, order.get(name, 0))

    grouped: dict[str, dict[str, dict[str, list[float]]]] = {"ab": {}, "rankings": {}}
    for source, x, y, outcome, labeler in outcomes:
        x, y = display[x], display[y]
        if position(x) < position(y):  # the later model first: its win rate
            x, y, outcome = y, x, 1.0 - outcome
        pair = grouped[source].setdefault(f"{x} vs {y}", {})
        pair.setdefault("*", []).append(outcome)
        pair.setdefault(labeler, []).append(outcome)
    result: dict = {}
    for source, pairs in grouped.items():
        for pair, by in pairs.items():
            result.setdefault(source, {})[pair] = {
                "overall": _verdict_rate(by.pop("*")), "labelers": {n: _verdict_rate(v) for n, v in sorted(by.items())}}
    return result


def _verdict_rate(outcomes: list[float]) -> dict[str, float]:
    """win_rate of outcomes (1 win, 0.5 tie, 0 loss) with its interval, plus the count of wins."""
    return {**win_rate(outcomes, [0.5] * len(outcomes)), "wins": sum(o == 1.0 for o in outcomes)}


HUMAN_ROWS = {"ab": "human", "rankings": "human, rankings"}


def add_human(report: dict, human: dict) -> None:
    """Put the human win rates into the report: report["human"], and rows "PAIR (human)" (A/B verdicts) and
    "PAIR (human, rankings)" in report["win_rates"], each right after the gold judge's and the RM's rows of
    its pair."""
    report["human"] = human
    rows = {f"{pair} ({HUMAN_ROWS[source]})": (pair, w["overall"]) for source, pairs in human.items()
            for pair, w in pairs.items()}
    merged: dict = {}
    keys = list(report["win_rates"])
    for i, key in enumerate(keys):
        merged[key] = report["win_rates"][key]
        pair = key.rsplit(" (", 1)[0]
        if i + 1 == len(keys) or keys[i + 1].rsplit(" (", 1)[0] != pair:
            merged.update({k: w for k, (p, w) in rows.items() if p == pair})
    merged.update({k: w for k, (_, w) in rows.items() if k not in merged})
    report["win_rates"] = merged


def human_lines(human: dict) -> list[str]:
    """Each human win rate per labeler, as sentences (the eval's printout)."""
    lines = []
    for source, pairs in human.items():
        for pair, w in pairs.items():
            per = ", ".join(f"{n} {100 * v['win_rate']:.0f}% (n={v['n']})" for n, v in w["labelers"].items())
            lines.append(f"human win rate {pair} ({'A/B verdicts' if source == 'ab' else 'rankings'}) by labeler: "
                         f"{per}")
    return lines


MODEL_KEYS = ("gold_score", "gold_score_greedy", "likert", "ended", "rm_score", "kl", "pretrain_val_loss", "length")


def print_report(report: dict) -> None:
    names = list(report["models"])
    keys = [k for k in MODEL_KEYS if any(k in report["models"][n] for n in names)]
    if names:
        print(f"\n{'model':<14}" + "".join(f"{k:>18}" for k in keys))
    for n in names:
        print(f"{n:<14}" + "".join(f"{report['models'][n].get(k, float('nan')):>18.3f}" for k in keys))
    for pair, w in report["win_rates"].items():
        print(f"win rate {pair}: {w['win_rate']:.3f} (95% CI {w['ci_low']:.3f}-{w['ci_high']:.3f}, n={w['n']}; "
              f"{w['win_rate_no_ties']:.3f} without its {w['ties']} ties)")
    if "rm_accuracy_vs_gold" in report:
        acc = report["rm_accuracy_vs_gold"]
        print(f"RM accuracy against the gold judge: {acc['accuracy']:.3f} on {acc['pairs']} pairs of answers; "
              + ", ".join(f"{pair} {row['accuracy']:.3f}" for pair, row in acc["by_pair"].items()))
    for line in hhh_lines(report):
        print(line)
    for line in diagnostic_lines(report.get("diagnostics", {})):
        print(line)
    for line in human_lines(report.get("human", {})):
        print(line)


def diagnostic_lines(diagnostics: dict) -> list[str]:
    """The diagnostics as sentences (the eval's printout, `chatloop run`'s summary and the report card)."""
    lines = []
    if "imitation_ceiling" in diagnostics:
        lines.append(f"imitation ceiling (the demonstrations' mean gold score): {diagnostics['imitation_ceiling']:.3f}")
    own, bon = diagnostics.get("own_samples"), diagnostics.get("best_of_n", {})
    if own:
        lines.append(f"RM accuracy against the gold judge on pairs of {bon.get('base')}'s own samples "
                     f"({bon.get('n')} per prompt): {own['rm_accuracy']:.3f} on the "
                     f"{round(own['pairs'] * (1 - own['gold_tie_share']))} untied of {own['pairs']} pairs "
                     f"({100 * own['gold_tie_share']:.0f}% gold ties, {100 * own['identical_share']:.0f}% identical)")
    if "oracle_best_of_n" in diagnostics:
        w = diagnostics["oracle_best_of_n"]
        lines.append(f"the gold judge's own best-of-{bon.get('n')} vs {bon.get('base')}: {100 * w['win_rate']:.1f}% "
                     f"[{100 * w['ci_low']:.0f}-{100 * w['ci_high']:.0f}] (what a perfect RM's pick reaches)")
    for group, row in diagnostics.get("rm_probes", {}).items():
        interval = f" [{row['ci_low']:.2f}-{row['ci_high']:.2f}]" if "ci_low" in row else ""
        lines.append(f"RM on known-better pairs, {group}: accuracy {row['accuracy']:.3f}{interval} on {row['pairs']} "
                     f"pairs (log loss {row['log_loss']:.3f})")
    return lines


def hhh_lines(report: dict) -> list[str]:
    """The `hhh` table as one line per model (the eval's printout and `chatloop run`'s summary)."""
    def pct(x: dict, key: str = "share") -> str:
        return f"{100 * x[key]:.1f}% [{100 * x['ci_low']:.0f}-{100 * x['ci_high']:.0f}]"

    lines = []
    for name, row in report.get("hhh", {}).items():
        helpful = (f"helpful {pct(row['helpful'], 'win_rate')} vs {report['hhh_reference']}, " if "helpful" in row
                   else "")
        lines.append(f"{name:<11} {helpful}harmless {pct(row['harmless'])} of {row['harmless']['n']}, over-refusal "
                     f"{pct(row['over_refusal'])}, false claims {pct(row['false_claims'])}")
    return lines
