"""The record types of chatloop's datasets, their validation, and readers whose errors name the place.

Every dataset is JSONL, one object per line. A record is checked when it is read (and before it is
written), and a bad one stops the run with a `UserError` naming the file, the line and the field:

    data/rm.jsonl:7: field 'ranks': expected a list of K integers >= 1, one per response (K = 4), got [1, 2]

Record kinds (every record may also carry `id`, `labeler_id`, `model` and `created_at`; other extra fields
are kept as they are, so tools can add metadata such as `category`):

- demonstration: `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`, ending with
  the assistant's answer.
- ranking: `{"prompt": PROMPT, "responses": ["...", ...], "ranks": [1, 2, 2, 3]}`, 1 = best; equal ranks are
  ties and yield no training pair.
- pairwise: `{"prompt": PROMPT, "chosen": "...", "rejected": "..."}`, a ranking with K = 2.
- prompt: `{"prompt": PROMPT, "user_id": "...", "category": "...", "source": "..."}`.
- rating: `{"prompt": PROMPT, "response": "...", "likert": 1..7, "flags": {"hallucination": true, ...}}`.
- comparison (an A/B judgement, for win rates):
  `{"prompt": PROMPT, "a": "...", "b": "...", "winner": "a"|"b"|"tie"}`.

PROMPT is either text or a list of messages that ends with a user message.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypedDict

from chatloop.errors import UserError
from chatloop.io import atomic_write_jsonl, read_jsonl

ROLES = ("system", "user", "assistant")

# InstructGPT's metadata questions (Ouyang et al. 2022, Table 3), asked of every rated response.
FLAGS = (
    "fails_to_follow",
    "inappropriate_for_customer_assistant",
    "hallucination",
    "satisfies_constraint",
    "sexual_content",
    "violent_content",
    "encourages_violence",
    "denigrates_protected_class",
    "harmful_advice",
    "expresses_opinion",
    "expresses_moral_judgment",
)

WINNERS = ("a", "b", "tie")

# Use-case mix of InstructGPT's RM prompts, percent (Ouyang et al. 2022, Table 1).
INSTRUCTGPT_MIX = {"generation": 45.6, "open_qa": 12.4, "brainstorming": 11.2, "chat": 8.4, "rewrite": 6.6,
                   "summarization": 4.2, "classification": 3.5, "other": 3.5, "closed_qa": 2.6,
                   "extract": 1.9}


class Message(TypedDict):
    role: str
    content: str


Prompt = str | list[Message]


class RecordMeta(TypedDict, total=False):
    """Optional provenance fields that any record may carry."""

    id: str | int
    labeler_id: str
    model: str
    created_at: str


class Demonstration(RecordMeta):
    messages: list[Message]


class Ranking(RecordMeta):
    prompt: Prompt
    responses: list[str]
    ranks: list[int]


class Pairwise(RecordMeta):
    prompt: Prompt
    chosen: str
    rejected: str


class PromptRecord(RecordMeta, total=False):
    prompt: Prompt  # required: checked by validate_prompt_record
    user_id: str  # required
    category: str
    source: str


class Rating(RecordMeta, total=False):
    prompt: Prompt  # required
    response: str  # required
    likert: int  # required
    flags: dict[str, bool]


class Comparison(RecordMeta):
    prompt: Prompt
    a: str
    b: str
    winner: str


def _error(where: str, field: str, expected: str, value: Any = ...) -> UserError:
    got = "" if value is ... else f", got {_short(value)}"
    return UserError(f"{where}: field {field!r}: {expected}{got}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _missing(where: str, field: str, expected: str) -> UserError:
    return UserError(f"{where}: field {field!r}: missing ({expected})")


def _require(obj: dict[str, Any], field: str, where: str, expected: str) -> Any:
    if field not in obj:
        raise _missing(where, field, expected)
    return obj[field]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_string(obj: dict[str, Any], field: str, where: str, *, required: bool, nonempty: bool) -> None:
    expected = "expected a non-empty string" if nonempty else "expected a string"
    if field not in obj:
        if required:
            raise _missing(where, field, expected)
        return
    value = obj[field]
    if not isinstance(value, str) or (nonempty and not value.strip()):
        raise _error(where, field, expected, value)


def _check_meta(obj: dict[str, Any], where: str) -> None:
    if "id" in obj and not (isinstance(obj["id"], str) or _is_int(obj["id"])):
        raise _error(where, "id", "expected a string or an integer", obj["id"])
    for field in ("labeler_id", "model", "created_at"):
        _check_string(obj, field, where, required=False, nonempty=True)


def validate_messages(value: Any, where: str, field: str = "messages", *,
                      last_role: str | None = None) -> None:
    """A non-empty list of {role, content} objects with a known role and non-empty content."""
    if not isinstance(value, list) or not value:
        raise _error(where, field, "expected a non-empty list of messages", value)
    for i, message in enumerate(value):
        name = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise _error(where, name, "expected an object with 'role' and 'content'", message)
        if "role" not in message:
            raise _missing(where, f"{name}.role", f"expected one of {', '.join(ROLES)}")
        if message["role"] not in ROLES:
            raise _error(where, f"{name}.role", f"expected one of {', '.join(ROLES)}", message["role"])
        if "content" not in message:
            raise _missing(where, f"{name}.content", "expected a non-empty string")
        content = message["content"]
        if not isinstance(content, str) or not content.strip():
            raise _error(where, f"{name}.content", "expected a non-empty string", content)
    if last_role is not None and value[-1]["role"] != last_role:
        raise _error(where, f"{field}[{len(value) - 1}].role",
                     f"expected the last message to be from the {last_role}", value[-1]["role"])


def check_turn_order(messages: list[Message], where: str, field: str = "messages") -> None:
    """An optional system message first, then user and assistant turns alternating, starting with the user."""
    expected = "user"
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "system":
            if i != 0:
                raise _error(where, f"{field}[{i}].role", "expected a system message only as the first message", role)
            continue
        if role != expected:
            raise _error(where, f"{field}[{i}].role",
                         f"expected {expected!r} (turns alternate user, assistant, starting with the user)", role)
        expected = "assistant" if role == "user" else "user"


def validate_prompt_value(value: Any, where: str, field: str = "prompt") -> None:
    """Text, or messages ending with the user's turn (the model answers next)."""
    if isinstance(value, str):
        if not value.strip():
            raise _error(where, field, "expected non-empty text or a list of messages", value)
        return
    if isinstance(value, list):
        validate_messages(value, where, field, last_role="user")
        return
    raise _error(where, field, "expected text or a list of messages ending with a user message", value)


def validate_demonstration(obj: dict[str, Any], where: str) -> Demonstration:
    messages = _require(obj, "messages", where, "expected a list of messages ending with the assistant's")
    validate_messages(messages, where, "messages", last_role="assistant")
    if not any(m["role"] == "user" for m in messages):
        raise _error(where, "messages", "expected at least one user message before the assistant's answer")
    check_turn_order(messages, where)
    _check_meta(obj, where)
    return obj  # type: ignore[return-value]


def validate_ranking(obj: dict[str, Any], where: str) -> Ranking:
    validate_prompt_value(_require(obj, "prompt", where, "expected text or messages"), where)
    responses = _require(obj, "responses", where, "expected a list of at least 2 strings")
    if not isinstance(responses, list) or len(responses) < 2:
        raise _error(where, "responses", "expected a list of at least 2 strings", responses)
    for i, response in enumerate(responses):
        if not isinstance(response, str):
            raise _error(where, f"responses[{i}]", "expected a string", response)
    problem = ranks_problem(obj.get("ranks"), len(responses))
    if problem is not None:
        raise _missing(where, "ranks", problem) if "ranks" not in obj else _error(where, "ranks", problem, obj["ranks"])
    _check_meta(obj, where)
    return obj  # type: ignore[return-value]


def ranks_problem(ranks: Any, k: int, *, at_most_k: bool = False) -> str | None:
    """None when `ranks` rank k responses, else what was expected: k integers >= 1, 1 = best, equal ranks a tie.

    With `at_most_k` each is also at most k (what a labeler gives in the labeling app). A dataset's ranks may
    have gaps: OpenAssistant ranks each reply among all its ranked siblings, so a sibling the reader drops
    (deleted, rejected in review, empty) leaves one, e.g. [1, 3] for K = 2.
    """
    fits = isinstance(ranks, list) and len(ranks) == k and all(
        _is_int(r) and r >= 1 and (not at_most_k or r <= k) for r in ranks)
    if fits:
        return None
    if at_most_k:
        return f"expected {k} integers from 1 (best) to {k}, one per response; equal = tie"
    return f"expected a list of K integers >= 1, one per response (K = {k})"


def validate_pairwise(obj: dict[str, Any], where: str) -> Pairwise:
    validate_prompt_value(_require(obj, "prompt", where, "expected text or messages"), where)
    _check_string(obj, "chosen", where, required=True, nonempty=False)
    _check_string(obj, "rejected", where, required=True, nonempty=False)
    _check_meta(obj, where)
    return obj  # type: ignore[return-value]


def validate_prompt_record(obj: dict[str, Any], where: str) -> PromptRecord:
    validate_prompt_value(_require(obj, "prompt", where, "expected text or messages"), where)
    _check_string(obj, "user_id", where, required=True, nonempty=True)
    _check_string(obj, "category", where, required=False, nonempty=True)
    _check_string(obj, "source", where, required=False, nonempty=True)
    _check_meta(obj, where)
    return obj  # type: ignore[return-value]


def validate_rating(obj: dict[str, Any], where: str) -> Rating:
    validate_prompt_value(_require(obj, "prompt", where, "expected text or messages"), where)
    _check_string(obj, "response", where, required=True, nonempty=False)
    likert = _require(obj, "likert", where, "expected an integer from 1 to 7")
    if not _is_int(likert) or not 1 <= likert <= 7:
        raise _error(where, "likert", "expected an integer from 1 to 7", likert)
    flags = obj.get("flags", {})
    if not isinstance(flags, dict):
        raise _error(where, "flags", "expected an object of flag name to true/false", flags)
    for name, value in flags.items():
        if name not in FLAGS:
            raise _error(where, f"flags.{name}", f"unknown flag; expected one of {', '.join(FLAGS)}")
        if not isinstance(value, bool):
            raise _error(where, f"flags.{name}", "expected true or false", value)
    _check_meta(obj, where)
    return obj  # type: ignore[return-value]


def validate_comparison(obj: dict[str, Any], where: str) -> Comparison:
    validate_prompt_value(_require(obj, "prompt", where, "expected text or messages"), where)
    _check_string(obj, "a", where, required=True, nonempty=False)
    _check_string(obj, "b", where, required=True, nonempty=False)
    winner = _require(obj, "winner", where, "expected 'a', 'b' or 'tie'")
    if winner not in WINNERS:
        raise _error(where, "winner", "expected 'a', 'b' or 'tie'", winner)
    _check_meta(obj, where)
    return obj  # type: ignore[return-value]


VALIDATORS: dict[str, Callable[[dict[str, Any], str], Any]] = {
    "demonstration": validate_demonstration,
    "ranking": validate_ranking,
    "pairwise": validate_pairwise,
    "prompt": validate_prompt_record,
    "rating": validate_rating,
    "comparison": validate_comparison,
}


def validate(kind: str, obj: Any, where: str) -> dict[str, Any]:
    """Check one record of `kind`; `where` prefixes the error (e.g. "data.jsonl:3")."""
    if kind not in VALIDATORS:
        raise UserError(f"unknown record kind {kind!r}; expected one of {', '.join(VALIDATORS)}")
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return VALIDATORS[kind](obj, where)


def iter_records(path: str | Path, kind: str) -> Iterator[dict[str, Any]]:
    """Validated records of `kind`, in file order. Reading rankings also accepts pairwise lines (K = 2)."""
    if kind not in VALIDATORS:
        raise UserError(f"unknown record kind {kind!r}; expected one of {', '.join(VALIDATORS)}")
    for lineno, obj in read_jsonl(path):
        where = f"{path}:{lineno}"
        if kind == "ranking" and "chosen" in obj and "responses" not in obj:
            yield pairwise_to_ranking(validate_pairwise(obj, where))
        else:
            yield validate(kind, obj, where)


def read_records(path: str | Path, kind: str) -> list[dict[str, Any]]:
    """All records of a JSONL file, validated; a file with no record at all is an error too."""
    records = list(iter_records(path, kind))
    if not records:
        raise UserError(f"{path}: no records (expected JSONL {kind} records, one per line)")
    return records


def write_records(path: str | Path, kind: str, records: list[dict[str, Any]]) -> None:
    """Validate, then write atomically: a bad record leaves the old file in place."""
    for i, record in enumerate(records):
        validate(kind, record, f"{path}: record {i}")
    atomic_write_jsonl(path, records)


def ranking_pairs(ranks: list[int]) -> list[tuple[int, int]]:
    """(winner index, loser index) for every pair of responses with different ranks; ties give no pair."""
    pairs = []
    for i in range(len(ranks)):
        for j in range(i + 1, len(ranks)):
            if ranks[i] < ranks[j]:
                pairs.append((i, j))
            elif ranks[j] < ranks[i]:
                pairs.append((j, i))
    return pairs


_META_FIELDS = ("id", "labeler_id", "model", "created_at")


def pairwise_to_ranking(record: dict[str, Any]) -> Ranking:
    """A pairwise record as the K = 2 ranking it is (chosen first, ranked 1)."""
    ranking: dict[str, Any] = {
        "prompt": record["prompt"],
        "responses": [record["chosen"], record["rejected"]],
        "ranks": [1, 2],
    }
    ranking.update({k: record[k] for k in _META_FIELDS if k in record})
    return ranking  # type: ignore[return-value]


def prompt_messages(prompt: Prompt) -> list[Message]:
    """The prompt as messages: text becomes one user message."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return list(prompt)


def last_user_content(prompt: Prompt) -> str:
    """The text of the user's latest turn (the request the response must answer)."""
    if isinstance(prompt, str):
        return prompt
    for message in reversed(prompt):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content", "")
            return content if isinstance(content, str) else ""
    return ""
