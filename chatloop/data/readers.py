"""Readers of public data formats into chatloop's records.

- Demonstrations: chat messages (`{"messages": [...]}`: ours, Dolly-style, the world's), prompt/completion
  pairs (`{"prompt", "completion"}`), and OpenAssistant message trees (the best-ranked path).
- Rankings: OpenAssistant trees (every group of ranked sibling replies, at any depth, with its conversation
  context) and Anthropic HH transcripts ("\\n\\nHuman: ...\\n\\nAssistant: ..." chosen/rejected pairs).

Every reader yields (where, record) with `where` = "file:line", so errors and skip reports name the line.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from chatloop.data.formats import validate_demonstration, validate_ranking
from chatloop.errors import UserError
from chatloop.io import read_jsonl

OA_ROLES = {"prompter": "user", "assistant": "assistant"}


def _oa_root(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The root message of an OpenAssistant record: a whole tree (`prompt`) or a bare message."""
    if isinstance(obj.get("prompt"), dict) and "replies" in obj["prompt"]:
        return obj["prompt"]
    if "role" in obj and "text" in obj and "replies" in obj:
        return obj
    return None


def _usable(message: dict[str, Any]) -> bool:
    return not message.get("deleted") and message.get("review_result", True) is not False and bool(
        str(message.get("text", "")).strip())


def oasst_best_path(root: dict[str, Any]) -> list[dict[str, str]]:
    """The conversation that follows the best-ranked reply at every turn (rank 0, else the first usable)."""
    messages = []
    node: dict[str, Any] | None = root
    while node is not None:
        messages.append({"role": OA_ROLES[node["role"]], "content": node["text"]})
        replies = [r for r in node.get("replies", []) if _usable(r)]
        ranked = sorted((r for r in replies if r.get("rank") is not None), key=lambda r: r["rank"])
        node = ranked[0] if ranked else (replies[0] if replies else None)
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()  # a demonstration ends with the assistant's answer
    return messages


def oasst_rankings(root: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every group of >= 2 ranked sibling assistant replies, with the conversation before them as prompt."""

    def walk(node: dict[str, Any], context: list[dict[str, str]]) -> Iterator[dict[str, Any]]:
        context = context + [{"role": OA_ROLES[node["role"]], "content": node["text"]}]
        replies = [r for r in node.get("replies", []) if _usable(r)]
        ranked = [r for r in replies if r.get("rank") is not None and r["role"] == "assistant"]
        if len(ranked) >= 2 and context[-1]["role"] == "user":
            # OpenAssistant ranks are 0-based positions; chatloop's are 1 = best.
            yield {"prompt": context, "responses": [r["text"] for r in ranked],
                   "ranks": [r["rank"] + 1 for r in ranked], "id": node.get("message_id", "")}
        for reply in replies:
            yield from walk(reply, context)

    yield from walk(root, [])


HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def hh_messages(transcript: str, where: str) -> list[dict[str, str]]:
    """'\\n\\nHuman: a\\n\\nAssistant: b ...' as messages."""
    parts = HH_TURN.split(transcript)
    if len(parts) < 3 or parts[0].strip():
        raise UserError(f"{where}: expected a transcript of '\\n\\nHuman: ...\\n\\nAssistant: ...' turns")
    return [{"role": "user" if who == "Human" else "assistant", "content": text.strip()}
            for who, text in zip(parts[1::2], parts[2::2])]


def hh_ranking(obj: dict[str, Any], where: str) -> dict[str, Any]:
    """A chosen/rejected pair of full transcripts as a K = 2 ranking of the final assistant turns."""
    chosen, rejected = hh_messages(obj["chosen"], where), hh_messages(obj["rejected"], where)
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant" or chosen[:-1] != rejected[:-1]:
        raise UserError(f"{where}: chosen and rejected must share the conversation and differ in the last "
                        "assistant turn")
    return {"prompt": chosen[:-1], "responses": [chosen[-1]["content"], rejected[-1]["content"]], "ranks": [1, 2]}


def _count(skipped: Counter | None, error: UserError) -> None:
    """Tally a skipped record by its reason (the message without file, line and offending value)."""
    if skipped is not None:
        reason = str(error).split(": ", 1)[1] if ": " in str(error) else str(error)
        skipped[reason.split(", got")[0]] += 1


def read_demonstrations(path: str | Path, skip_invalid: bool = False,
                        skipped: Counter | None = None) -> list[list[dict[str, str]]]:
    """Conversations of a demonstrations file in any supported format (detected per line).

    An invalid record is an error naming file, line and field; with skip_invalid it is counted in
    `skipped` (by reason) instead.
    """
    conversations = []
    for lineno, obj in read_jsonl(path):
        where = f"{path}:{lineno}"
        try:
            if "messages" in obj:
                messages = obj["messages"]
            elif "completion" in obj and "prompt" in obj:
                prompt = obj["prompt"]
                context = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
                messages = [*context, {"role": "assistant", "content": obj["completion"]}]
            elif (root := _oa_root(obj)) is not None:
                messages = oasst_best_path(root)
            else:
                raise UserError(f"{where}: expected 'messages', 'prompt' + 'completion', or an OpenAssistant tree")
            validate_demonstration({"messages": messages}, where)
        except UserError as e:
            if not skip_invalid:
                raise
            _count(skipped, e)
            continue
        conversations.append([{"role": m["role"], "content": m["content"]} for m in messages])
    if not conversations:
        raise UserError(f"{path}: no usable demonstrations")
    return conversations


def read_rankings(path: str | Path, skip_invalid: bool = False, skipped: Counter | None = None
                  ) -> list[dict[str, Any]]:
    """Rankings of a file: chatloop rankings / pairwise records, OpenAssistant trees or HH transcripts.

    An invalid record is an error naming file, line and field; with skip_invalid it is counted instead.
    """
    rankings = []
    for lineno, obj in read_jsonl(path):
        where = f"{path}:{lineno}"
        try:
            if (root := _oa_root(obj)) is not None:
                found = list(oasst_rankings(root))
            elif "chosen" in obj and isinstance(obj.get("chosen"), str) and "prompt" not in obj:
                found = [hh_ranking(obj, where)]
            elif "chosen" in obj:
                found = [{"prompt": obj["prompt"], "responses": [obj["chosen"], obj.get("rejected")], "ranks": [1, 2]}]
            else:
                found = [obj]
            found = [validate_ranking(ranking, where) for ranking in found]
        except UserError as e:
            if not skip_invalid:
                raise
            _count(skipped, e)
            continue
        rankings.extend(found)
    if not rankings:
        raise UserError(f"{path}: no rankings found")
    return rankings
