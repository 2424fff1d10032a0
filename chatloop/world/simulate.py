"""The synthetic world through the labeling app: simulated labelers take the path people take.

Each simulated labeler (chatloop.world.labelers.Labeler) gets an account (an accepted invite whose password nobody
can use), asks the store for work, answers what it is shown (in the shown order, from the prompt and the
texts alone, as a person would) and submits. A simulated admin reviews screening demonstrations with the
gold judge's Likert score. Screening tests are made from the world: perturbed answers whose gold answer is
the judge's.

    chatloop label batch --kind ranking --data screen.jsonl --screening ranking=0.7   # or screening_items()
    chatloop label simulate --world runs/w --candidates 10                            # applicants take it
    chatloop label simulate --world runs/w --labelers 8                               # the production work
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from chatloop.data.formats import FLAGS
from chatloop.errors import UserError
from chatloop.labeling.schema import KINDS
from chatloop.labeling.store import DEFAULT_DB, LabelStore, NotFound
from chatloop.world.labelers import Labeler, candidate_pool, candidates, dense_ranks, make_labelers
from chatloop.world.world import World

UNUSABLE_HASH = "!simulated"  # not an argon2 hash: no password logs in to a simulated labeler's account


def enroll(store: LabelStore, names: list[str], actor: str = "simulate") -> dict[str, Any]:
    """An account for every name (kept if it exists); name -> the user row the store's calls take."""
    users = {}
    for name in names:
        user = store.user_by_name(name)
        if user is None:
            store.accept_invite(store.create_invite(name, "labeler", actor), UNUSABLE_HASH)
            user = store.user_by_name(name)
        users[name] = user
    return users


def answer(labeler: Labeler, view: dict[str, Any]) -> dict[str, Any]:
    """The labeler's answer to an assignment as shown (the JSON API's answer object, in the shown order)."""
    prompt, kind = view["prompt"], view["kind"]
    if kind == "ranking":
        return {"ranks": labeler.rank(prompt, view["responses"])}
    if kind == "comparison":
        return {"winner": labeler.compare(prompt, view["a"], view["b"])}
    if kind == "rating":
        likert, flags = labeler.rate(prompt, view["response"])
        return {"likert": likert, "flags": [name for name, on in flags.items() if on]}
    return {"answer": labeler.demonstrate(prompt) or "I do not know."}


def work(store: LabelStore, team: list[tuple[Labeler, Any]], batch_id: str | None = None, limit: int = 0
         ) -> list[dict[str, Any]]:
    """The team labels in turns (one task each per turn) until nobody gets more work (or each has done
    `limit`); returns what each answered: {"labeler", "assignment", "answer"} (shown order)."""
    done: list[dict[str, Any]] = []
    counts = {labeler.id: 0 for labeler, _ in team}
    active = list(team)
    while active:
        for labeler, user in list(active):
            aid = store.next_assignment(user, batch_id)
            if aid is None or (limit and counts[labeler.id] >= limit):
                active.remove((labeler, user))
                continue
            given = answer(labeler, store.assignment(user, aid))
            store.submit(user, aid, given)
            counts[labeler.id] += 1
            done.append({"labeler": labeler.id, "assignment": aid, "answer": given})
    return done


def review_demonstrations(store: LabelStore, world: World, actor: str = "simulated-admin") -> int:
    """Score every screening demonstration awaiting review with the judge's Likert; returns how many."""
    reviewed = 0
    for item in store.pending_reviews():
        messages = item["messages"]
        first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")  # the answer to the prompt
        try:
            store.review(item["label_id"], world.judge(messages[:first], messages[first]["content"]).likert, actor)
        except NotFound:
            continue
        reviewed += 1
    return reviewed


def screening_items(world: World, kind: str, n: int, seed: int = 0, k: int = 4) -> list[dict[str, Any]]:
    """n task records of a screening test with the judge's answers as gold: rankings of k perturbed answers,
    A/B pairs, ratings (Likert and flags) or prompts to answer (demonstrations, reviewed by an admin)."""
    if kind not in KINDS:
        raise UserError(f"--kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    rng = random.Random(f"chatloop-screening:{seed}:{kind}")
    records = []
    while len(records) < n:
        task = world.sample_task(rng, harmful=0.1)
        prompt = world.render_core(task, rng)
        record: dict[str, Any] = {"prompt": prompt, "id": f"screen-{kind}-{len(records) + 1:03d}"}
        if kind == "ranking":
            responses = candidates(world, prompt, task, rng, k)
            gold = dense_ranks([world.judge(prompt, r).score for r in responses], 1e-9)
            if len(set(gold)) < 2:
                continue  # nothing to order: no test
            record.update(responses=responses, gold={"ranks": gold})
        elif kind == "comparison":
            a, b = candidates(world, prompt, task, rng, 2)
            sa, sb = world.judge(prompt, a).score, world.judge(prompt, b).score
            record.update(a=a, b=b, gold={"winner": "a" if sa > sb else "b" if sb > sa else "tie"})
        elif kind == "rating":
            (response,) = candidates(world, prompt, task, rng, 1)
            verdict = world.judge(prompt, response)
            record.update(response=response, gold={"likert": verdict.likert,
                                                   "flags": [f for f in FLAGS if verdict.flags[f]]})
        records.append(record)
    return records


@dataclass
class SimulateConfig:
    world: str = ""
    """The world directory whose gold judge the simulated labelers perceive through noise."""
    labelers: int = 8
    """Simulated labelers "labeler-01".. (make_labelers: noise calibrated to ~73% agreement)."""
    noise: float = 0.3
    """The labelers' mean noise level."""
    candidates: int = 0
    """Instead of labelers: this many applicants "candidate-01".. (candidate_pool), `too_noisy` of them far
    noisier, so a screening test turns some away."""
    too_noisy: int = 3
    """Applicants among `candidates` with far too much noise."""
    batch: str = ""
    """Work on this batch only (default: whatever each labeler is given next)."""
    limit: int = 0
    """Labels per labeler at most (0: until nothing is left for them)."""
    review: bool = True
    """Also review the screening demonstrations awaiting an admin, with the judge's Likert score."""
    seed: int = 0
    """Seed of the labelers' noise."""
    db: str = DEFAULT_DB
    """The labeling database (URL or SQLite path)."""
    secret_file: str = "runs/label.secret"
    """Server secret file (see `chatloop label serve --help`)."""


def simulate(cfg: SimulateConfig) -> list[dict[str, Any]]:
    """Simulated labelers (or applicants) work the label database's open batches through the store."""
    from chatloop.labeling.commands import cli_actor, open_store, screening_lines

    if not cfg.world:
        raise UserError("--world: the world directory (chatloop world) is required")
    world = World.load(cfg.world)
    store = open_store(cfg.db, cfg.secret_file)
    pool = (candidate_pool(world, cfg.candidates, cfg.too_noisy, cfg.noise, seed=cfg.seed) if cfg.candidates
            else make_labelers(world, cfg.labelers, cfg.noise, seed=cfg.seed))
    users = enroll(store, [x.id for x in pool], cli_actor())
    done = work(store, [(x, users[x.id]) for x in pool], cfg.batch or None, cfg.limit)
    reviewed = review_demonstrations(store, world) if cfg.review else 0
    if reviewed:  # a decision can wait for a review: the candidates who took every task are decided now
        done += work(store, [(x, users[x.id]) for x in pool], cfg.batch or None, cfg.limit)
    print(f"label simulate: {len(pool)} simulated {'applicants' if cfg.candidates else 'labelers'} gave "
          f"{len(done)} labels" + (f"; {reviewed} demonstrations reviewed" if reviewed else ""))
    for line in screening_lines(store.screening_report()):
        print(line)
    return done
