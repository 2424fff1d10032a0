"""`chatloop prompts curate`: the curated view of the prompt store that training uses (docs/RECIPE.md §1).

The steps, in this order (each one reports what it removed and why, with a few redacted examples):

1. **length**: drop prompts longer than `max_length` (chars or tokens; InstructGPT dropped prompts over 1k
   tokens). Off by default.
2. **dedup**: InstructGPT "heuristically deduplicate[d] prompts by checking for prompts that share a long
   common prefix". Rule: two prompts are duplicates when the first `prefix_length` units (characters, or
   tokens of `--tokenizer`) of their *normalized* text are equal; a prompt shorter than that is a duplicate
   only of an identical one. Of each group the earliest prompt is kept (by `created_at`, then ingest order;
   prompts without a time come after those with one). Because the prefix is anchored at the start, "shares
   a prefix of at least N" is transitive (A~B and B~C means all three begin with the same N units), so
   chains cannot link prompts that do not share the prefix themselves: grouping by the prefix key is exact,
   and it is one dict lookup per prompt instead of a comparison of all pairs.
   Normalization: NFKC (full-width letters, ligatures, composed vs combining accents), case folding,
   invisible format characters removed, every run of whitespace one space. The text of a message prompt is
   its user turns (system prompts and the assistant's canned greetings are the product's, not the user's).
3. **cap**: at most `max_per_user` prompts per user id (InstructGPT: 200), a seeded random draw per user
   (`Random(f"{seed}:cap:{user}")`), so a user's draw does not depend on anyone else's prompts.
4. **pii**: redact (`[EMAIL]`, `[PHONE]`, ...) or drop prompts with PII (chatloop.data.pii), in every split
   (InstructGPT only required it of the training split; val/test prompts are shown to labelers too). The
   redacted text is scanned again; a prompt that is still not clean is dropped, and before anything is
   stored every training prompt is checked: scanned clean as it was, or redacted and re-scanned clean.
5. **categories**: prompts without a category get one from keyword rules over InstructGPT's ten use cases;
   the report gives the distribution next to InstructGPT's, and how often the rules agree with the
   categories that records do carry.
6. **split**: train/val/test by user id, no user in two splits; users go heaviest first (ties in a seeded
   order) to a split drawn with probability proportional to its remaining deficit among the splits they fit
   in, so heavy users can land in any split while the many light users at the end fill every split to its
   target almost exactly. Deterministic for a seed.

The raw prompts are never changed: a curation is a new run id with its own rows in `curated` (see
chatloop.data.prompts).
"""

from __future__ import annotations

import json
import random
import re
import sys
import time
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from functools import cache
from operator import attrgetter
from typing import Any, Literal

from chatloop.data.formats import INSTRUCTGPT_MIX, Prompt
from chatloop.data.pii import PII_TYPES, Scanner
from chatloop.data.prompts import CuratedRow, PromptStore, Row
from chatloop.errors import UserError
from chatloop.io import atomic_write_json, atomic_write_text

CATEGORIES = tuple(INSTRUCTGPT_MIX)
SPLITS = ("train", "val", "test")


# -- rows --------------------------------------------------------------------------------------------------------


@dataclass
class Curation:
    rows: list[CuratedRow]
    report: dict[str, Any]


# -- normalization and prefix keys ------------------------------------------------------------------------------

_INVISIBLE = re.compile("[\u00ad\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")


def normalize(text: str) -> str:
    """NFKC + case folding + no invisible characters + single spaces: what "the same prefix" compares."""
    if not text.isascii():  # ASCII is already NFKC and has no invisible characters: skip the slow part
        text = unicodedata.normalize("NFKC", _INVISIBLE.sub("", text))
        text = unicodedata.normalize("NFKC", text.casefold())
    else:
        text = text.lower()
    return " ".join(text.split())


def normalized_prefix(text: str, n: int) -> str:
    """`normalize(text)[:n]`, normalizing only about 2n characters of a long text.

    Normalizing a cut text differs from normalizing the whole only at the cut (a combining mark or a
    whitespace run that the cut splits), so the cut text's result is exact up to its last character: if it
    is longer than n, its first n characters are the answer.
    """
    cut = 2 * n + 16
    head = normalize(text[:cut])
    if len(head) > n or len(text) <= cut:
        return head[:n]
    return normalize(text)[:n]


def dedup_text(prompt: Prompt) -> str:
    """The user's own words: the text prompt, or the user turns of a message prompt joined by newlines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(m["content"] for m in prompt if m["role"] == "user")


def prompt_text(prompt: Prompt) -> str:
    """Every message of the prompt (what PII scanning and length limits look at)."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(m["content"] for m in prompt)


class Units:
    """Counts and prefixes in characters, or in tokens of a chatloop tokenizer directory."""

    def __init__(self, unit: Literal["chars", "tokens"], tokenizer_dir: str | None) -> None:
        self.unit = unit
        self.tokenizer = None
        if unit == "tokens":
            if not tokenizer_dir:
                raise UserError("--tokenizer: required with --prefix_unit tokens (a tokenizer directory)")
            from chatloop.tokenizer import Tokenizer  # only this mode needs the tokenizers library

            self.tokenizer = Tokenizer.load(tokenizer_dir)

    def prefix_keys(self, texts: list[str], n: int) -> list[Any]:
        """The normalized first n units of every text: what two duplicates share."""
        if self.tokenizer is None:
            return [normalized_prefix(t, n) for t in texts]
        return [tuple(ids[:n]) for ids in self.tokenizer.encode_batch([normalize(t) for t in texts])]

    def lengths(self, texts: list[str]) -> list[int]:
        if self.tokenizer is None:
            return [len(t) for t in texts]
        return [len(ids) for ids in self.tokenizer.encode_batch(texts)]


# -- categories -------------------------------------------------------------------------------------------------

# Keyword rules, tried in this order (the first match wins): the specific tasks before the generic
# "write"/question rules, since "Summarize this text" and "Answer using the text ...?" are also requests and
# questions. A conversation with an assistant turn, or a bare greeting, is chat; nothing matched is other.
# Rules look words up in a set and try phrases and regexes only when a word they need occurs: a regex
# alternation of keywords scans every position of the text and costs ten times as much.


class _Rule:
    """Fires on any of `words`, any of `phrases` (tried only when their last word occurs), or `pattern`
    (tried only when one of the `gate` words occurs)."""

    def __init__(self, category: str, words: set[str] | None = None, phrases: tuple[str, ...] = (),
                 pattern: re.Pattern[str] | None = None, gate: set[str] | None = None) -> None:
        self.category = category
        self.words = frozenset(words or ())
        self.phrases: dict[str, list[str]] = {}
        for phrase in phrases:
            self.phrases.setdefault(phrase.split()[-1], []).append(phrase)
        self.pattern = pattern
        self.gate = frozenset(gate or ())

    def matches(self, text: str, words: set[str]) -> bool:
        if not words.isdisjoint(self.words):
            return True
        for last in words.intersection(self.phrases):
            if any(p in text for p in self.phrases[last]):
                return True
        return self.pattern is not None and not words.isdisjoint(self.gate) and bool(self.pattern.search(text))


def _combine(firsts: str, seconds: str) -> tuple[str, ...]:
    return tuple(f"{a} {b}" for a in firsts.split("|") for b in seconds.split("|"))


_NUMBERS = r"(?:\d+|some|a few|several|two|three|four|five|six|seven|eight|nine|ten)"
_RULES = (
    _Rule("summarization", {"summarize", "summarise", "summary", "tldr", "tl;dr"},
          ("sum up", "main points of")),
    _Rule("extract", {"extract"}, ("pull out",) + _combine("named in|mentioned in|listed in", "this text|the text"),
          re.compile(r"\blist (?:all )?the \w+(?: \w+)? (?:in|from|mentioned in) (?:this|the following|the) "
                     r"(?:text|passage|article)"), {"list"}),
    _Rule("closed_qa", set(), _combine("using the|based on the|according to the|from the",
                                             "text|passage|article|paragraph"),
          re.compile(r"\bquestion:.*\btext:|\btext:.*\bquestion:", re.DOTALL), {"question"}),
    _Rule("rewrite", {"rewrite", "re-write", "rephrase", "paraphrase", "reword", "translate", "proofread"},
          _combine("put this|make this|turn this", "sentence|text|paragraph")
          + _combine("correct the|fix the", "grammar|spelling") + _combine("past|present|future", "tense")),
    _Rule("classification", {"classify", "categorize", "categorise", "sentiment"},
          ("true or false", "which category"),
          # "Is this sentence polite or rude?", "Is X a creature, a person or a town?": pick one of the options
          re.compile(r"\bis this (?:sentence|text|review|message|email|tweet|comment)\b.* or \w+\?"
                     r"|, (?:an? )?\w+,? or (?:an? )?\w+\?"), {"or"}),
    _Rule("brainstorming", {"brainstorm", "suggest"}, _combine("idea|ideas", "for|about|on"),
          re.compile(rf"\b(?:list|name|give me) {_NUMBERS}\b"), {"list", "name", "give"}),
    _Rule("generation", {"write", "compose", "draft", "create", "generate", "describe", "poem", "story", "essay",
                         "letter", "song"}, ("tell me about", "say something")),
    _Rule("open_qa", set(), (), re.compile(r"^(?:who|what|when|where|why|how|which|does|do|is|are|can|could"
                                                   r"|did|was|were)\b|\?$"),
          {"who", "what", "when", "where", "why", "how", "which", "does", "do", "is", "are", "can", "could", "did",
           "was", "were", "?"}),
)
_RULE_WORD = re.compile(r"[a-z]+(?:[-;'][a-z]+)*")
_GREETING = re.compile(r"(?:hi|hello|hey|good (?:morning|afternoon|evening))(?: there)?\W*$")


def tag_category(prompt: Prompt) -> str:
    """The use case of a prompt by keyword rules (see _RULES); 'other' when no rule fires."""
    if not isinstance(prompt, str) and any(m["role"] == "assistant" for m in prompt):
        return "chat"
    text = " ".join(_last_user(prompt).lower().split())
    if _GREETING.match(text):  # a conversation that has only just begun
        return "chat"
    words = set(_RULE_WORD.findall(text))
    if text.endswith("?"):
        words.add("?")  # lets the open_qa rule look at questions that start with another word
    for rule in _RULES:
        if rule.matches(text, words):
            return rule.category
    return "other"


def _last_user(prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")


@cache  # a store holds a handful of distinct categories and a million records
def canonical_category(value: str | None) -> str | None:
    """A record's category in the form of CATEGORIES ("Open QA" -> "open_qa"); unknown ones are kept as given."""
    if value is None:
        return None
    key = "_".join(value.strip().lower().replace("-", " ").split())
    return key if key in CATEGORIES else value


# -- steps --------------------------------------------------------------------------------------------------------


_NO_TIME = "\uffff"  # sorts after every fixed-width ISO time


def chronological(rows: Sequence[Row]) -> list[Row]:
    """Rows by created_at (rows without a time last), then ingest order: "earliest" for dedup.

    Two stable sorts with plain keys: much cheaper than one sort on (time, id) tuples for a million rows,
    and the first is linear when the rows come in ingest order, as the store gives them.
    """
    ordered = sorted(rows, key=attrgetter("pid"))
    ordered.sort(key=lambda r: r.created_at or _NO_TIME)
    return ordered


def dedup_prefix(rows: Sequence[Row], prefix_length: int, units: Units | None = None
                 ) -> tuple[list[Row], list[tuple[Row, Row]]]:
    """Keep the earliest row of every group sharing a normalized prefix; (kept, [(removed, kept-instead)])."""
    units = units or Units("chars", None)
    ordered = chronological(rows)
    keys = units.prefix_keys([dedup_text(r.prompt) for r in ordered], prefix_length)
    first: dict[Any, Row] = {}
    kept: list[Row] = []
    removed: list[tuple[Row, Row]] = []
    for row, key in zip(ordered, keys):
        winner = first.get(key)
        if winner is None:
            first[key] = row
            kept.append(row)
        else:
            removed.append((row, winner))
    return kept, removed


def cap_per_user(rows: Sequence[Row], cap: int, seed: int) -> tuple[list[Row], dict[str, int]]:
    """At most `cap` rows per user, a seeded draw per user; (kept in input order, {capped user: had})."""
    by_user: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        by_user[row.user_id].append(row)
    drop: set[int] = set()
    capped: dict[str, int] = {}
    for user, user_rows in by_user.items():
        if len(user_rows) > cap:
            capped[user] = len(user_rows)
            ids = sorted(r.pid for r in user_rows)  # the draw depends on the set, not on the order given
            keep = set(random.Random(f"{seed}:cap:{user}").sample(ids, cap))
            drop.update(i for i in ids if i not in keep)
    return [r for r in rows if r.pid not in drop], capped


def redact_prompt(prompt: Prompt, scanner: Scanner) -> tuple[Prompt, list[str]]:
    """The prompt with PII replaced in every message, and the types found (empty: prompt unchanged)."""
    if isinstance(prompt, str):
        text, findings = scanner.redact(prompt)
        return text, [f.kind for f in findings]
    kinds: list[str] = []
    messages = []
    for message in prompt:
        text, findings = scanner.redact(message["content"])
        kinds += [f.kind for f in findings]
        messages.append({**message, "content": text} if findings else message)
    return (messages if kinds else prompt), kinds


def has_pii(prompt: Prompt, scanner: Scanner) -> bool:
    if isinstance(prompt, str):
        return bool(scanner.find(prompt))
    return any(scanner.find(m["content"]) for m in prompt)


def split_by_user(counts: dict[str, int], ratios: dict[str, float], seed: int) -> dict[str, str]:
    """user -> split, no user in two splits, split sizes (in prompts) close to `ratios` (module docstring)."""
    names = list(ratios)
    total = sum(counts.values())
    targets = _allocate(total, [ratios[s] for s in names])
    assigned = dict.fromkeys(names, 0)
    rng = random.Random(f"{seed}:split")
    users = sorted(counts)
    rng.shuffle(users)
    users.sort(key=lambda u: -counts[u])  # stable: heaviest first, equal counts in the seeded order
    out: dict[str, str] = {}
    for user in users:
        n = counts[user]
        deficits = [targets[i] - assigned[s] for i, s in enumerate(names)]
        fits = [i for i, d in enumerate(deficits) if d >= n]
        if fits:
            i = rng.choices(fits, weights=[deficits[j] for j in fits])[0]
        else:  # too big for any split's remainder: the one that overshoots least
            i = max(range(len(names)), key=lambda j: deficits[j])
        out[user] = names[i]
        assigned[names[i]] += n
    return out


def _allocate(total: int, shares: list[float]) -> list[int]:
    """Integers proportional to shares that sum to total (largest remainder)."""
    weight = sum(shares)
    exact = [total * s / weight for s in shares] if weight > 0 else [0.0] * len(shares)
    counts = [int(x) for x in exact]
    order = sorted(range(len(shares)), key=lambda i: counts[i] - exact[i])
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


# -- the whole curation -----------------------------------------------------------------------------------------


@dataclass
class CurateOptions:
    """What `curate_rows` needs (CurateConfig minus the store): also what the report records."""

    prefix_length: int = 60
    prefix_unit: Literal["chars", "tokens"] = "chars"
    max_length: int = 0
    max_per_user: int = 200
    pii: Literal["redact", "drop"] = "redact"
    train: float = 0.8
    val: float = 0.1
    test: float = 0.1
    seed: int = 0
    examples: int = 3


def _short(text: str, n: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def curate_rows(rows: Sequence[Row], opts: CurateOptions, scanner: Scanner | None = None,
                units: Units | None = None, log: Callable[[str], None] = lambda s: None) -> Curation:
    """Run every step over `rows` (module docstring) and return the curated rows and the report."""
    scanner = scanner or Scanner()
    units = units or Units(opts.prefix_unit, None)
    k = opts.examples

    def show(prompt: Prompt) -> str:  # the report must not leak the PII that curation removes
        return _short(prompt_text(redact_prompt(prompt, scanner)[0]))

    steps: list[dict[str, Any]] = []
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def done(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now
        log(f"  {name}: {steps[-1]['removed']} removed, {steps[-1].get('kept', '')} kept ({timings[name]:.1f} s)")

    report: dict[str, Any] = {"options": asdict(opts), "input": {
        "prompts": len(rows), "users": len({r.user_id for r in rows})}}

    # 1. length
    if opts.max_length > 0:
        lengths = units.lengths([prompt_text(r.prompt) for r in rows])
        long_rows = [(r, n) for r, n in zip(rows, lengths) if n > opts.max_length]
        current = [r for r, n in zip(rows, lengths) if n <= opts.max_length]
        examples = [{"pid": r.pid, "length": n, "prompt": show(r.prompt)} for r, n in long_rows[:k]]
    else:
        long_rows, current, examples = [], list(rows), []
    steps.append({"step": "length", "removed": len(long_rows), "kept": len(current),
                  "why": f"longer than {opts.max_length} {opts.prefix_unit}" if opts.max_length > 0
                  else "off (max_length 0)", "examples": examples})
    done("length")

    # 2. dedup
    current, dups = dedup_prefix(current, opts.prefix_length, units)
    groups = len({w.pid for _, w in dups})
    exact = sum(normalize(dedup_text(r.prompt)) == normalize(dedup_text(w.prompt)) for r, w in dups[:20000])
    steps.append({
        "step": "dedup", "removed": len(dups), "kept": len(current), "groups": groups,
        "why": f"shares its first {opts.prefix_length} normalized {opts.prefix_unit} with an earlier prompt",
        "exact_duplicates_in_first_20000": exact,
        "examples": [{"removed": show(r.prompt), "kept_instead": show(w.prompt), "removed_pid": r.pid,
                      "kept_pid": w.pid} for r, w in _spread(dups, k)]})
    done("dedup")

    # 3. cap
    before = len(current)
    current, capped = cap_per_user(current, opts.max_per_user, opts.seed)
    heaviest = sorted(capped.items(), key=lambda kv: (-kv[1], kv[0]))
    steps.append({"step": "cap", "removed": before - len(current), "kept": len(current),
                  "users_capped": len(capped),
                  "why": f"more than {opts.max_per_user} prompts from one user id (seeded draw of "
                         f"{opts.max_per_user})",
                  "examples": [{"user_id": u, "had": n, "kept": opts.max_per_user} for u, n in heaviest[:k]]})
    done("cap")

    # 4. PII
    current, step, redacted, clean = _pii_step(current, opts, scanner, show)
    steps.append(step)
    done("pii")

    # 5. categories
    categories, step = _category_step(current, redacted, show, k)
    steps.append(step)
    done("categories")

    # 6. split
    counts = Counter(r.user_id for r in current)
    ratios = {"train": opts.train, "val": opts.val, "test": opts.test}
    assignment = split_by_user(dict(counts), ratios, opts.seed)
    out = [CuratedRow(r.pid, assignment[r.user_id], *categories[r.pid], *redacted.get(r.pid, (None, ())))
           for r in current]
    split_counts = Counter(r.split for r in out)
    split_users = Counter(assignment.values())
    steps.append({
        "step": "split", "removed": 0, "kept": len(out),
        "why": "train/val/test by user id (no user in two splits)",
        "splits": [{"split": s, "prompts": split_counts.get(s, 0), "users": split_users.get(s, 0),
                    "ratio": round(split_counts.get(s, 0) / max(1, len(out)), 4), "target": ratios[s]}
                   for s in SPLITS],
        "max_per_user": max(counts.values(), default=0), "examples": []})
    done("split")

    _check_train_pii_free(current, assignment, redacted, clean, scanner)
    timings["verify_train_pii_free"] = round(time.perf_counter() - clock, 3)

    report["steps"] = steps
    report["output"] = {"prompts": len(out), "users": len(counts)}
    report["seconds"] = timings
    return Curation(out, report)


def _pii_step(current: list[Row], opts: CurateOptions, scanner: Scanner, show: Callable[[Prompt], str]
              ) -> tuple[list[Row], dict[str, Any], dict[int, tuple[Prompt, tuple[str, ...]]], set[int]]:
    """Step 4: the rows kept, the step's report, the redacted prompts (pid -> prompt, PII types) and the pids
    scanned clean."""
    k = opts.examples
    found: Counter[str] = Counter()
    redacted: dict[int, tuple[Prompt, tuple[str, ...]]] = {}
    dropped: list[tuple[Row, list[str]]] = []
    unclean = 0
    kept_rows = []
    clean: set[int] = set()
    for row in current:
        new, kinds = redact_prompt(row.prompt, scanner)
        if not kinds:
            clean.add(row.pid)
            kept_rows.append(row)
            continue
        found.update(kinds)
        if opts.pii == "drop":
            dropped.append((row, kinds))
            continue
        if has_pii(new, scanner):  # redaction joined pieces into something that looks like PII again
            unclean += 1
            dropped.append((row, kinds))
            continue
        redacted[row.pid] = (new, tuple(sorted(set(kinds))))
        kept_rows.append(row)
    current = kept_rows
    prompts_with_pii = len(redacted) + len(dropped)
    pii_examples = [{"pid": pid, "types": list(kinds), "redacted": _short(prompt_text(p))}
                    for pid, (p, kinds) in list(redacted.items())[:k]]
    pii_examples += [{"pid": r.pid, "types": sorted(set(kinds)), "dropped": True, "redacted": show(r.prompt)}
                     for r, kinds in dropped[: max(0, k - len(pii_examples))]]
    step = {"step": "pii", "action": opts.pii, "removed": len(dropped), "kept": len(current),
            "prompts_with_pii": prompts_with_pii, "redacted": len(redacted), "still_unclean_after_redaction": unclean,
            "found": {t: found.get(t, 0) for t in PII_TYPES},
            "why": "contains PII (dropped)" if opts.pii == "drop"
            else "PII replaced by [TYPE] placeholders; dropped only if a re-scan still finds PII",
            "examples": pii_examples}
    return current, step, redacted, clean


def _category_step(current: list[Row], redacted: dict[int, tuple[Prompt, tuple[str, ...]]],
                   show: Callable[[Prompt], str], k: int) -> tuple[dict[int, tuple[str, bool]], dict[str, Any]]:
    """Step 5: each row's category (and whether the rules tagged it), and the step's report."""
    categories: dict[int, tuple[str, bool]] = {}
    given = [(r, canonical_category(r.category)) for r in current]
    for row, category in given:
        if category is None:
            source = redacted[row.pid][0] if row.pid in redacted else row.prompt
            categories[row.pid] = (tag_category(source), True)
        else:
            categories[row.pid] = (category, False)
    labeled = [(r, c) for r, c in given if c in CATEGORIES]
    probe = labeled[:: max(1, len(labeled) // 5000)]
    agreement = (sum(tag_category(r.prompt) == c for r, c in probe) / len(probe)) if probe else None
    tagged = sum(t for _, t in categories.values())
    distribution = Counter(c for c, _ in categories.values())
    n = max(1, len(current))
    return categories, {
        "step": "categories", "removed": 0, "kept": len(current), "tagged": tagged,
        "why": "records without a category were tagged by keyword rules",
        "rule_agreement_on_labeled": None if agreement is None else round(agreement, 4),
        "rule_agreement_sample": len(probe),
        "distribution": [{"category": c, "count": distribution.get(c, 0),
                          "percent": round(100 * distribution.get(c, 0) / n, 1),
                          "instructgpt_percent": INSTRUCTGPT_MIX.get(c)}
                         for c in [*CATEGORIES, *sorted(set(distribution) - set(CATEGORIES))]],
        "examples": [{"pid": r.pid, "category": categories[r.pid][0], "prompt": show(r.prompt)}
                     for r in [r for r, c in given if c is None][:k]]}


def _check_train_pii_free(current: list[Row], assignment: dict[str, str],
                          redacted: dict[int, tuple[Prompt, tuple[str, ...]]], clean: set[int],
                          scanner: Scanner) -> None:
    """The training split must be PII-free. Every prompt kept unchanged was scanned clean in step 4; re-scan the
    final text of every redacted training prompt, and check that no training prompt escaped the scan."""
    for row in current:
        if assignment[row.user_id] != "train":
            continue
        if row.pid in redacted:
            if has_pii(redacted[row.pid][0], scanner):
                raise AssertionError(f"prompt {row.pid} of the training split still contains PII")
        elif row.pid not in clean:
            raise AssertionError(f"prompt {row.pid} of the training split was never scanned for PII")


def _spread(items: list[Any], k: int) -> list[Any]:
    """k items spread over the list (the first few of a sorted list are often all alike)."""
    if len(items) <= k:
        return list(items)
    step = len(items) / k
    return [items[int(i * step)] for i in range(k)]


# -- report -----------------------------------------------------------------------------------------------------


def report_markdown(report: dict[str, Any]) -> str:
    """The curation report as markdown: a table of the steps, then each step's details and examples."""
    lines = [f"# Prompt curation {report.get('curation_id', '')}".rstrip(), ""]
    inp, out = report["input"], report["output"]
    lines += [f"{inp['prompts']} prompts from {inp['users']} users in; {out['prompts']} prompts from "
              f"{out['users']} users out.", "", "| step | removed | kept | why |", "|---|---:|---:|---|"]
    lines += [f"| {s['step']} | {s['removed']} | {s['kept']} | {s['why']} |" for s in report["steps"]]
    for step in report["steps"]:
        lines += ["", f"## {step['step']}", ""]
        if step["step"] == "pii":
            lines += ["| type | found |", "|---|---:|"] + [f"| {t} | {n} |" for t, n in step["found"].items()]
            lines += ["", f"{step['prompts_with_pii']} prompts had PII: {step['redacted']} redacted, "
                          f"{step['removed']} dropped ({step['still_unclean_after_redaction']} still unclean "
                          "after redaction).", ""]
        elif step["step"] == "categories":
            agreement = step["rule_agreement_on_labeled"]
            lines += [f"{step['tagged']} prompts tagged by rules. Rules agree with the records' own categories "
                      f"on {'-' if agreement is None else f'{agreement:.1%}'} of a sample of "
                      f"{step['rule_agreement_sample']}.", "",
                      "| category | prompts | percent | InstructGPT percent |", "|---|---:|---:|---:|"]
            lines += [f"| {d['category']} | {d['count']} | {d['percent']} | "
                      f"{'' if d['instructgpt_percent'] is None else d['instructgpt_percent']} |"
                      for d in step["distribution"]]
            lines.append("")
        elif step["step"] == "split":
            lines += ["| split | prompts | users | ratio | target |", "|---|---:|---:|---:|---:|"]
            lines += [f"| {s['split']} | {s['prompts']} | {s['users']} | {s['ratio']} | {s['target']} |"
                      for s in step["splits"]]
            lines.append("")
        elif step["step"] == "dedup":
            lines += [f"{step['groups']} groups of duplicates.", ""]
        elif step["step"] == "cap":
            lines += [f"{step['users_capped']} users capped.", ""]
        lines += [f"- `{json.dumps(e, ensure_ascii=False)}`" for e in step["examples"]]
    return "\n".join(lines).rstrip() + "\n"


def print_report(report: dict[str, Any], file: Any = None) -> None:
    """A short table of the steps and the split sizes on the terminal."""
    file = file or sys.stdout
    print(f"{'step':<12}{'removed':>10}{'kept':>10}  why", file=file)
    for s in report["steps"]:
        print(f"{s['step']:<12}{s['removed']:>10}{s['kept']:>10}  {s['why']}", file=file)
    for s in report["steps"]:
        if s["step"] == "pii":
            found = ", ".join(f"{t} {n}" for t, n in s["found"].items() if n)
            print(f"PII found: {found or 'none'}", file=file)
        if s["step"] == "split":
            print("splits: " + ", ".join(f"{x['split']} {x['prompts']} prompts / {x['users']} users"
                                         for x in s["splits"]), file=file)


# -- the command --------------------------------------------------------------------------------------------------


@dataclass
class CurateConfig:
    db: str = "sqlite:///runs/prompts.db"
    """The prompt store: an SQLAlchemy URL (sqlite:///file.db, postgresql://...) or a plain SQLite file path."""
    prefix_length: int = 60
    """Prompts whose normalized text starts with the same this many units are duplicates (earliest kept)."""
    prefix_unit: Literal["chars", "tokens"] = "chars"
    """Unit of prefix_length and max_length: characters, or tokens of --tokenizer."""
    tokenizer: str | None = None
    """Tokenizer directory (from `chatloop tokenizer`) for prefix_unit tokens."""
    max_length: int = 0
    """Drop prompts longer than this many units (InstructGPT: 1k tokens); 0 keeps every length."""
    max_per_user: int = 200
    """At most this many prompts per user id (a seeded random draw, not the first ones)."""
    pii: Literal["redact", "drop"] = "redact"
    """What to do with a prompt that contains PII: replace it by [TYPE] placeholders, or drop the prompt."""
    names_file: str | None = None
    """Optional list of person names (one per line) to redact as [NAME]; no offline NER model is used."""
    train: float = 0.8
    """Share of prompts in the training split (split by user id)."""
    val: float = 0.1
    """Share of prompts in the validation split."""
    test: float = 0.1
    """Share of prompts in the test split."""
    seed: int = 0
    """Seed of the per-user cap draws and of the split."""
    examples: int = 3
    """Examples per step in the report."""
    report_dir: str | None = None
    """Also write report.json and report.md here (the store keeps them anyway, and export copies them)."""

    def options(self) -> CurateOptions:
        return CurateOptions(**{f.name: getattr(self, f.name) for f in fields(CurateOptions)})


def check_options(cfg: CurateConfig | CurateOptions) -> None:
    def need(ok: bool, flag: str, expected: str, value: Any) -> None:
        if not ok:
            raise UserError(f"--{flag}: expected {expected}, got {value!r}")

    need(cfg.prefix_length >= 1, "prefix_length", "at least 1", cfg.prefix_length)
    need(cfg.max_length >= 0, "max_length", "0 (off) or more", cfg.max_length)
    need(cfg.max_per_user >= 1, "max_per_user", "at least 1", cfg.max_per_user)
    for name in SPLITS:
        need(0 <= getattr(cfg, name) <= 1, name, "a share in [0, 1]", getattr(cfg, name))
    total = cfg.train + cfg.val + cfg.test
    need(abs(total - 1) < 1e-6, "train/--val/--test", "shares that sum to 1",
         f"{cfg.train} + {cfg.val} + {cfg.test} = {total:g}")
    need(cfg.examples >= 0, "examples", "0 or more", cfg.examples)


def curate(cfg: CurateConfig) -> int:
    """Load the store's raw prompts, curate them, store the result as a new curation run; return its id."""
    check_options(cfg)
    scanner = Scanner.from_file(cfg.names_file)
    units = Units(cfg.prefix_unit, cfg.tokenizer)
    store = PromptStore(cfg.db, create=False)
    start = time.perf_counter()
    rows = store.load_rows()
    if not rows:
        raise UserError(f"{store.db}: the prompt store has no prompts (run `chatloop prompts ingest` first)")
    print(f"curating {len(rows)} prompts from {store.db}", flush=True)
    result = curate_rows(rows, cfg.options(), scanner, units, log=lambda s: print(s, flush=True))
    result.report["config"] = {**asdict(cfg), "db": store.db}
    result.report["seconds"]["total_before_storing"] = round(time.perf_counter() - start, 3)
    curation_id = store.save_curation(result.rows, result.report, report_markdown)
    print_report(result.report)
    print(f"curation {curation_id} stored in {store.db} ({time.perf_counter() - start:.1f} s)")
    if cfg.report_dir:
        atomic_write_json(f"{cfg.report_dir}/report.json", result.report)
        atomic_write_text(f"{cfg.report_dir}/report.md", report_markdown(result.report))
    return curation_id
