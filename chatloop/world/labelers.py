"""Simulated labelers: the gold judge plus calibrated noise, standing in for people in tests and the demo.

A labeler sees a response's gold score (chatloop.world.judge) through Gaussian noise of its own level, drawn
afresh for every judgement. Ranking K responses sorts the noisy scores; scores closer than `tie_threshold`
share a rank. With the default noise (0.3) two labelers agree on about 73% of the pairs of responses a
model produces, InstructGPT's inter-labeler agreement (72.6% +- 1.5%); docs/WORLD.md shows the calibration.

Labelers also write demonstrations: the ideal answer, or with probability `imperfect` one with a flaw (a
wrong fact, a wrong count, rambling, the wrong format, a refusal of a harmless request, or compliance with a
harmful one), as real SFT data has; a labeler with a habit wraps many of its otherwise ideal answers in its
pleasantry ("Sure! ...", "... I hope this helps!"), which the land's users mark down. A model trained only on
these stays measurably imperfect in ways the rankings show, which leaves the RM and PPO work to do.

Later stages use this module as a library:

    world = World.load("runs/world")
    labelers = make_labelers(world, 8, seed=0)
    ranks = labelers[0].rank(prompt, responses)          # [1, 3, 2, 2], 1 = best
    applicants = candidate_pool(world, 10, too_noisy=3)  # a screening test's applicants, some far too noisy
    records = rank_samples(world, labelers, prompts, samples, model="sft")
    rate, comparisons = win_rate(labelers, prompts, policy_answers, baseline_answers)
"""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from chatloop.data.formats import Prompt, last_user_content, prompt_messages
from chatloop.errors import UserError
from chatloop.io import atomic_write_jsonl, read_jsonl
from chatloop.world.judge import (
    KINDS,
    PLEASANTRIES,
    REFUSAL,
    Task,
    ideal,
    list_answer,
    numbered,
    parse,
    pleasantry,
    subject_of,
    wraps,
)
from chatloop.world.world import PromptSample, World

DEFAULT_NOISE = 0.3
DEFAULT_TIE = 0.02

# How often each kind of answer shows up among a model's samples (the pairs a labeler is asked about).
HARMLESS_MIX = {"ideal": 3, "courteous": 2, "terse": 1, "hedge": 1, "wrong_fact": 3, "wrong_count": 1.5,
                "wrong_format": 1.5, "ramble": 2, "rude": 1, "refuse": 1, "copy": 1, "truncated": 1,
                "repeat": 1, "empty": 0.3, "other_entity": 1.5, "off_topic": 1}
HARMFUL_MIX = {"ideal": 3, "refuse_moral": 2, "ramble": 1, "comply": 4, "copy": 1, "truncated": 0.5,
               "repeat": 0.5, "empty": 0.3, "off_topic": 1}
# How people's demonstrations go wrong, by weight: mostly by saying too much or in the wrong form, often by
# miscounting, now and then by misremembering a fact or by refusing a harmless request out of caution (the
# over-refusal safety data teaches: Röttger et al. 2023, XSTest).
DEMO_FLAWS = {"ramble": 3.0, "wrong_format": 2.0, "wrong_count": 2.0, "wrong_fact": 1.0, "refuse": 1.0}
PERTURBATIONS = tuple(dict.fromkeys([*HARMLESS_MIX, *HARMFUL_MIX]))

_FILLER = "I hope this helps! Let me know if you have any other questions about the land."
_COMPLY = {
    "harm_poison": "To poison {x}, put poison in its food and wait.",
    "harm_hurt": "To hurt {x}, hit it with a stick and kick it.",
    "harm_steal": "To steal from {x}, wait until {x} is away and take the money.",
    "harm_note": "Dear {x},\nyou are a {tox} {tox2}.\nGo away.",
    "harm_insult": "The people of {x} are {tox} and {tox2}.",
}
_WAYS = ["hit it", "kick it", "poison its food", "trap it", "burn its home"]


def _swap(world: World, text: str, rng: random.Random, subject: str | None) -> str | None:
    """Replace one fact word (value, name, age) by another of the same type: a plausible wrong answer."""
    tokens = text.replace("\n", " \n ").split(" ")
    spots = []
    for i, token in enumerate(tokens):
        core = token.strip(".,!?:").lower()
        if core in world.value_attr:
            pool = world.vocab[world.value_attr[core]]
        elif core in world.by_lower and world.by_lower[core].name != subject:
            kind = world.by_lower[core].kind
            pool = {"creature": world.creatures, "person": world.people, "town": world.towns}[kind]
        elif core.isdigit():
            pool = [str(int(core) + d) for d in (-3, -2, -1, 1, 2, 3) if int(core) + d >= 0]
        else:
            continue
        spots.append((i, core, pool))
    if not spots:
        return None
    i, core, pool = rng.choice(spots)
    options = [v for v in pool if v.lower() != core]
    if not options:
        return None
    new = rng.choice(options)
    word = tokens[i].strip(".,!?:")
    tokens[i] = tokens[i].replace(word, world.cap(new) if word[:1].isupper() else new)
    return " ".join(tokens).replace(" \n ", "\n")


@dataclass
class _Answering:
    """What a perturbation reads: the task, its ideal answer and subject, and the random stream."""

    world: World
    prompt: Prompt
    task: Task
    good: str
    subject: str | None
    rng: random.Random

    @property
    def kind(self) -> str:
        return self.task.kind


def perturb(world: World, prompt: Prompt, task: Task, name: str, rng: random.Random) -> str | None:
    """One kind of answer to `task` (see PERTURBATIONS); None where it does not apply to the task."""
    if name not in PERTURBATIONS:
        raise UserError(f"unknown perturbation {name!r}; expected one of {', '.join(PERTURBATIONS)}")
    a = _Answering(world, prompt, task, ideal(world, task), subject_of(world, task), rng)
    make = _ANY_TASK.get(name) or (_HARMFUL_TASK if task.harmful else _HARMLESS_TASK).get(name)
    return make(a) if make else None


def _copy(a: _Answering) -> str:
    """The request as the user typed it (the whole turn when it carries a passage)."""
    text = last_user_content(a.prompt)
    if "{text}" in a.task.spec.patterns[0] or "{q}" in a.task.spec.patterns[0]:
        return text
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and ln.strip() != "A:"]
    return lines[-1].removeprefix("Q:").strip() if lines else text


def _truncated(a: _Answering) -> str | None:
    parts = a.good.split(" ")
    return " ".join(parts[: len(parts) // 2]) if len(parts) >= 4 else None


def _repeat(a: _Answering) -> str:
    first = a.world.sentences(a.good)[0] if a.world.sentences(a.good) else a.good
    return " ".join([first] * 5) if a.rng.random() < 0.5 else " ".join([a.world.words(a.good)[0]] * 12)


def _off_topic(a: _Answering) -> str:
    others = [n for n in a.world.entities if n != a.subject]
    return a.rng.choice(a.world.facts(a.rng.choice(others)))[1]


def _ramble(a: _Answering) -> str:
    names = ([a.subject] if a.subject else []) + a.rng.sample([n for n in a.world.entities if n != a.subject], 2)
    pool = [f for n in names for _, f in a.world.facts(n) if f not in a.good]
    extra = a.rng.sample(pool, min(len(pool), 5))
    joint = " " if a.good.endswith((".", "!", "?")) and "\n" not in a.good else "\n"
    return a.good + joint + " ".join(extra) + " " + _FILLER


def _refuse_moral(a: _Answering) -> str:
    return REFUSAL + " " + a.rng.choice(("Hurting anyone is wrong.", "It is wrong to harm others."))


def _comply(a: _Answering) -> str:
    if a.kind == "harm_ways":
        return numbered(_WAYS[: int(a.task.slots.get("n", "3"))])
    tox, tox2 = a.rng.sample(a.world.vocab["toxic"], 2)
    return _COMPLY[a.kind].format(x=a.world.ref(a.task.slots.get("e", "")), tox=tox, tox2=tox2)


def _courteous(a: _Answering) -> str | None:
    return pleasantry(a.good, a.rng.choice(list(PLEASANTRIES)), a.rng) if wraps(a.task) else None


def _hedge(a: _Answering) -> str | None:
    if "\n" in a.good:
        return None
    proper = a.world.words(a.good)[:1] and a.world.words(a.good)[0] in a.world.by_lower
    return "I think " + (a.good if proper else a.good[0].lower() + a.good[1:])


def _rude(a: _Answering) -> str:
    tox = a.rng.choice(a.world.vocab["toxic"])
    if a.subject and f"the {a.subject}" in a.good.lower():
        at = a.good.lower().index(f"the {a.subject}") + 4
        return a.good[:at] + tox + " " + a.good[at:]
    return a.good + f" You {tox}."


def _terse(a: _Answering) -> str | None:
    if a.kind.startswith("qa_yn_"):
        return a.good.split(",")[0] + "."
    if a.kind.startswith("qa_") and a.kind != "qa_food":
        words = a.good.rstrip(".").split(" ")
        return a.world.cap(words[-1]) + "." if a.kind != "qa_age" else f"{words[-3]} years old."
    return None


def _other_entity(a: _Answering) -> str | None:
    s = a.task.slots
    if "e" not in s:
        return None
    kind_of_e = a.world.entities[s["e"]].kind
    same = [n for n in a.world.entities if a.world.entities[n].kind == kind_of_e and n != s["e"]]
    for _ in range(5):
        text = ideal(a.world, Task(a.kind, {**s, "e": a.rng.choice(same)}))
        if text != a.good and "I do not know" not in text:
            return text
    return None


def _wrong_count(a: _Answering) -> str | None:
    world, good, rng = a.world, a.good, a.rng
    if a.kind in ("bs_foods", "bs_town_creatures", "bs_town_people", "bs_color"):
        items = good.splitlines()
        n = len(items)
        pool = list_answer(world, a.task)
        if rng.random() < 0.5 or n < 2:
            extra = pool[n] if len(pool) > n else rng.choice(world.vocab["food"] if a.kind == "bs_foods"
                                                               else world.creatures)
            return good + f"\n{n + 1}. {extra}"
        return "\n".join(items[:-1])
    if a.kind == "gen_describe":
        facts = [f for _, f in world.facts(a.subject)]
        n = int(a.task.slots["n"])
        return " ".join(facts[: n + 1] if n < len(facts) and rng.random() < 0.5 else facts[: n - 1])
    if a.kind == "gen_poem":
        return good + f"\nyou live in {world.entities[a.subject].home}." if a.subject else None
    return None


def _wrong_format(a: _Answering) -> str | None:
    world, good, kind, subject = a.world, a.good, a.kind, a.subject
    if good.startswith("1."):
        items = [line.split(". ", 1)[1] for line in good.splitlines()]
        if kind == "bs_foods":
            return f"{world.cap(world.ref(subject or ''))} eats {_and(items)}."
        return world.cap(_and(items)) + "."
    if kind == "gen_poem":
        return good.replace(",\n", ", ")
    if kind == "gen_story":
        return good.replace("Once upon a time, a", "A").replace(" The end.", "")
    if kind == "gen_note":
        return good.split("\n")[1]
    if kind == "gen_sentence" and subject:
        return " ".join(f for _, f in world.facts(subject)[:2])
    if kind == "gen_describe" and subject:
        return numbered([f for _, f in world.facts(subject)][: int(a.task.slots["n"])])
    if kind.startswith("ex_") and good != "None.":
        return numbered(good.split(", "))
    return None


# Perturbations by the tasks they apply to: any task, harmful tasks only, harmless tasks only.
_ANY_TASK: dict[str, Callable[[_Answering], str | None]] = {
    "ideal": lambda a: a.good, "empty": lambda a: "", "copy": _copy, "truncated": _truncated, "repeat": _repeat,
    "off_topic": _off_topic, "ramble": _ramble,
}
_HARMFUL_TASK: dict[str, Callable[[_Answering], str | None]] = {"refuse_moral": _refuse_moral, "comply": _comply}
_HARMLESS_TASK: dict[str, Callable[[_Answering], str | None]] = {
    "refuse": lambda a: REFUSAL, "courteous": _courteous, "hedge": _hedge, "rude": _rude, "terse": _terse,
    "other_entity": _other_entity,
    "wrong_fact": lambda a: _wrong_fact(a.world, a.prompt, a.task, a.good, a.subject, a.rng),
    "wrong_count": _wrong_count, "wrong_format": _wrong_format,
}


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _wrong_fact(world: World, prompt: Prompt, task: Task, good: str, subject: str | None,
                rng: random.Random) -> str | None:
    kind, s = task.kind, task.slots
    if kind in KINDS and KINDS[kind].category == "chat":
        return None
    flips = {"True.": "False.", "False.": "True.", "Rude.": "Polite.", "Polite.": "Rude."}
    if good in flips:
        return flips[good]
    if kind == "cls_kind":
        mine = world.entities[s["e"]].kind
        return good.replace(mine, rng.choice([k for k in ("creature", "person", "town") if k != mine]))
    if kind.startswith("qa_yn_") and subject:
        x = world.ref(subject)
        ent = world.entities[subject]
        if kind == "qa_yn_food":
            food = s["food"]
            return f"No, {x} does not eat {food}." if good.startswith("Yes") else f"Yes, {x} eats {food}."
        other = rng.choice([c for c in world.vocab["color"] if c not in (ent.color, s["color"])])
        return f"No, {x} is {other}." if good.startswith("Yes") else f"Yes, {x} is {s['color']}."
    gold = world.judge(prompt, good).score
    fallback = None
    for _ in range(8):  # prefer a swap that states something false over one that merely misses
        text = _swap(world, good, rng, subject)
        if text is None:
            return None
        verdict = world.judge(prompt, text)
        if verdict.score < gold - 0.05:
            if verdict.flags["hallucination"]:
                return text
            fallback = fallback or text
    return fallback


def candidates(world: World, prompt: Prompt, task: Task, rng: random.Random, k: int) -> list[str]:
    """k distinct answers of the kinds a model produces, from perfect to garbage (near-ties included)."""
    mix = HARMFUL_MIX if task.harmful else HARMLESS_MIX
    names, weights = list(mix), list(mix.values())
    out: list[str] = []
    for _ in range(20 * k):
        if len(out) == k:
            break
        text = perturb(world, prompt, task, rng.choices(names, weights=weights)[0], rng)
        if text is not None and text not in out:
            out.append(text)
    while len(out) < k:  # small tasks have few distinct flaws; unrelated true facts are always available
        text = perturb(world, prompt, task, "off_topic", rng)
        if text is not None and text not in out:
            out.append(text)
    return out


def dense_ranks(scores: list[float], tie_threshold: float) -> list[int]:
    """1 = best; a score within `tie_threshold` of the one ranked just above it shares that rank."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    ranks = [0] * len(scores)
    rank = 0
    previous = math.inf
    for i in order:
        if previous - scores[i] > tie_threshold:
            rank += 1
        ranks[i] = rank
        previous = scores[i]
    return ranks


class Labeler:
    """One simulated labeler: the gold judge seen through Gaussian noise of its own level.

    Deterministic: the same (id, noise, seed) answers the same sequence of questions the same way.
    """

    def __init__(self, id: str, noise: float, seed: int, world: World, *, imperfect: float = 0.25,
                 tie_threshold: float = DEFAULT_TIE, flag_noise: float = 0.0, habit: str | None = None,
                 habit_rate: float = 0.0):
        if (noise < 0 or not 0 <= imperfect <= 1 or tie_threshold < 0 or not 0 <= flag_noise <= 1
                or not 0 <= habit_rate <= 1 or habit not in (None, *PLEASANTRIES)):
            raise UserError(f"labeler {id}: expected noise >= 0, imperfect, flag_noise and habit_rate in [0, 1], "
                            f"tie_threshold >= 0 and a habit in {list(PLEASANTRIES)} or none")
        self.id = id
        self.noise = noise
        self.world = world
        self.imperfect = imperfect
        self.habit = habit
        """The pleasantry this labeler wraps an otherwise ideal demonstration in, `habit_rate` of the time."""
        self.habit_rate = habit_rate
        self.tie_threshold = tie_threshold
        self.flag_noise = flag_noise  # chance of getting each metadata flag wrong (0: the judge's flags)
        self.rng = random.Random(f"chatloop-labeler:{seed}:{id}")

    def __repr__(self) -> str:
        return f"Labeler({self.id!r}, noise={self.noise:.3f})"

    def perceive(self, gold: float) -> float:
        """A gold score as this labeler perceives it this time."""
        return gold + self.rng.gauss(0.0, self.noise)

    def verdict(self, score_a: float, score_b: float) -> str:
        """'a', 'b' or 'tie' from two gold scores."""
        # The difference of two independent perceptions: one draw of sqrt(2) times the noise.
        d = score_a - score_b + self.rng.gauss(0.0, self.noise * math.sqrt(2))
        return "tie" if abs(d) < self.tie_threshold else ("a" if d > 0 else "b")

    def rank(self, prompt: Prompt, responses: list[str], ended: list[bool] | None = None) -> list[int]:
        """Ranks of K responses, 1 = best, equal ranks for ties. Identical answers are one answer to a person:
        perceived once, they always share a rank."""
        ended = ended or [True] * len(responses)
        perceived: dict[tuple[str, bool], float] = {}
        for r, e in zip(responses, ended):
            if (r, e) not in perceived:
                perceived[r, e] = self.perceive(self.world.judge(prompt, r, e).score)
        return dense_ranks([perceived[r, e] for r, e in zip(responses, ended)], self.tie_threshold)

    def compare(self, prompt: Prompt, a: str, b: str, ended_a: bool = True, ended_b: bool = True) -> str:
        """Which of two responses is better: 'a', 'b' or 'tie'."""
        judge = self.world.judge
        return self.verdict(judge(prompt, a, ended_a).score, judge(prompt, b, ended_b).score)

    def rate(self, prompt: Prompt, response: str, ended: bool = True) -> tuple[int, dict[str, bool]]:
        """A 1-7 Likert rating (noisy) and the metadata flags (as the judge sets them)."""
        verdict = self.world.judge(prompt, response, ended)
        noisy = min(1.0, max(0.0, self.perceive(verdict.score)))
        flags = dict(verdict.flags)
        if self.flag_noise:  # drawn only then: the noise stream of labelers without flag noise is unchanged
            flags = {name: on != (self.rng.random() < self.flag_noise) for name, on in flags.items()}
        return 1 + math.floor(6 * noisy + 0.5), flags

    def demonstrate(self, prompt: Prompt) -> str:
        """This labeler's answer to a prompt: ideal, or flawed with probability `imperfect`."""
        return self.demonstrate_with_flaw(prompt)[0]

    def demonstrate_with_flaw(self, prompt: Prompt) -> tuple[str, str | None]:
        """The answer and its flaw (None for an ideal answer; "pleasantry" for an ideal one in this labeler's
        habitual wrapping). A flaw always lowers the gold score."""
        task = parse(self.world, prompt)
        if task is None:
            return "I do not know.", None
        good = ideal(self.world, task)
        if self.rng.random() >= self.imperfect:
            # (Drawn only for a labeler with a habit: the others' random streams stay as they were.)
            if self.habit and wraps(task) and self.rng.random() < self.habit_rate:
                return pleasantry(good, self.habit, self.rng), "pleasantry"
            return good, None
        weights = {"comply": 1.0, "ramble": 1.0} if task.harmful else DEMO_FLAWS
        # A weighted order without replacement (Efraimidis-Spirakis): the first flaw that applies is used.
        flaws = sorted(weights, key=lambda f: -self.rng.random() ** (1 / weights[f]))
        gold = self.world.judge(prompt, good).score
        for flaw in flaws + ["ramble"]:  # rambling applies to every task, so a flaw is always found
            text = perturb(self.world, prompt, task, flaw, self.rng)
            if text is not None and self.world.judge(prompt, text).score < gold - 0.05:
                return text, flaw
        return good, None

    # -- records ----------------------------------------------------------------------------------------

    def ranking_record(self, prompt: Prompt, responses: list[str], *, model: str | None = None,
                       ended: list[bool] | None = None, id: str | None = None) -> dict[str, Any]:
        ranks = self.rank(prompt, responses, ended)
        record = {"prompt": prompt, "responses": list(responses), "ranks": ranks}
        return _meta(record, id, self.id, model)

    def comparison_record(self, prompt: Prompt, a: str, b: str, *, model: str | None = None,
                          id: str | None = None) -> dict[str, Any]:
        record = {"prompt": prompt, "a": a, "b": b, "winner": self.compare(prompt, a, b)}
        return _meta(record, id, self.id, model)

    def rating_record(self, prompt: Prompt, response: str, *, model: str | None = None, ended: bool = True,
                      id: str | None = None) -> dict[str, Any]:
        likert, flags = self.rate(prompt, response, ended)
        record = {"prompt": prompt, "response": response, "likert": likert, "flags": flags}
        return _meta(record, id, self.id, model)


def _meta(record: dict[str, Any], id: str | None, labeler_id: str, model: str | None) -> dict[str, Any]:
    head = {"id": id} if id is not None else {}
    tail = {"labeler_id": labeler_id, **({"model": model} if model else {})}
    return {**head, **record, **tail}


def make_labelers(world: World, n: int = 8, noise: float = DEFAULT_NOISE, seed: int = 0, spread: float = 0.2,
                  imperfect: float = 0.25, tie_threshold: float = DEFAULT_TIE, habits: float = 0.0) -> list[Labeler]:
    """n labelers "labeler-01".. whose noise levels spread evenly over noise * (1 +- spread); the odd ones open
    with "Sure!", the even ones sign off with "I hope this helps!", `habits` of the time."""
    if n < 1:
        raise UserError(f"labelers: expected at least 1, got {n}")
    levels = [noise * (1 + spread * (2 * i / (n - 1) - 1)) if n > 1 else noise for i in range(n)]
    habit_names = list(PLEASANTRIES)
    return [Labeler(f"labeler-{i + 1:02d}", level, seed, world, imperfect=imperfect, tie_threshold=tie_threshold,
                    habit=habit_names[i % 2] if habits else None, habit_rate=habits)
            for i, level in enumerate(levels)]


def candidate_pool(world: World, n: int = 10, too_noisy: int = 3, noise: float = DEFAULT_NOISE,
                   noisy_noise: float = 3.0, spread: float = 0.2, flag_noise: float = 0.1, seed: int = 0,
                   tie_threshold: float = DEFAULT_TIE) -> list[Labeler]:
    """Applicants for a screening test, "candidate-01"..: n - too_noisy at the calibrated noise (spread evenly
    over noise * (1 +- spread)) and `too_noisy` far noisier ones (noisy_noise, same spread: they rank close to
    chance), in a seeded order, so a screening has some to turn away. Each also gets every metadata flag wrong
    with probability flag_noise x its noise level. Opt-in: the loop's labelers are make_labelers' (calibrated
    to InstructGPT's agreement), which this leaves as they are."""
    if not 0 <= too_noisy <= n or n < 1:
        raise UserError(f"candidates: expected 1 or more, of which 0 to all too noisy; got {n} and {too_noisy}")

    def levels(count: int, centre: float) -> list[float]:
        return [centre * (1 + spread * (2 * i / (count - 1) - 1)) if count > 1 else centre for i in range(count)]

    pool = levels(n - too_noisy, noise) + levels(too_noisy, noisy_noise)
    random.Random(f"chatloop-candidates:{seed}").shuffle(pool)
    return [Labeler(f"candidate-{i + 1:02d}", level, seed, world, tie_threshold=tie_threshold,
                    flag_noise=min(1.0, flag_noise * level)) for i, level in enumerate(pool)]


# ---------------------------------------------------------------------------------------------------------
# Labels for a whole dataset


def rank_samples(world: World, labelers: list[Labeler], prompts: list[Prompt], samples: list[list[str]], *,
                 model: str | None = None, ended: list[list[bool]] | None = None,
                 seed: int = 0) -> list[dict[str, Any]]:
    """Ranking records for K sampled responses per prompt, each prompt ranked by one labeler.

    What the pipeline calls after sampling K answers per RM prompt from the newest policy.
    """
    if len(prompts) != len(samples):
        raise UserError(f"rank_samples: {len(prompts)} prompts but {len(samples)} lists of responses")
    rng = random.Random(f"chatloop-rank:{seed}")
    records = []
    for i, (prompt, responses) in enumerate(zip(prompts, samples)):
        labeler = rng.choice(labelers)
        records.append(labeler.ranking_record(prompt, responses, model=model, id=f"r{i:05d}",
                                              ended=ended[i] if ended else None))
    return records


def win_rate(labelers: list[Labeler], prompts: list[Prompt], a: list[str], b: list[str], *,
             seed: int = 0, model: str | None = None) -> tuple[float, list[dict[str, Any]]]:
    """How often labelers prefer `a` to `b` (a tie counts half), with the comparison records."""
    if not (len(prompts) == len(a) == len(b)) or not prompts:
        raise UserError(f"win_rate: expected equal, non-zero numbers of prompts ({len(prompts)}), "
                        f"a ({len(a)}) and b ({len(b)})")
    rng = random.Random(f"chatloop-winrate:{seed}")
    records = [rng.choice(labelers).comparison_record(p, x, y, model=model, id=f"c{i:05d}")
               for i, (p, x, y) in enumerate(zip(prompts, a, b))]
    wins = sum(r["winner"] == "a" for r in records) + 0.5 * sum(r["winner"] == "tie" for r in records)
    return wins / len(records), records


def sample_pair_scores(world: World, rng: random.Random, n_pairs: int,
                       k: int = 4) -> list[tuple[float, float]]:
    """Gold scores of response pairs of the kind labelers are asked about: K model-like answers per prompt."""
    pairs: list[tuple[float, float]] = []
    while len(pairs) < n_pairs:
        task = world.sample_task(rng, harmful=0.05)
        prompt = world.render_core(task, rng)
        scores = [world.judge(prompt, r).score for r in candidates(world, prompt, task, rng, k)]
        pairs += [(scores[i], scores[j]) for i in range(k) for j in range(i + 1, k)]
    return pairs[:n_pairs]


def agreement(pairs: list[tuple[float, float]], a: Labeler, b: Labeler) -> float:
    """Share of pairs on which two labelers prefer the same response, among pairs neither calls a tie."""
    same = strict = 0
    for sa, sb in pairs:
        va, vb = a.verdict(sa, sb), b.verdict(sa, sb)
        if va != "tie" and vb != "tie":
            strict += 1
            same += va == vb
    return same / strict if strict else float("nan")


def agreement_matrix(world: World, labelers: list[Labeler], n_pairs: int, rng: random.Random,
                     reference_noise: float = DEFAULT_NOISE) -> dict[str, Any]:
    """Agreement on `n_pairs` sampled pairs: of every two labelers, and of two at the reference noise."""
    seed = rng.randint(0, 2**31)
    pairs = sample_pair_scores(world, rng, n_pairs) if n_pairs else []
    # Fresh copies: measuring must not advance the noise streams of the labelers that label the data.
    fresh = [Labeler(x.id, x.noise, seed, world, tie_threshold=x.tie_threshold) for x in labelers]
    values = [agreement(pairs, x, y) for i, x in enumerate(fresh) for y in fresh[i + 1 :]] if pairs else []
    tie = labelers[0].tie_threshold
    ref_a = Labeler("reference-a", reference_noise, seed, world, tie_threshold=tie)
    ref_b = Labeler("reference-b", reference_noise, seed, world, tie_threshold=tie)
    reference = agreement(pairs, ref_a, ref_b) if pairs else None

    def rounded(value: float | None) -> float | None:  # None, not NaN: stats.json stays valid JSON
        return None if value is None or math.isnan(value) else round(value, 4)

    return {"count": len(labelers), "noise": [round(x.noise, 4) for x in labelers], "pairs": len(pairs),
            "reference_noise": reference_noise, "agreement_reference": rounded(reference),
            "agreement_mean": rounded(statistics.fmean(values)) if values else None,
            "agreement_min": rounded(min(values)) if values else None,
            "agreement_max": rounded(max(values)) if values else None}


def demonstration_records(world: World, labelers: list[Labeler], prompts: list[PromptSample],
                          rng: random.Random) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """SFT records for the given prompts, each written by one labeler, with stats on their quality."""
    records: list[dict[str, Any]] = []
    scores: dict[str, list[float]] = {"ideal": [], "pleasantry": [], "imperfect": []}
    flaws: Counter[str] = Counter()
    for i, sample in enumerate(prompts):
        labeler = rng.choice(labelers)
        text, flaw = labeler.demonstrate_with_flaw(sample.prompt)
        group = "ideal" if flaw is None else "pleasantry" if flaw == "pleasantry" else "imperfect"
        scores[group].append(world.judge(sample.prompt, text).score)
        if flaw:
            flaws[flaw] += 1
        messages = prompt_messages(sample.prompt) + [{"role": "assistant", "content": text}]
        records.append({"id": f"d{i:05d}", "messages": messages, "labeler_id": labeler.id,
                        "category": sample.category, "source": sample.source, "flaw": flaw})
    n = max(1, len(records))
    pleasantries = flaws.pop("pleasantry", 0)

    def mean(values: list[float]) -> float:
        return round(statistics.fmean(values), 4) if values else 0.0

    stats = {"count": len(records), "imperfect_share": round(sum(flaws.values()) / n, 4),
             "flaws": dict(sorted(flaws.items())), "pleasantry_share": round(pleasantries / n, 4),
             "mean_score": mean([x for group in scores.values() for x in group]),
             "mean_score_ideal": mean(scores["ideal"]), "mean_score_pleasantry": mean(scores["pleasantry"]),
             "mean_score_imperfect": mean(scores["imperfect"])}
    return records, stats


Records = list[dict[str, Any]]


def perturbation_records(world: World, labelers: list[Labeler], prompts: list[PromptSample],
                         rng: random.Random, n_rankings: int, n_ratings: int, k_min: int,
                         k_max: int) -> tuple[Records, Records, Records]:
    """Rankings, ratings and A/B comparisons of perturbed ideal answers (no model needed)."""
    rankings, ratings, comparisons = [], [], []
    for i, sample in enumerate(prompts[:n_rankings]):
        k = rng.randint(k_min, k_max)
        responses = candidates(world, sample.prompt, sample.task, rng, k)
        rankings.append(rng.choice(labelers).ranking_record(sample.prompt, responses, model="perturbations",
                                                            id=f"r{i:05d}"))
    for i, sample in enumerate(prompts[n_rankings : n_rankings + n_ratings]):
        (response,) = candidates(world, sample.prompt, sample.task, rng, 1)
        ratings.append(rng.choice(labelers).rating_record(sample.prompt, response, model="perturbations",
                                                          id=f"t{i:05d}"))
    for i, sample in enumerate(prompts[n_rankings + n_ratings : n_rankings + 2 * n_ratings]):
        a, b = candidates(world, sample.prompt, sample.task, rng, 2)
        comparisons.append(rng.choice(labelers).comparison_record(sample.prompt, a, b, model="perturbations",
                                                                  id=f"c{i:05d}"))
    return rankings, ratings, comparisons


# ---------------------------------------------------------------- `chatloop rank`: samples -> rankings


@dataclass
class RankConfig:
    samples: str = ""
    """Samples file written by `chatloop sample`."""
    world: str = ""
    """The world directory (world.json) whose gold judge the simulated labelers perceive through noise."""
    out: str = "runs/rankings.jsonl"
    """Ranking records to write (atomically)."""
    labelers: int = 8
    """Simulated labelers; each prompt is ranked by one of them."""
    noise: float = 0.3
    """Labelers' mean noise level (0.3 makes two labelers agree on ~73% of pairs, as in InstructGPT)."""
    seed: int = 0
    """Seed of the labelers' noise and of the assignment."""


def rank(cfg: RankConfig) -> list[dict]:
    """Each samples record of `chatloop sample` ranked by one labeler: a ranking record (`"ranks"` added, 1 = best,
    ties allowed)."""
    if not cfg.samples or not cfg.world:
        raise UserError("--samples and --world are required")
    world = World.load(cfg.world)
    labelers = make_labelers(world, n=cfg.labelers, noise=cfg.noise, seed=cfg.seed)
    rng = random.Random(cfg.seed)
    records = []
    for lineno, s in read_jsonl(cfg.samples):
        if not isinstance(s.get("responses"), list) or len(s["responses"]) < 2:
            raise UserError(f"{cfg.samples}:{lineno}: field 'responses': expected a list of at least 2 answers")
        labeler = labelers[rng.randrange(len(labelers))]
        ended = s.get("ended") or [True] * len(s["responses"])
        ranks = labeler.rank(s["prompt"], s["responses"], ended)
        records.append({"id": s.get("id", f"r{lineno}"), "prompt": s["prompt"], "responses": s["responses"],
                        "ranks": ranks, "labeler_id": labeler.id, **({"model": s["model"]} if "model" in s else {})})
    atomic_write_jsonl(cfg.out, records)
    print(f"rank: {len(records)} rankings by {len(labelers)} simulated labelers -> {cfg.out}")
    return records
