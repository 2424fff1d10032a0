"""What the admins read and what training gets: the progress report (batches, throughput, each labeler's
counts, speed, agreement and gold accuracy), the staffing plan, and the labels exported as chatloop records."""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from chatloop.data.formats import FLAGS
from chatloop.errors import UserError
from chatloop.io import utc_time
from chatloop.labeling.answers import as_ranks, dense
from chatloop.labeling.quality import agreement, gold_score
from chatloop.labeling.store import LabelStore

# -- reports -----------------------------------------------------------------------------------------------------


@dataclass
class Report:
    batches: list[dict[str, Any]]
    labelers: dict[str, dict[str, Any]]
    agreement: dict[str, Any]
    throughput: dict[str, Any]
    screening: list[dict[str, Any]] = field(default_factory=list)
    """Per screening batch: thresholds and each candidate's scores and decision (LabelStore.screening_report)."""

    def as_json(self) -> dict[str, Any]:
        return {"batches": self.batches, "labelers": self.labelers, "agreement": self.agreement,
                "throughput": self.throughput, "screening": self.screening}


def report(store: LabelStore, now: float | None = None) -> Report:
    """Progress per batch, throughput, and per labeler: counts, speed, agreement and gold accuracy."""
    now = time.time() if now is None else now
    rows = store.label_rows()
    by_task: dict[str, dict[str, list[int]]] = defaultdict(dict)
    per: dict[str, dict[str, Any]] = {name: {"labels": 0, "last_hour": 0, "last_day": 0, "seconds": [], "gold": []}
                                      for name in store.labeler_names()}
    for r in rows:
        p = per.setdefault(r["labeler"], {"labels": 0, "last_hour": 0, "last_day": 0, "seconds": [], "gold": []})
        p["labels"] += 1
        p["last_hour"] += r["created_at"] > now - 3600
        p["last_day"] += r["created_at"] > now - 86400
        p["seconds"].append(r["seconds"])
        ranks = as_ranks(r["kind"], r["answer"])
        if ranks is not None and not r["screening"]:  # agreement of production work, not of candidates' tests
            by_task[r["task_id"]][r["labeler"]] = ranks
        if r["gold"] is not None:
            score = gold_score(r["kind"], r["answer"], r["gold"])
            if score is not None:
                p["gold"].append(score)
    agree = agreement(by_task)
    labelers = {}
    for name, p in sorted(per.items()):
        a = agree["labelers"].get(name, {})
        labelers[name] = {"labels": p["labels"], "last_hour": p["last_hour"], "last_day": p["last_day"],
                          "median_seconds": statistics.median(p["seconds"]) if p["seconds"] else None,
                          "agreement_with_others": a.get("with_others"),
                          "agreement_with_consensus": a.get("with_consensus"),
                          "gold_tasks": len(p["gold"]),
                          "gold_accuracy": sum(p["gold"]) / len(p["gold"]) if p["gold"] else None}
    day = [r for r in rows if r["created_at"] > now - 86400]
    throughput = {"labels": len(rows), "last_hour": sum(r["created_at"] > now - 3600 for r in rows),
                  "last_day": len(day), "active_labelers_last_day": len({r["labeler"] for r in day})}
    return Report(store.batch_list(), labelers, agree, throughput, store.screening_report())


def plan(labels_needed: int, per_day: float, labelers: list[int]) -> list[dict[str, Any]]:
    """Days to finish `labels_needed` labels with n labelers each doing `per_day` tasks a day."""
    if per_day <= 0:
        raise UserError(f"--per_day: expected tasks per labeler per day > 0, got {per_day}")
    return [{"labelers": n, "days": labels_needed / (n * per_day) if n > 0 else float("inf")} for n in labelers]


# -- exports ------------------------------------------------------------------------------------------------------


def export_records(store: LabelStore) -> tuple[dict[str, list[dict[str, Any]]], dict[str, int]]:
    """The labels as chatloop records, one per (task, labeler): rankings (raw, each labeler's own), the merged
    rankings (mean rank over labelers), demonstrations, ratings and comparisons; plus counts of what was left
    out (rankings marked "none acceptable" without an order)."""
    out: dict[str, list[dict[str, Any]]] = {"rankings": [], "rankings_merged": [], "demonstrations": [],
                                            "ratings": [], "comparisons": []}
    left_out = {"none_acceptable_unranked": 0, "screening": 0}
    merged: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in store.label_rows():
        if r["screening"]:  # a candidate's test, not training data (a candidate who fails it may be noisy)
            left_out["screening"] += 1
            continue
        meta = {"id": f"{r['task_id']}/{r['id']}", "labeler_id": r["labeler"], "created_at": utc_time(r["created_at"]),
                "batch": r["batch"], "task_id": r["task_id"]}
        model = r["hidden"].get("model")
        if isinstance(model, str) and model:
            meta["model"] = model
        kind, answer, prompt, payload = r["kind"], r["answer"], r["prompt"], r["payload"]
        if kind == "ranking":
            if answer["ranks"] is None:
                left_out["none_acceptable_unranked"] += 1
                continue
            record = {"prompt": prompt, "responses": payload["responses"], "ranks": answer["ranks"], **meta}
            if answer.get("none_acceptable"):
                record["none_acceptable"] = True
            if isinstance(r["hidden"].get("models"), list):  # one answer of each model (label batch --compare)
                record.update({k: r["hidden"][k] for k in ("models", "same_answer", "compare") if r["hidden"].get(k)})
            out["rankings"].append(record)
            merged[r["task_id"]].append(record)
        elif kind == "demonstration":
            out["demonstrations"].append({"messages": answer["messages"], **meta})
        elif kind == "rating":
            flags = {name: name in answer["flags"] for name in FLAGS}
            out["ratings"].append({"prompt": prompt, "response": payload["response"], "likert": answer["likert"],
                                   "flags": flags, "contains_pii": "contains_pii" in answer["flags"], **meta})
        elif kind == "comparison":
            record = {"prompt": prompt, "a": payload["a"], "b": payload["b"], "winner": answer["winner"], **meta}
            if isinstance(r["hidden"].get("models"), list):
                record.update({k: r["hidden"][k] for k in ("models", "compare") if r["hidden"].get(k)})
            out["comparisons"].append(record)
    for task_id, group in merged.items():
        k = len(group[0]["responses"])
        mean = [sum(g["ranks"][i] for g in group) / len(group) for i in range(k)]
        first = group[0]
        out["rankings_merged"].append({
            "id": task_id, "prompt": first["prompt"], "responses": first["responses"], "ranks": dense(mean),
            "labelers": [g["labeler_id"] for g in group], "batch": first["batch"],
            **({"model": first["model"]} if "model" in first else {})})
    return out, left_out
