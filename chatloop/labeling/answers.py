"""Tasks and answers, and the order a labeler sees them in: what a task is (task_item builds one from an input
record), what of it a labeler sees in the order drawn for them (shown_payload), how an answer given in that order
is checked and stored in the task's order (check_answer) and shown back (to_shown), and an answer's order as
ranks (as_ranks, dense)."""

from __future__ import annotations

from typing import Any

from chatloop.data.formats import prompt_messages, ranks_problem, validate_demonstration, validate_prompt_value
from chatloop.errors import UserError
from chatloop.labeling.schema import KINDS, LABEL_FLAGS

K_MIN, K_MAX = 2, 9  # InstructGPT ranks 4..9; 2 and 3 are allowed for small batches and imported pairs


class BadAnswer(Exception):
    """A submitted answer that does not fit the task; the message says which field and what was expected."""


def n_options(kind: str, payload: dict[str, Any]) -> int:
    """How many things a task shows in an order drawn per labeler: a ranking's responses, A/B's two sides."""
    return {"ranking": lambda: len(payload["responses"]), "comparison": lambda: 2}.get(kind, lambda: 1)()


# -- answers: shown order <-> task order ------------------------------------------------------------------------


def dense(ranks: list[int]) -> list[int]:
    """Ranks renumbered 1, 2, ... keeping order and ties ([1, 3, 3, 7] -> [1, 2, 2, 3])."""
    levels = {r: i + 1 for i, r in enumerate(sorted(set(ranks)))}
    return [levels[r] for r in ranks]


def check_answer(kind: str, prompt: Any, payload: dict[str, Any], shown: list[int],
                 answer: dict[str, Any]) -> dict[str, Any]:
    """Validate an answer given in the shown order; return it in the task's order, as stored."""
    if not isinstance(answer, dict):
        raise BadAnswer("expected an object")
    if kind == "ranking":
        k = len(payload["responses"])
        none = answer.get("none_acceptable", False) is True
        ranks = answer.get("ranks")
        if ranks is None and none:
            return {"ranks": None, "none_acceptable": True}
        problem = ranks_problem(ranks, k, at_most_k=True)
        if problem is not None:
            raise BadAnswer(f"ranks: {problem}")
        ordered = [0] * k
        for position, task_index in enumerate(shown):
            ordered[task_index] = ranks[position]
        return {"ranks": dense(ordered), "none_acceptable": none}
    if kind == "comparison":
        winner = answer.get("winner")
        if winner not in ("a", "b", "tie"):
            raise BadAnswer("winner: expected 'a', 'b' or 'tie'")
        if winner != "tie" and shown == [1, 0]:
            winner = "b" if winner == "a" else "a"
        return {"winner": winner}
    if kind == "rating":
        likert = answer.get("likert")
        if not isinstance(likert, int) or isinstance(likert, bool) or not 1 <= likert <= 7:
            raise BadAnswer("likert: expected an integer from 1 to 7")
        flags = answer.get("flags", [])
        named = list(flags) if isinstance(flags, dict) else flags  # {"name": true/false} or ["name", ...]
        if (not isinstance(named, list) or not all(isinstance(f, str) for f in named)
                or isinstance(flags, dict) and not all(isinstance(on, bool) for on in flags.values())):
            raise BadAnswer(f"flags: expected a list of names from {', '.join(LABEL_FLAGS)}")
        unknown = sorted({f for f in named if f not in LABEL_FLAGS})
        if unknown:
            raise BadAnswer(f"flags: unknown {', '.join(map(repr, unknown))} (expected names from "
                            f"{', '.join(LABEL_FLAGS)})")
        if isinstance(flags, dict):
            flags = [name for name, on in flags.items() if on]
        return {"likert": likert, "flags": sorted(set(flags))}
    if kind == "demonstration":
        text = answer.get("answer")
        turns = answer.get("turns", [])
        if not isinstance(text, str) or not text.strip():
            raise BadAnswer("answer: expected the assistant's answer")
        if not isinstance(turns, list) or len(turns) % 2 or not all(isinstance(t, str) and t.strip() for t in turns):
            raise BadAnswer("turns: expected follow-up pairs of non-empty (user, assistant) messages")
        messages = [*prompt_messages(prompt), {"role": "assistant", "content": text.strip()}]
        messages += [{"role": ("user", "assistant")[i % 2], "content": t.strip()} for i, t in enumerate(turns)]
        try:
            validate_demonstration({"messages": messages}, "answer")
        except UserError as e:
            raise BadAnswer(str(e)) from None
        return {"messages": messages}
    raise BadAnswer(f"unknown task kind {kind!r}")


def shown_payload(kind: str, payload: dict[str, Any], shown: list[int]) -> dict[str, Any]:
    """What a labeler sees of a task's responses, in the order drawn for them (`shown`: position -> task index)."""
    if kind == "ranking":
        return {"responses": [payload["responses"][i] for i in shown]}
    if kind == "comparison":
        a, b = (payload["a"], payload["b"]) if shown == [0, 1] else (payload["b"], payload["a"])
        return {"a": a, "b": b}
    if kind == "rating":
        return {"response": payload["response"]}
    return {}


def to_shown(kind: str, stored: dict[str, Any], shown: list[int]) -> dict[str, Any]:
    """A stored answer as the labeler gave it (the inverse of check_answer's reordering)."""
    if kind == "ranking" and stored.get("ranks") is not None:
        return {**stored, "ranks": [stored["ranks"][i] for i in shown]}
    if kind == "comparison" and stored["winner"] != "tie" and shown == [1, 0]:
        return {"winner": "b" if stored["winner"] == "a" else "a"}
    return stored


# -- building tasks -------------------------------------------------------------------------------------------------


def task_item(kind: str, record: dict[str, Any], where: str) -> dict[str, Any]:
    """A task from one input record: {"prompt"} (demonstration), {"prompt", "responses"} (ranking),
    {"prompt", "response"} (rating), {"prompt", "a", "b"} (comparison); optional "user_id" (the prompt's
    author), "model"/"models", "gold" (the known answer, task order) and "id"."""
    if not isinstance(record.get("prompt"), (str, list)):
        raise UserError(f"{where}: field 'prompt': missing (expected text or a list of messages)")
    validate_prompt_value(record["prompt"], where)
    hidden = {k: record[k] for k in ("model", "models", "compare", "ended", "sampling", "id", "category", "source")
              if k in record}
    if kind == "demonstration":
        payload: dict[str, Any] = {}
    elif kind == "ranking":
        responses = record.get("responses")
        if not isinstance(responses, list) or not K_MIN <= len(responses) <= K_MAX or not all(
                isinstance(r, str) for r in responses):
            raise UserError(f"{where}: field 'responses': expected a list of {K_MIN}-{K_MAX} strings "
                            "(InstructGPT ranks K = 4..9)")
        # Copies of one answer are one answer to a labeler (ranking them apart would be noise): shown once.
        keep = [i for i, text in enumerate(responses) if responses.index(text) == i]
        if len(keep) < K_MIN:
            raise UserError(f"{where}: field 'responses': expected at least {K_MIN} distinct answers, got {len(keep)}")
        if len(keep) < len(responses):
            if isinstance(hidden.get("ended"), list) and len(hidden["ended"]) == len(responses):
                hidden["ended"] = [hidden["ended"][i] for i in keep]
            models = hidden.get("models")
            if isinstance(models, list) and len(models) == len(responses):  # one answer per model: the models
                # whose answer was a copy of another's are tied with that one's model
                hidden["same_answer"] = {models[i]: models[responses.index(responses[i])]
                                         for i in range(len(responses)) if i not in keep}
                hidden["models"] = [models[i] for i in keep]
            hidden["duplicates_removed"] = len(responses) - len(keep)
            responses = [responses[i] for i in keep]
        payload = {"responses": responses}
    elif kind == "rating":
        if not isinstance(record.get("response"), str):
            raise UserError(f"{where}: field 'response': expected a string")
        payload = {"response": record["response"]}
    elif kind == "comparison":
        if not isinstance(record.get("a"), str) or not isinstance(record.get("b"), str):
            raise UserError(f"{where}: fields 'a' and 'b': expected the two responses as strings")
        payload = {"a": record["a"], "b": record["b"]}
    else:
        raise UserError(f"--kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    gold = record.get("gold")
    if gold is not None:
        try:
            gold = check_answer(kind, record["prompt"], payload, list(range(n_options(kind, payload))), gold)
        except BadAnswer as e:
            raise UserError(f"{where}: field 'gold': {e}") from None
    author = record.get("user_id")
    return {"prompt": record["prompt"], "payload": payload, "hidden": hidden,
            "author": author if isinstance(author, str) else None, "gold": gold}


# -- an answer's order, for agreement ---------------------------------------------------------------------------


def as_ranks(kind: str, answer: dict[str, Any]) -> list[int] | None:
    """A ranking or an A/B answer as ranks in task order (A/B is K = 2); None when there is no order."""
    if kind == "ranking":
        return answer.get("ranks")
    if kind == "comparison":
        return {"a": [1, 2], "b": [2, 1], "tie": [1, 1]}[answer["winner"]]
    return None
