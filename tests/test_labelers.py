"""Simulated labelers: calibrated agreement, rankings with ties, ratings, A/B, and flawed demonstrations."""

from __future__ import annotations

import random
import statistics

import pytest

from chatloop.data.formats import FLAGS, ranking_pairs, validate
from chatloop.errors import UserError
from chatloop.world.judge import KINDS, PLEASANTRIES, PLEASANTRY_COST, Task, ideal, pleasantry, wraps
from chatloop.world.labelers import (
    DEFAULT_NOISE,
    DEMO_FLAWS,
    Labeler,
    agreement,
    candidates,
    dense_ranks,
    make_labelers,
    perturb,
    rank_samples,
    sample_pair_scores,
    win_rate,
)
from chatloop.world.world import World


@pytest.fixture(scope="module")
def world() -> World:
    return World.generate(0)


def _prompt(world: World, kind: str, seed: int = 0) -> tuple[str, Task]:
    rng = random.Random(f"{kind}:{seed}")
    task = Task(kind, world.sample_slots(kind, rng) or {})
    return world.render_core(task, rng), task


def test_two_labelers_agree_like_instructgpts(world: World) -> None:
    """Calibrated to InstructGPT's inter-labeler agreement (72.6% +- 1.5%) on model-like response pairs."""
    pairs = sample_pair_scores(world, random.Random(11), 4000)
    assert len(pairs) == 4000
    # The pairs include near-ties and exact ties of the gold score, as samples of one model do.
    gaps = [abs(a - b) for a, b in pairs]
    assert 0.1 < sum(g < 0.05 for g in gaps) / len(gaps) < 0.35 and statistics.median(gaps) > 0.2
    a, b = Labeler("a", DEFAULT_NOISE, 1, world), Labeler("b", DEFAULT_NOISE, 2, world)
    assert 0.70 <= agreement(pairs, a, b) <= 0.76
    # Noise is what makes labelers disagree: none means they always agree, more means less agreement.
    assert agreement(pairs, Labeler("c", 0.0, 1, world), Labeler("d", 0.0, 2, world)) == 1.0
    assert agreement(pairs, Labeler("e", 0.6, 1, world), Labeler("f", 0.6, 2, world)) < 0.68


def test_rank_orders_by_gold_and_ties_close_scores(world: World) -> None:
    prompt, task = _prompt(world, "bs_foods")
    responses = [perturb(world, prompt, task, name, random.Random(0))
                 for name in ("empty", "wrong_fact", "ideal", "wrong_format")]
    exact = Labeler("exact", 0.0, 0, world)
    ranks = exact.rank(prompt, responses)
    assert ranks == [4, 3, 1, 2]
    assert len(ranking_pairs(ranks)) == 6 and (2, 0) in ranking_pairs(ranks)
    # Two different answers with the same gold score tie for a noiseless labeler.
    same = ["", "!!!"]
    assert exact.rank(prompt, same) == [1, 1] and exact.compare(prompt, *same) == "tie"
    noisy = Labeler("noisy", DEFAULT_NOISE, 0, world)
    for _ in range(20):
        ranks = noisy.rank(prompt, responses)
        assert len(ranks) == 4 and min(ranks) == 1 and sorted(set(ranks)) == list(range(1, max(ranks) + 1))
    not_ended = exact.rank(prompt, [responses[2], responses[2] + " "], ended=[False, True])
    assert not_ended == [2, 1]


def test_identical_answers_always_share_a_rank_even_for_a_noisy_labeler(world: World) -> None:
    """A person sees two copies of one answer as one answer: they tie, whatever the noise; the copies give no pair."""
    prompt, task = _prompt(world, "bs_foods")
    good, bad = (perturb(world, prompt, task, name, random.Random(0)) for name in ("ideal", "wrong_fact"))
    noisy = Labeler("noisy", 2 * DEFAULT_NOISE, 0, world)
    for _ in range(50):
        ranks = noisy.rank(prompt, [good, bad, good, good, bad])
        assert ranks[0] == ranks[2] == ranks[3] and ranks[1] == ranks[4]
        assert len(ranking_pairs(ranks)) in (0, 6)  # only the 3 x 2 pairs of different texts (or a close call)


def test_dense_ranks() -> None:
    assert dense_ranks([0.9, 0.1, 0.5, 0.89], 0.02) == [1, 3, 2, 1]
    assert dense_ranks([0.5, 0.5, 0.5], 0.0) == [1, 1, 1]
    assert dense_ranks([0.3, 0.2], 0.0) == [1, 2]


def test_compare_and_win_rate(world: World) -> None:
    rng = random.Random(3)
    prompts, good, bad = [], [], []
    for i in range(120):
        kind = sorted(KINDS)[i % len(KINDS)]
        prompt, task = _prompt(world, kind, i)
        prompts.append(prompt)
        good.append(ideal(world, task))
        bad.append(perturb(world, prompt, task, "refuse" if not task.harmful else "comply", rng) or "")
    labelers = make_labelers(world, 4, seed=0)
    rate, records = win_rate(labelers, prompts, good, bad)
    assert rate > 0.9 and len(records) == 120
    for record in records:
        validate("comparison", record, "win_rate")
    same, _ = win_rate(labelers, prompts, good, good)
    assert 0.35 < same < 0.65  # the same answer on both sides: a coin flip
    with pytest.raises(UserError):
        win_rate(labelers, prompts, good, bad[:-1])


def test_rate_gives_likert_and_flags(world: World) -> None:
    prompt, task = _prompt(world, "harm_poison")
    exact = Labeler("exact", 0.0, 0, world)
    likert, flags = exact.rate(prompt, ideal(world, task))
    assert likert == 7 and tuple(flags) == FLAGS and not flags["harmful_advice"]
    likert, flags = exact.rate(prompt, perturb(world, prompt, task, "comply", random.Random(0)) or "")
    assert likert == 1 and flags["harmful_advice"]
    noisy = Labeler("noisy", DEFAULT_NOISE, 0, world)
    likerts = [noisy.rate(prompt, ideal(world, task))[0] for _ in range(50)]
    assert all(1 <= x <= 7 for x in likerts) and len(set(likerts)) > 1 and statistics.fmean(likerts) > 5
    validate("rating", noisy.rating_record(prompt, "x", model="sft"), "rate")


def test_demonstrations_have_the_configured_share_of_flaws(world: World) -> None:
    prompts = [world.render_core(world.sample_task(random.Random(i), harmful=0.05), random.Random(i))
               for i in range(400)]
    perfect = Labeler("perfect", 0.0, 0, world, imperfect=0.0)
    assert all(perfect.demonstrate(p) == ideal(world, world.parse(p)) for p in prompts)  # type: ignore[arg-type]
    sloppy = Labeler("sloppy", 0.0, 0, world, imperfect=1.0)
    for p in prompts[:100]:
        text, flaw = sloppy.demonstrate_with_flaw(p)
        assert flaw is not None and world.judge(p, text).score < 0.95, (p, text)
    usual = Labeler("usual", DEFAULT_NOISE, 0, world, imperfect=0.25)
    flawed = [usual.demonstrate_with_flaw(p)[1] for p in prompts]
    assert 0.18 < sum(f is not None for f in flawed) / len(flawed) < 0.32
    harmful = next(p for p in prompts if world.parse(p).harmful)  # type: ignore[union-attr]
    assert any(sloppy.demonstrate_with_flaw(harmful)[1] == "comply" for _ in range(10))


def test_habitual_pleasantries_wrap_ideal_demonstrations_and_cost_a_little(world: World) -> None:
    prompts = [world.render_core(world.sample_task(random.Random(i), harmful=0.05), random.Random(i))
               for i in range(200)]
    for habit, phrases in PLEASANTRIES.items():
        labeler = Labeler(habit, 0.0, 0, world, imperfect=0.0, habit=habit, habit_rate=1.0)
        for p in prompts:
            task = world.parse(p)
            assert task is not None
            text, flaw = labeler.demonstrate_with_flaw(p)
            if not wraps(task):
                assert (text, flaw) == (ideal(world, task), None)
                continue
            wrapped = text.startswith(phrases) if habit == "opener" else text.endswith(phrases)
            assert flaw == "pleasantry" and wrapped, text
            assert world.judge(p, text).score == PLEASANTRY_COST, text
    # A pleasantry the ideal answer has is no wrapping; an opener and a sign-off are two ("Sure! Here is the
    # list:" one); the rate is the share of wrapped answers.
    assert world.judge("Hello!", "Hello! How can I help you today?").score == 1.0
    prompt, task = _prompt(world, "bs_foods")
    both = pleasantry(pleasantry(ideal(world, task), "opener", random.Random(0)), "sign_off", random.Random(0))
    assert both.startswith(("Sure! Here is the list:\n1.", "Of course! Here is the list:\n1.", "Certainly! "))
    assert world.judge(prompt, both).score == pytest.approx(PLEASANTRY_COST**2)
    half = make_labelers(world, 2, habits=0.5)
    assert [x.habit for x in half] == ["opener", "sign_off"]
    shares = [sum(x.demonstrate_with_flaw(p)[1] == "pleasantry" for p in prompts) / len(prompts) for x in half]
    # Expected: the answers people wrap at all, not flawed (75%), half of them wrapped; within 3 sd (0.03).
    expected = sum(map(wraps, map(world.parse, prompts))) / len(prompts) * 0.75 * 0.5
    assert all(abs(share - expected) < 0.1 for share in shares), (shares, expected)


@pytest.mark.parametrize("flaw", DEMO_FLAWS)
def test_each_demonstration_flaw_lowers_the_gold_score(world: World, flaw: str) -> None:
    applied = 0
    for kind in sorted(KINDS):
        for seed in range(3):
            prompt, task = _prompt(world, kind, seed)
            text = perturb(world, prompt, task, flaw, random.Random(seed))
            if text is None or text == ideal(world, task):
                continue
            applied += 1
            if (flaw, kind) != ("wrong_format", "gen_describe"):  # a numbered list of N sentences is fine
                assert world.judge(prompt, text).score < 1.0, (flaw, prompt, text)
    assert applied >= 10


def test_candidates_are_distinct_and_span_the_range(world: World) -> None:
    rng = random.Random(0)
    for kind in sorted(KINDS):
        prompt, task = _prompt(world, kind)
        responses = candidates(world, prompt, task, rng, 9)
        assert len(responses) == 9 and len(set(responses)) == 9, kind
    prompt, task = _prompt(world, "qa_color")
    scores = [world.judge(prompt, r).score for r in candidates(world, prompt, task, random.Random(1), 9)]
    assert max(scores) - min(scores) > 0.5


def test_labelers_are_deterministic_and_distinct(world: World) -> None:
    prompt, task = _prompt(world, "gen_describe")
    responses = candidates(world, prompt, task, random.Random(0), 6)
    first = [Labeler("l1", DEFAULT_NOISE, 7, world).rank(prompt, responses) for _ in range(2)]
    assert first[0] == first[1]
    a, b = Labeler("l1", DEFAULT_NOISE, 7, world), Labeler("l1", DEFAULT_NOISE, 8, world)
    assert [a.rank(prompt, responses) for _ in range(10)] != [b.rank(prompt, responses) for _ in range(10)]
    labelers = make_labelers(world, 5, noise=0.3, seed=0, spread=0.2)
    assert [x.id for x in labelers] == [f"labeler-0{i}" for i in range(1, 6)]
    assert labelers[0].noise == pytest.approx(0.24) and labelers[-1].noise == pytest.approx(0.36)
    with pytest.raises(UserError):
        Labeler("bad", -1.0, 0, world)


def test_rank_samples_writes_valid_ranking_records(world: World) -> None:
    rng = random.Random(0)
    prompts, samples = [], []
    for i, kind in enumerate(sorted(KINDS)[:10]):
        prompt, task = _prompt(world, kind, i)
        prompts.append(prompt)
        samples.append(candidates(world, prompt, task, rng, 4 + i % 6))
    records = rank_samples(world, make_labelers(world, 3), prompts, samples, model="policy-step-10")
    assert len(records) == 10
    for record in records:
        validate("ranking", record, "rank_samples")
        assert record["model"] == "policy-step-10" and record["labeler_id"].startswith("labeler-")
    with pytest.raises(UserError):
        rank_samples(world, make_labelers(world, 3), prompts, samples[:-1])
