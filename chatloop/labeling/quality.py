"""How good labels are: agreement between labelers (InstructGPT's inter-labeler agreement), an answer's score
against a gold answer, and the scores and pass rule of a screening (qualification) batch."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from chatloop.errors import UserError
from chatloop.labeling.answers import as_ranks

# -- agreement ---------------------------------------------------------------------------------------------------


def pair_agreement(a: list[int], b: list[int] | list[float]) -> tuple[int, int]:
    """(agreeing, comparable) response pairs: pairs both order strictly, agreeing when in the same direction."""
    agree = total = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            if a[i] == a[j] or b[i] == b[j]:
                continue
            total += 1
            agree += (a[i] < a[j]) == (b[i] < b[j])
    return agree, total


def agreement(by_task: dict[str, dict[str, list[int]]]) -> dict[str, Any]:
    """Pairwise agreement of each labeler with the others, and with the consensus of the others.

    by_task: task -> labeler -> ranks (task order). With other labelers: over every task two labelers both
    ranked, the share of response pairs both ordered strictly that they ordered the same way (InstructGPT
    reports 72.6 +- 1.5% between its labelers). With the consensus: against the mean rank the *other*
    labelers of the task gave (leave-one-out, so a labeler does not agree with themselves).
    """
    pair_counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    cons_counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    overall = [0, 0]
    for ranked in by_task.values():
        names = sorted(ranked)
        for x, u in enumerate(names):
            for v in names[x + 1 :]:
                agree, total = pair_agreement(ranked[u], ranked[v])
                for who in (u, v):
                    pair_counts[who][0] += agree
                    pair_counts[who][1] += total
                overall[0] += agree
                overall[1] += total
            others = [ranked[v] for v in names if v != u]
            if others:
                mean = [sum(r[i] for r in others) / len(others) for i in range(len(ranked[u]))]
                agree, total = pair_agreement(ranked[u], mean)
                cons_counts[u][0] += agree
                cons_counts[u][1] += total

    def share(c: list[int]) -> float | None:
        return c[0] / c[1] if c[1] else None

    labelers = sorted(set(pair_counts) | set(cons_counts))
    return {"overall": share(overall), "pairs": overall[1],
            "labelers": {u: {"with_others": share(pair_counts[u]), "with_consensus": share(cons_counts[u]),
                             "pairs": pair_counts[u][1]} for u in labelers}}


def gold_score(kind: str, answer: dict[str, Any], gold: dict[str, Any]) -> float | None:
    """How well one answer matches a gold task's known answer, in [0, 1] (None: nothing to compare)."""
    if kind in ("ranking", "comparison"):
        mine, known = as_ranks(kind, answer), as_ranks(kind, gold)
        if mine is None or known is None:
            return None
        if kind == "comparison":
            return float(mine == known)
        agree, total = pair_agreement(mine, known)
        return agree / total if total else None
    if kind == "rating":
        return float(abs(answer["likert"] - gold["likert"]) <= 1)
    return None


# -- screening ------------------------------------------------------------------------------------------------

# What a screening batch of each job measures (each candidate's scores; a threshold per metric decides):
#   ranking        share of gold's strictly ordered pairs the candidate orders the same way, per task, averaged
#   comparison     share of A/B tasks with gold's winner
#   likert         share of rated tasks with a Likert score within 1 of gold's
#   flags          flag agreement: per rated task, flags both set / flags either set (1 when neither sets any)
#   demonstration  mean 1-7 score an admin gives the candidate's demonstrations (InstructGPT screened on 6/7)
SCREENING_METRICS = {"ranking": ("ranking",), "comparison": ("comparison",), "rating": ("likert", "flags"),
                     "demonstration": ("demonstration",)}


def check_screening(kind: str, thresholds: dict[str, float], golds: list[Any]) -> None:
    """Thresholds that fit the job (shares in [0, 1]; a demonstration score in [1, 7]), and a gold answer on
    every task that needs one (a ranking's with at least one strict pair)."""
    allowed = SCREENING_METRICS[kind]
    if not thresholds:
        raise UserError(f"--screening: expected at least one pass threshold, for {kind}: "
                        + ", ".join(f"{m}=VALUE" for m in allowed))
    for metric, value in thresholds.items():
        if metric not in allowed:
            raise UserError(f"--screening: {metric!r} is not measured by a {kind} batch; expected "
                            + " or ".join(allowed))
        low, high = (1.0, 7.0) if metric == "demonstration" else (0.0, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise UserError(f"--screening: {metric}: expected a threshold from {low:g} to {high:g}, got {value!r}")
    if kind == "demonstration":
        return
    for i, gold in enumerate(golds):
        if gold is None or (kind == "ranking" and not any(a != b for a in gold["ranks"] for b in gold["ranks"])):
            raise UserError(f"--screening: task {i + 1} has no gold answer to score candidates against"
                            + (" (a ranking needs two different gold ranks)" if gold is not None else ""))


def gold_pair_share(mine: list[int], gold: list[int]) -> float:
    """Of the pairs gold orders strictly, the share `mine` orders the same way (a tie of mine counts as wrong,
    so tying everything but the easiest pair does not pass a screening)."""
    right = total = 0
    for i in range(len(gold)):
        for j in range(i + 1, len(gold)):
            if gold[i] != gold[j]:
                total += 1
                right += mine[i] != mine[j] and (mine[i] < mine[j]) == (gold[i] < gold[j])
    return right / total if total else 0.0


def flag_agreement(mine: list[str], gold: list[str]) -> float:
    """Flags both set over flags either set; 1.0 when neither sets any."""
    both, either = set(mine) & set(gold), set(mine) | set(gold)
    return len(both) / len(either) if either else 1.0


def screening_scores(kind: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    """A candidate's progress and scores on a screening batch from its items (LabelStore._screening_items: per task the
    gold, the candidate's assignment status, answer and review). A skipped task scores as wrong (the lowest
    review, 1, for a demonstration); scores are means over the tasks answered or skipped so far."""
    per: dict[str, list[float]] = {m: [] for m in SCREENING_METRICS[kind]}
    done = skipped = pending = 0
    for item in items:
        status, answer, gold = item["status"], item["answer"], item["gold"]
        if status == "done":
            done += 1
        elif status == "skipped":
            skipped += 1
        else:
            continue
        if kind == "demonstration":
            if status == "skipped":
                per["demonstration"].append(1.0)
            elif item["review"] is None:
                pending += 1
            else:
                per["demonstration"].append(float(item["review"]))
        elif kind == "rating":
            per["likert"].append(0.0 if answer is None else float(abs(answer["likert"] - gold["likert"]) <= 1))
            per["flags"].append(0.0 if answer is None else flag_agreement(answer["flags"], gold.get("flags", [])))
        elif kind == "ranking":
            ranks = None if answer is None else answer.get("ranks")  # "none acceptable" without an order: wrong
            per["ranking"].append(0.0 if ranks is None else gold_pair_share(ranks, gold["ranks"]))
        else:
            per[kind].append(0.0 if answer is None else float(answer["winner"] == gold["winner"]))
    scores = {m: (sum(v) / len(v) if v else None) for m, v in per.items()}
    return {"tasks": len(items), "done": done, "skipped": skipped, "pending_reviews": pending,
            "complete": bool(items) and done + skipped == len(items), "scores": scores}


def passes(scores: dict[str, float | None], thresholds: dict[str, float]) -> bool:
    return all(scores.get(m) is not None and scores[m] >= t for m, t in thresholds.items())
