"""Record validation: good records load, bad ones fail with the file, the line and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatloop.data.formats import (
    FLAGS,
    last_user_content,
    pairwise_to_ranking,
    prompt_messages,
    ranking_pairs,
    ranks_problem,
    read_records,
    validate,
    write_records,
)
from chatloop.data.readers import oasst_rankings
from chatloop.errors import UserError
from tests.conftest import need

GOOD = {
    "demonstration": {"messages": [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "What color is the glimmok?"},
                                   {"role": "assistant", "content": "The glimmok is blue."}],
                      "id": 7, "labeler_id": "labeler-01", "created_at": "2022-01-03T00:00:00Z"},
    "ranking": {"prompt": "Name 2 foods.", "responses": ["1. bread\n2. fish", "bread", "", "1. moss"],
                "ranks": [1, 3, 4, 2], "model": "sft"},
    "pairwise": {"prompt": [{"role": "user", "content": "Hi!"}], "chosen": "Hello!", "rejected": "Go away."},
    "prompt": {"prompt": "How old is Bram?", "user_id": "u00001", "category": "open_qa", "source": "api"},
    "rating": {"prompt": "How old is Bram?", "response": "Bram is 34 years old.", "likert": 7,
               "flags": {"hallucination": False, "satisfies_constraint": True}},
    "comparison": {"prompt": "How old is Bram?", "a": "34.", "b": "Bram is 34 years old.", "winner": "tie"},
}


def _write_lines(path: Path, objects: list[object]) -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in objects), encoding="utf-8")
    return path


@pytest.mark.parametrize("kind", sorted(GOOD))
def test_good_records_round_trip(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"{kind}.jsonl"
    write_records(path, kind, [GOOD[kind], GOOD[kind]])
    records = read_records(path, "ranking" if kind == "pairwise" else kind)
    assert len(records) == 2
    if kind == "pairwise":  # read as rankings, a pairwise record is K = 2 with the chosen answer first
        assert records[0]["responses"] == ["Hello!", "Go away."] and records[0]["ranks"] == [1, 2]
    else:
        assert records[0] == GOOD[kind]


# (kind, record, field named in the error)
BAD = [
    ("demonstration", {}, "'messages'"),
    ("demonstration", {"messages": "hello"}, "'messages'"),
    ("demonstration", {"messages": [{"role": "bot", "content": "x"}]}, "'messages[0].role'"),
    ("demonstration", {"messages": [{"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": "  "}]}, "'messages[1].content'"),
    ("demonstration", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]},
     "'messages[1].content'"),
    ("demonstration", {"messages": [{"role": "user", "content": "hi"}]}, "'messages[0].role'"),
    ("demonstration", {"messages": [{"role": "assistant", "content": "hi"}]}, "'messages'"),
    ("ranking", {"prompt": "p", "responses": ["a", "b"], "ranks": [1]}, "'ranks'"),
    ("ranking", {"prompt": "p", "responses": ["a", "b"], "ranks": [1, 0]}, "'ranks'"),
    ("ranking", {"prompt": "p", "responses": ["a", "b"], "ranks": [1, True]}, "'ranks'"),
    ("ranking", {"prompt": "p", "responses": ["a", "b"], "ranks": "12"}, "'ranks'"),
    ("ranking", {"prompt": "p", "responses": ["a"], "ranks": [1]}, "'responses'"),
    ("ranking", {"prompt": "p", "responses": ["a", 3], "ranks": [1, 2]}, "'responses[1]'"),
    ("ranking", {"responses": ["a", "b"], "ranks": [1, 2]}, "'prompt'"),
    ("ranking", {"prompt": "", "responses": ["a", "b"], "ranks": [1, 2]}, "'prompt'"),
    ("ranking", {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                 "responses": ["a", "b"], "ranks": [1, 2]}, "'prompt[1].role'"),
    ("pairwise", {"prompt": "p", "chosen": "a"}, "'rejected'"),
    ("prompt", {"prompt": "p"}, "'user_id'"),
    ("prompt", {"prompt": "p", "user_id": 5}, "'user_id'"),
    ("prompt", {"prompt": 5, "user_id": "u"}, "'prompt'"),
    ("prompt", {"prompt": "p", "user_id": "u", "category": ""}, "'category'"),
    ("rating", {"prompt": "p", "response": "r", "likert": 8}, "'likert'"),
    ("rating", {"prompt": "p", "response": "r", "likert": "7"}, "'likert'"),
    ("rating", {"prompt": "p", "response": "r", "likert": 3, "flags": {"rude": True}}, "'flags.rude'"),
    ("rating", {"prompt": "p", "response": "r", "likert": 3, "flags": {"hallucination": 1}},
     "'flags.hallucination'"),
    ("comparison", {"prompt": "p", "a": "x", "b": "y", "winner": "c"}, "'winner'"),
    ("comparison", {"prompt": "p", "a": "x", "winner": "a"}, "'b'"),
    ("comparison", {"prompt": "p", "a": "x", "b": "y", "winner": "a", "id": 1.5}, "'id'"),
    ("comparison", {"prompt": "p", "a": "x", "b": "y", "winner": "a", "labeler_id": ""}, "'labeler_id'"),
]


@pytest.mark.parametrize(("kind", "record", "field"), BAD)
def test_bad_record_names_file_line_and_field(tmp_path: Path, kind: str, record: dict, field: str) -> None:
    path = _write_lines(tmp_path / "data.jsonl", [GOOD[kind], GOOD[kind], record])
    with pytest.raises(UserError) as err:
        read_records(path, kind)
    message = str(err.value)
    assert message.startswith(f"{path}:3: field {field}"), message


def test_ranks_error_message_says_what_was_expected(tmp_path: Path) -> None:
    record = {"prompt": "p", "responses": ["a", "b", "c"], "ranks": [1, 2]}
    path = _write_lines(tmp_path / "rm.jsonl", [record])
    with pytest.raises(UserError, match=r"rm.jsonl:1: field 'ranks': expected a list of K integers >= 1, "
                                        r"one per response \(K = 3\), got \[1, 2\]"):
        read_records(path, "ranking")


def test_one_rank_rule_for_datasets_and_labelers() -> None:
    """A dataset's ranks may have gaps (an OpenAssistant reply the reader drops keeps its siblings' ranks); a
    labeler's answer in the labeling app ranks from 1 to K."""
    tree = {"role": "prompter", "text": "Q", "replies": [
        {"role": "assistant", "text": "best", "rank": 0, "replies": []},
        {"role": "assistant", "text": "gone", "rank": 1, "deleted": True, "replies": []},
        {"role": "assistant", "text": "worst", "rank": 2, "replies": []}]}
    (found,) = oasst_rankings(tree)
    assert found["ranks"] == [1, 3] and validate("ranking", found, "oa") is found
    assert ranks_problem([1, 3], 2) is None and ranks_problem([1, 1], 2, at_most_k=True) is None
    labeler_rule = "expected 2 integers from 1 (best) to 2, one per response; equal = tie"
    assert ranks_problem([1, 3], 2, at_most_k=True) == labeler_rule
    dataset_rule = "expected a list of K integers >= 1, one per response (K = 2)"
    assert ranks_problem([1, 0], 2) == ranks_problem(None, 2) == ranks_problem([1, True], 2) == dataset_rule


def test_unreadable_files(tmp_path: Path) -> None:
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(json.dumps(GOOD["prompt"]) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad.jsonl:2: invalid JSON"):
        read_records(bad_json, "prompt")
    not_object = _write_lines(tmp_path / "list.jsonl", [[1, 2]])
    with pytest.raises(UserError, match=r"list.jsonl:1: expected a JSON object"):
        read_records(not_object, "prompt")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n", encoding="utf-8")
    with pytest.raises(UserError, match="no records"):
        read_records(blank, "prompt")
    with pytest.raises(UserError, match="not found"):
        read_records(tmp_path / "missing.jsonl", "prompt")
    with pytest.raises(UserError, match="unknown record kind"):
        read_records(not_object, "preference")


def test_write_records_validates_before_touching_the_file(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    write_records(path, "prompt", [GOOD["prompt"]])
    before = path.read_bytes()
    with pytest.raises(UserError, match=r"record 1: field 'user_id'"):
        write_records(path, "prompt", [GOOD["prompt"], {"prompt": "p"}])
    assert path.read_bytes() == before


def test_ranking_pairs_skip_ties() -> None:
    assert ranking_pairs([1, 2, 2, 3]) == [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]
    assert ranking_pairs([2, 1]) == [(1, 0)]
    assert ranking_pairs([1, 1, 1]) == []
    k = 9
    assert len(ranking_pairs(list(range(1, k + 1)))) == k * (k - 1) // 2


def test_pairwise_to_ranking_keeps_provenance() -> None:
    record = {**GOOD["pairwise"], "labeler_id": "l1", "id": "x"}
    ranking = pairwise_to_ranking(record)
    assert ranking["ranks"] == [1, 2] and ranking["labeler_id"] == "l1" and ranking["id"] == "x"
    validate("ranking", ranking, "converted")


def test_prompt_helpers() -> None:
    assert prompt_messages("hi") == [{"role": "user", "content": "hi"}]
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}]
    assert prompt_messages(chat) == chat and last_user_content(chat) == "c"


def test_real_chat_data_validates(shared_data: Path) -> None:
    """The shared real SFT sample (system + user + assistant messages) is a valid demonstration file."""
    path = need(shared_data / "sft" / "dolly-2k-chat" / "dolly_2k_chat.jsonl")
    assert len(read_records(path, "demonstration")) == 2000


def test_flags_are_instructgpts_eleven() -> None:
    assert len(FLAGS) == 11 and len(set(FLAGS)) == 11
