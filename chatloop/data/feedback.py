"""Feedback from deployment: the chat page's thumbs and regenerations as comparison data for the reward model.

`chatloop serve` stores what a user's page reports (POST /v1/feedback, with the user's API key) in the prompt
store's `feedback` table: a thumb up or down on an answer, or after a "regenerate" the two answers to one
prompt and which one the user kept. A key marked `nolog` stores nothing. `chatloop prompts feedback` turns
them into K = 2 ranking records, the format `chatloop rm --data` reads:

- a regeneration: the kept answer ranked above the other (`source: "regenerate"`);
- thumbs: for one user and one prompt, every answer with a thumb up above every answer with a thumb down
  (`source: "thumbs"`).

Identical answers carry no preference and are left out (counted). Each record has `labeler_id` (the user),
`model` (the served model's name) and `created_at`, so `chatloop rm --val_labelers` can hold users out.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from chatloop.data.formats import write_records
from chatloop.data.prompts import DEFAULT_DB, PromptStore, display_time
from chatloop.errors import UserError

CLIENT_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")
MAX_ANSWER_CHARS = 100_000


def check_body(body: dict[str, Any]) -> tuple[str, str, list[str], str]:
    """A feedback request's (client id, kind, answers, verdict), or UserError naming the field. The prompt
    (`messages`) is checked by the caller, as for a chat request.

        {"id", "kind": "thumb", "messages", "answer", "value": "up" | "down" | "none"}
        {"id", "kind": "regenerate", "messages", "answers": [first, regenerated], "kept": 0 | 1}
    """
    client_id = body.get("id")
    if not isinstance(client_id, str) or not CLIENT_ID.fullmatch(client_id):
        raise UserError("id: expected 8-64 letters, digits, '-' or '_' naming this judgement")
    kind = body.get("kind")
    if kind == "thumb":
        answers, verdict = [body.get("answer")], body.get("value")
        if verdict not in ("up", "down", "none"):
            raise UserError("value: expected 'up', 'down' or 'none'")
    elif kind == "regenerate":
        answers, kept = body.get("answers"), body.get("kept")
        if not isinstance(answers, list) or len(answers) != 2:
            raise UserError("answers: expected the first answer and the regenerated one")
        if kept not in (0, 1) or isinstance(kept, bool):
            raise UserError("kept: expected 0 (the first answer) or 1 (the regenerated one)")
        verdict = str(kept)
    else:
        raise UserError("kind: expected 'thumb' or 'regenerate'")
    if not all(isinstance(a, str) and a.strip() and len(a) <= MAX_ANSWER_CHARS for a in answers):
        raise UserError(f"{'answer' if kind == 'thumb' else 'answers'}: expected non-empty text of at most "
                        f"{MAX_ANSWER_CHARS} characters")
    return client_id, kind, answers, verdict


def feedback_rankings(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """K = 2 ranking records (best first) from stored feedback rows, and counts of what was left out."""
    records: list[dict[str, Any]] = []
    left_out = {"identical_answers": 0, "thumbs_without_a_pair": 0}

    def add(row: dict[str, Any], chosen: str, rejected: str, source: str, rid: str) -> None:
        if chosen == rejected:
            left_out["identical_answers"] += 1
            return
        records.append({"id": rid, "prompt": row["prompt"], "responses": [chosen, rejected], "ranks": [1, 2],
                        "labeler_id": row["user_id"], "model": row["model"], "source": source,
                        "created_at": display_time(row["updated_at"])})

    thumbs: dict[tuple[str, str], dict[str, dict[str, dict[str, Any]]]] = defaultdict(
        lambda: {"up": {}, "down": {}})
    for row in rows:
        if row["kind"] == "regenerate":
            kept = int(row["verdict"])
            add(row, row["answers"][kept], row["answers"][1 - kept], "regenerate", f"feedback-{row['id']}")
        elif row["verdict"] in ("up", "down"):
            group = thumbs[row["user_id"], json.dumps(row["prompt"], sort_keys=True)]
            group[row["verdict"]][row["answers"][0]] = row
    for group in thumbs.values():
        if not group["up"] or not group["down"]:
            left_out["thumbs_without_a_pair"] += len(group["up"]) + len(group["down"])
        for good, up in group["up"].items():
            for bad, down in group["down"].items():
                add(up, good, bad, "thumbs", f"feedback-{up['id']}-{down['id']}")
    return records, left_out


@dataclass
class FeedbackConfig:
    db: str = DEFAULT_DB
    """The prompt store `chatloop serve` logged to (an SQLAlchemy URL or an SQLite file path)."""
    out: str = "runs/feedback.jsonl"
    """Ranking records to write (atomically): `chatloop rm --data` reads them."""


def export_feedback(cfg: FeedbackConfig) -> dict[str, int]:
    """The chat page's thumbs and regenerations as K = 2 rankings (module docstring)."""
    rows = PromptStore(cfg.db, create=False).feedback_rows()
    records, left_out = feedback_rankings(rows)
    if not records:
        raise UserError(f"{cfg.db}: no comparison in the chat page's feedback yet ({len(rows)} judgements; a "
                        "regenerate, or a thumb up and a thumb down on answers to one prompt, makes one)")
    write_records(cfg.out, "ranking", records)
    counts = {"judgements": len(rows), "rankings": len(records), **left_out}
    print(f"prompts feedback -> {cfg.out}: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items()))
    return counts
