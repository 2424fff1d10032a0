"""Curation rules on in-memory rows: normalization, prefix dedup, the per-user cap, PII, categories, splits."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from chatloop.data.curate import (
    CATEGORIES,
    CurateConfig,
    CurateOptions,
    Row,
    Units,
    canonical_category,
    cap_per_user,
    check_options,
    curate_rows,
    dedup_prefix,
    normalize,
    normalized_prefix,
    prompt_text,
    split_by_user,
    tag_category,
)
from chatloop.data.pii import Scanner, scan
from chatloop.errors import UserError

P60 = "Please answer the following question about our product line: "  # 62 characters


def row(pid: int, prompt, user: str = "u1", created: str | None = "2024-01-01T00:00:00.000000Z",
        category: str | None = None) -> Row:
    return Row(pid, prompt, user, category, "api", created)


def t(seconds: int) -> str:
    return f"2024-01-01T00:00:{seconds:02d}.000000Z"


# -- normalization ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("a,b", [
    ("Write a poem", "ＷＲＩＴＥ　ａ　ｐｏｅｍ"),  # full-width letters and ideographic space
    ("café au lait", "cafe\u0301 au lait"),  # precomposed vs combining accent
    ("Write  a\tpoem\n", " write a poem"),  # case and whitespace runs
    ("write a poem", "wri\u200bte a\u00ad poem"),  # zero-width space and soft hyphen
    ("office", "oﬃce"),  # ligature
    ("STRASSE", "straße"),  # case folding beyond lower()
])
def test_normalize_equates_variants(a: str, b: str) -> None:
    assert normalize(a) == normalize(b)


def test_normalize_keeps_real_differences() -> None:
    assert normalize("café") != normalize("cafe")  # accents are letters, not noise
    assert normalize("a b") != normalize("ab")


@pytest.mark.parametrize("text", [
    "x" * 500, "a  " * 300 + "tail", "e\u0301" * 200, "ＡＢＣ " * 80, "  lead" + " " * 400 + "trail " * 30,
])
def test_normalized_prefix_equals_normalizing_everything(text: str) -> None:
    for n in (1, 5, 60, 100):
        assert normalized_prefix(text, n) == normalize(text)[:n]


# -- prefix dedup ------------------------------------------------------------------------------------------------


def test_prompts_sharing_the_prefix_keep_only_the_earliest() -> None:
    rows = [row(1, P60 + "what is it?", created=t(30)), row(2, P60 + "how much?", created=t(10)),
            row(3, P60 + "where is it sold?", created=t(20))]
    kept, removed = dedup_prefix(rows, 60)
    assert [r.pid for r in kept] == [2]  # earliest by time, not first ingested
    assert sorted((r.pid, w.pid) for r, w in removed) == [(1, 2), (3, 2)]


def test_chains_are_one_group_because_the_prefix_is_anchored() -> None:
    """A~B share 70 chars, B~C share 65, A~C 62: all share the first 60, so one group, one survivor."""
    base = "x" * 60
    a, b, c = base + "aaaaaaaaaa1", base + "aaaaaaaaaa2", base + "aaaaa3"
    rows = [row(1, a, created=t(1)), row(2, b, created=t(2)), row(3, c, created=t(3))]
    kept, removed = dedup_prefix(rows, 60)
    assert [r.pid for r in kept] == [1] and len(removed) == 2


def test_a_chain_through_a_shorter_overlap_does_not_link() -> None:
    """A and B share 59 characters only: different groups, even though B and C share 60."""
    common = "y" * 59
    a, b, c = common + "A tail", common + "B tail", common + "B other tail"
    kept, _ = dedup_prefix([row(1, a), row(2, b), row(3, c)], 60)
    assert [r.pid for r in kept] == [1, 2]


def test_short_prompts_are_duplicates_only_when_identical_after_normalization() -> None:
    rows = [row(1, "What color is the fox?"), row(2, "what  color is the FOX?"), row(3, "What color is the fox")]
    kept, removed = dedup_prefix(rows, 60)
    assert [r.pid for r in kept] == [1, 3] and [(r.pid, w.pid) for r, w in removed] == [(2, 1)]


def test_unicode_variants_are_duplicates() -> None:
    rows = [row(1, P60 + "one"), row(2, "ＰＬＥＡＳＥ answer  the following question about our product line: two"),
            row(3, "Ple\u200base answer the following question about our product line: three")]
    kept, _ = dedup_prefix(rows, 60)
    assert [r.pid for r in kept] == [1]


def test_ties_in_time_go_to_ingest_order_and_untimed_prompts_come_last() -> None:
    rows = [row(5, P60 + "a", created=None), row(7, P60 + "b", created=t(9)), row(3, P60 + "c", created=t(9))]
    kept, _ = dedup_prefix(rows, 60)
    assert [r.pid for r in kept] == [3]
    kept, _ = dedup_prefix([row(5, P60 + "a", created=None), row(4, P60 + "b", created=None)], 60)
    assert [r.pid for r in kept] == [4]


def test_message_prompts_compare_the_users_words_only() -> None:
    system = {"role": "system", "content": "You are the assistant of a big shop. " * 4}
    greeting = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help you?"}]
    a = [system, *greeting, {"role": "user", "content": "Where is my order?"}]
    b = [system, *greeting, {"role": "user", "content": "Can I pay by card?"}]
    c = [*greeting, {"role": "user", "content": "Where is my order?"}]  # same user words as a
    kept, removed = dedup_prefix([row(1, a), row(2, b), row(3, c)], 60)
    assert [r.pid for r in kept] == [1, 2] and [(r.pid, w.pid) for r, w in removed] == [(3, 1)]


def test_prefix_in_tokens(tokenizer_dir) -> None:
    units = Units("tokens", str(tokenizer_dir))
    rows = [row(1, "The red fox jumps over the lazy dog and runs."),
            row(2, "The red fox jumps over the lazy cat and sleeps."), row(3, "A blue fox.")]
    n = len(units.tokenizer.encode(normalize("the red fox jumps over the lazy ")))
    kept, _ = dedup_prefix(rows, n, units)
    assert [r.pid for r in kept] == [1, 3]
    kept, _ = dedup_prefix(rows, n + 3, units)
    assert [r.pid for r in kept] == [1, 2, 3]


def test_tokens_need_a_tokenizer() -> None:
    with pytest.raises(UserError, match="--tokenizer"):
        Units("tokens", None)


# -- cap per user ------------------------------------------------------------------------------------------------


def user_rows(user: str, n: int, start: int = 0) -> list[Row]:
    return [row(start + i, f"prompt {i} of {user}", user=user) for i in range(n)]


def test_a_user_with_exactly_the_cap_is_kept_whole() -> None:
    kept, capped = cap_per_user(user_rows("u", 200), 200, seed=0)
    assert len(kept) == 200 and capped == {}


def test_a_user_over_the_cap_gets_a_seeded_random_draw() -> None:
    rows = user_rows("u", 201)
    kept, capped = cap_per_user(rows, 200, seed=0)
    assert len(kept) == 200 and capped == {"u": 201}
    again, _ = cap_per_user(list(reversed(rows)), 200, seed=0)
    assert {r.pid for r in again} == {r.pid for r in kept}  # deterministic, whatever the input order
    many = user_rows("v", 600)
    drawn = {r.pid for r in cap_per_user(many, 200, seed=0)[0]}
    assert drawn != set(range(200))  # not the first 200
    assert drawn != {r.pid for r in cap_per_user(many, 200, seed=1)[0]}  # the seed matters
    assert max(drawn) > 400 and min(drawn) < 200  # spread over the whole history


def test_a_users_draw_does_not_depend_on_other_users() -> None:
    alone = cap_per_user(user_rows("u", 300), 200, seed=3)[0]
    mixed = cap_per_user(user_rows("u", 300) + user_rows("w", 500, start=1000), 200, seed=3)[0]
    assert [r.pid for r in alone] == [r.pid for r in mixed if r.user_id == "u"]


# -- categories ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt,category", [
    ("Write a short story about a dragon.", "generation"),
    ("Describe Paris in 3 sentences.", "generation"),
    ("What is the capital of France?", "open_qa"),
    ("how do magnets work", "open_qa"),
    ("List 5 ideas for a birthday party.", "brainstorming"),
    ("Suggest names for my cat.", "brainstorming"),
    ("Rewrite this sentence in the past tense: I walk home.", "rewrite"),
    ("Translate to French: good morning", "rewrite"),
    ("Summarize this text in one sentence: The fox ran. The dog slept.", "summarization"),
    ("Classify the sentiment of this review: great phone!", "classification"),
    ("Is this sentence polite or rude? You are late.", "classification"),
    ("Is the fox a creature, a person or a town?", "classification"),
    ("Answer the question using the text.\nText: Bo is 5.\nQuestion: How old is Bo?", "closed_qa"),
    ("Extract the names from this text: Ann met Bob.", "extract"),
    ("Which towns are named in this text? Rome is big.", "extract"),
    ("7 plus 6", "other"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
      {"role": "user", "content": "Write a poem."}], "chat"),
    ([{"role": "user", "content": "Good morning!"}], "chat"),
])
def test_category_rules(prompt, category: str) -> None:
    assert tag_category(prompt) == category


def test_canonical_category() -> None:
    assert canonical_category("Open QA") == "open_qa"
    assert canonical_category("closed-qa") == "closed_qa"
    assert canonical_category("poetry") == "poetry"  # unknown labels are kept, and reported as they are
    assert canonical_category(None) is None


# -- split by user ---------------------------------------------------------------------------------------------------


def heavy_tailed_counts(n_users: int, seed: int = 0) -> dict[str, int]:
    rng = random.Random(seed)
    return {f"u{i}": min(200, int(rng.paretovariate(1.1))) for i in range(n_users)}


def test_split_has_no_user_in_two_splits_and_meets_the_ratios() -> None:
    counts = heavy_tailed_counts(5000)
    counts.update({"heavy1": 200, "heavy2": 200, "heavy3": 200})
    assignment = split_by_user(counts, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=0)
    assert set(assignment) == set(counts)  # a dict: one split per user by construction
    sizes = Counter()
    for user, split in assignment.items():
        sizes[split] += counts[user]
    total = sum(counts.values())
    for split, ratio in (("train", 0.8), ("val", 0.1), ("test", 0.1)):
        assert abs(sizes[split] / total - ratio) < 0.002, sizes


def test_split_is_deterministic_and_seeded() -> None:
    counts = heavy_tailed_counts(500)
    ratios = {"train": 0.8, "val": 0.1, "test": 0.1}
    assert split_by_user(counts, ratios, 0) == split_by_user(dict(reversed(list(counts.items()))), ratios, 0)
    assert split_by_user(counts, ratios, 0) != split_by_user(counts, ratios, 1)


def test_split_with_few_heavy_users_overshoots_least() -> None:
    counts = {"a": 200, "b": 150, "c": 10, "d": 5}
    assignment = split_by_user(counts, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=0)
    assert len(set(assignment.values())) >= 2  # a and b cannot both be in a split of 36 prompts


def test_split_ratio_checks() -> None:
    with pytest.raises(UserError, match="sum to 1"):
        check_options(CurateConfig(train=0.8, val=0.2, test=0.1))
    with pytest.raises(UserError, match="--val: expected a share in"):
        check_options(CurateConfig(train=0.9, val=-0.1, test=0.2))
    check_options(CurateConfig(train=1.0, val=0.0, test=0.0))


# -- the whole curation -------------------------------------------------------------------------------------------


def synthetic_rows(n_users: int = 300, seed: int = 0) -> list[Row]:
    rng = random.Random(seed)
    rows: list[Row] = []
    pid = 0
    pii = ["My email is ann.lee+shop@mail.example.com.", "Call me at (555) 123-4567.",
           "My card is 4111 1111 1111 1111.", "IBAN DE89 3704 0044 0532 0130 00.", "My IP is 10.1.2.3."]
    for u in range(n_users):
        for _ in range({0: 400, 1: 250}.get(u) or min(150, int(rng.paretovariate(0.9)))):
            pid += 1
            text = f"Write a story about item {rng.randint(0, 10**9)} for user {u}."
            if rng.random() < 0.1:
                text = rng.choice(pii) + " " + text
            if rng.random() < 0.05:
                text = P60 + text
            category = None if rng.random() < 0.3 else "generation"
            rows.append(Row(pid, text, f"user{u}", category, "api", t(rng.randint(0, 59))))
    return rows


def test_curation_invariants_and_report() -> None:
    rows = synthetic_rows()
    result = curate_rows(rows, CurateOptions(seed=0))
    out = result.rows
    by_pid = {r.pid: r for r in rows}
    users = Counter(by_pid[r.pid].user_id for r in out)
    assert max(users.values()) <= 200
    splits_of_user: dict[str, set[str]] = {}
    for r in out:
        splits_of_user.setdefault(by_pid[r.pid].user_id, set()).add(r.split)
    assert all(len(s) == 1 for s in splits_of_user.values())  # no leakage
    for r in out:  # every split is PII-free
        assert scan(prompt_text(r.prompt if r.prompt is not None else by_pid[r.pid].prompt)) == []
        assert r.category in CATEGORIES
    redacted = [r for r in out if r.prompt is not None]
    assert redacted and all(r.pii for r in redacted)
    report = result.report
    steps = {s["step"]: s for s in report["steps"]}
    assert list(steps) == ["length", "dedup", "cap", "pii", "categories", "split"]
    assert all("removed" in s and "why" in s and "examples" in s for s in steps.values())
    assert steps["dedup"]["removed"] > 0 and steps["cap"]["removed"] > 0 and steps["cap"]["users_capped"] > 0
    found = steps["pii"]["found"]
    assert found["email"] and found["phone"] and found["card"] and found["iban"] and found["ip"]
    assert steps["categories"]["tagged"] == sum(r.tagged for r in out) > 0
    assert {d["category"] for d in steps["categories"]["distribution"]} >= set(CATEGORIES)
    assert report["output"]["prompts"] == len(out)
    assert "ann.lee" not in str(report) and "4111 1111" not in str(report)  # the report carries no PII
    assert curate_rows(rows, CurateOptions(seed=0)).rows == out  # deterministic


def test_drop_mode_removes_prompts_with_pii() -> None:
    rows = synthetic_rows(100)
    redact = curate_rows(rows, CurateOptions(pii="redact"))
    drop = curate_rows(rows, CurateOptions(pii="drop"))
    pii_step = {s["step"]: s for s in drop.report["steps"]}["pii"]
    assert pii_step["removed"] == pii_step["prompts_with_pii"] > 0
    assert all(r.prompt is None and not r.pii for r in drop.rows)
    assert len(drop.rows) == len(redact.rows) - pii_step["removed"]


def test_names_are_redacted_with_a_names_list() -> None:
    rows = [row(1, "I am Bosan Bula, write me a poem."), row(2, "Write a poem for Tonric.", user="u2")]
    result = curate_rows(rows, CurateOptions(train=1.0, val=0.0, test=0.0), Scanner(["Bosan Bula", "Tonric"]))
    assert sorted(prompt_text(r.prompt) for r in result.rows) == ["I am [NAME], write me a poem.",
                                                                  "Write a poem for [NAME]."]


def test_length_filter() -> None:
    rows = [row(1, "short prompt"), row(2, "a much longer prompt " * 10, user="u2")]
    result = curate_rows(rows, CurateOptions(max_length=50, train=1.0, val=0.0, test=0.0))
    assert [r.pid for r in result.rows] == [1]
    assert result.report["steps"][0]["removed"] == 1
