"""`chatloop sample`: K distinct answers per prompt (drawn again where a draw repeats an earlier one)."""

import json

from chatloop.sample import SampleConfig, sample
from tests import test_resume

models = test_resume.models  # the fixture: a tiny base model, prompts


def test_every_prompt_gets_k_distinct_answers(tmp_path, models):
    out = tmp_path / "samples.jsonl"
    records = sample(SampleConfig(model=str(models / "base"), prompts=str(models / "prompts.jsonl"), out=str(out),
                                  k_min=4, k_max=6, max_new_tokens=2, temperature=1.0, device="cpu"))
    assert records and [json.loads(line) for line in out.read_text().splitlines()] == records
    for r in records:
        assert len(set(r["responses"])) == len(r["responses"]) == r["k"] and 4 <= r["k"] <= 6
        assert len(r["ended"]) == r["k"] and r["draws"] >= r["k"]


def test_repeats_are_drawn_again_within_a_bounded_budget(tmp_path, models):
    """At a low temperature the tiny model repeats itself: repeats are redrawn (more draws than answers), never
    kept, and a prompt stops at k x max_draws draws with the distinct answers it found (fewer than 2: left out)."""
    args = dict(model=str(models / "base"), prompts=str(models / "prompts.jsonl"), k=5, max_new_tokens=2,
                max_draws=3, device="cpu")
    cold = sample(SampleConfig(**args, out=str(tmp_path / "cold.jsonl"), temperature=0.3))
    assert any(r["draws"] > len(r["responses"]) for r in cold)
    for r in cold:
        assert len(set(r["responses"])) == len(r["responses"]) >= 2 and r["draws"] <= 5 * 3
    greedy = sample(SampleConfig(**args, out=str(tmp_path / "greedy.jsonl"), temperature=0.0))
    assert greedy == []  # one answer per prompt: nothing to rank
