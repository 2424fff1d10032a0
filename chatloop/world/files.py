"""`chatloop world`: write a synthetic world's files (docs/WORLD.md), byte for byte the same for the same seed.

The land and its prompts come from chatloop.world.world, the labels from chatloop.world.labelers.
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from chatloop.data.formats import INSTRUCTGPT_MIX, Prompt, validate
from chatloop.data.pii import luhn_valid
from chatloop.errors import UserError
from chatloop.io import atomic_write_json, atomic_write_jsonl, atomic_write_text, replace_dir
from chatloop.world.judge import KINDS, REFUSAL, Task, ideal
from chatloop.world.labelers import (
    agreement_matrix,
    demonstration_records,
    make_labelers,
    perturb,
    perturbation_records,
)
from chatloop.world.world import (
    _P_ENDS,
    _P_ONSETS,
    _PII_LINES,
    _PREAMBLES,
    _USE_CASES,
    _VOWELS,
    PromptSample,
    World,
)

# The record kind of each JSONL file a world writes (chatloop.data.formats validates them).
RECORD_KINDS = {"prompts.jsonl": "prompt", "eval_prompts.jsonl": "prompt", "redteam_prompts.jsonl": "prompt",
                "redteam_train.jsonl": "prompt",
                "rm_probes.jsonl": "ranking",
                "demonstrations.jsonl": "demonstration", "rankings.jsonl": "ranking",
                "ratings.jsonl": "rating", "comparisons.jsonl": "comparison"}

SOURCES = ("api", "plain", "few_shot", "user_based")

_IMPERATIVES = ("Write", "List", "Name", "Describe", "Suggest", "Rewrite", "Make")
_MAIL_DOMAINS = ("mossmail.com", "postbird.net", "glenpost.org")

def _card_number(rng: random.Random) -> str:
    digits = [4] + [rng.randint(0, 9) for _ in range(14)]
    for check in range(10):
        if luhn_valid("".join(map(str, digits + [check]))):
            digits.append(check)
            break
    text = "".join(map(str, digits))
    return " ".join(text[i : i + 4] for i in range(0, 16, 4))


def _pii_line(world: World, rng: random.Random) -> tuple[str, list[str]]:
    """A line with made-up personal data, and which kinds it has (email, phone, card)."""
    def name() -> str:
        while True:
            n = rng.choice(_P_ONSETS) + rng.choice(_VOWELS) + rng.choice("nrlms") + rng.choice(_P_ENDS)
            if n.lower() not in world.by_lower:
                return n
    first, last = name(), name()
    values = {"first": first, "last": last,
              "email": f"{first.lower()}.{last.lower()}@{rng.choice(_MAIL_DOMAINS)}",
              "phone": f"555-{rng.randint(100, 999)}-{rng.randint(1000, 9999)}", "card": _card_number(rng)}
    line = rng.choice(_PII_LINES)
    return line.format(**values), [k for k in ("email", "phone", "card") if "{" + k + "}" in line]


def _sample_prompt(world: World, rng: random.Random, user: str, source: str, cfg: WorldConfig,
                   decorate: bool, category: str | None = None) -> PromptSample:
    """One prompt as a user (source "api") or a labeler (plain, few_shot, user_based) writes it; of `category`
    if given, else of one drawn from InstructGPT's mix."""
    category = category or rng.choices(list(INSTRUCTGPT_MIX), weights=list(INSTRUCTGPT_MIX.values()))[0]
    if category == "chat":
        messages, task = world.chat_prompt(rng, cfg.harmful)
        sample = PromptSample(messages, task, category, source)
        if decorate and rng.random() < cfg.pii:  # people tell a chat bot who they are, too
            line, sample.pii = _pii_line(world, rng)
            messages[0]["content"] = line + "\n" + messages[0]["content"]
        return sample
    task = world.sample_task(rng, cfg.harmful, category)
    if source == "few_shot" and task.spec.few_shot:
        # A labeler reuses the same examples for a kind: few-shot prompts share long prefixes, like real ones.
        examples_rng = random.Random(f"{world.seed}:few-shot:{user}:{task.kind}")
        return PromptSample(world.few_shot_prompt(task, rng, examples_rng), task, category, source)
    core = world.render_core(task, rng)
    lines: list[str] = []
    sample = PromptSample("", task, category, source)
    if source == "user_based":
        lines.append("Use case: " + rng.choice(_USE_CASES).format(t=rng.choice(world.towns)) + ".")
    if decorate:
        if rng.random() < cfg.shared_prefix:
            lines.append(rng.choice(_PREAMBLES))
            sample.shared_prefix = True
        if rng.random() < cfg.pii:
            line, kinds = _pii_line(world, rng)
            lines.append(line)
            sample.pii = kinds
        roll = rng.random()
        if roll < 0.08:  # users type carelessly; the request is still the same request
            core = core.lower()
        elif roll < 0.16:
            core = core.rstrip(".?!")
        elif roll < 0.20 and core.startswith(_IMPERATIVES):
            core = "Please " + core[0].lower() + core[1:]
    sample.prompt = "\n".join(lines + [core])
    return sample


def _zipf_users(rng: random.Random, n_users: int, exponent: float) -> tuple[list[str], list[float]]:
    ids = [f"u{i:05d}" for i in range(n_users)]
    rng.shuffle(ids)  # the heaviest user is not always u00000
    weights = [1.0 / (rank + 1) ** exponent for rank in range(n_users)]
    return ids, weights


def _timestamps(rng: random.Random, n: int, start: datetime) -> list[str]:
    seconds = sorted(rng.randint(0, 180 * 86400) for _ in range(n))
    return [(start + timedelta(seconds=s)).strftime("%Y-%m-%dT%H:%M:%SZ") for s in seconds]


def _prompt_key(prompt: Prompt) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


# ---------------------------------------------------------------------------------------------------------
# The `chatloop world` command


@dataclass
class WorldConfig:
    out: str = "runs/world"
    """Directory to write the world's files into (replaced as a whole, atomically)."""
    seed: int = 0
    """Seed of everything: the same seed writes the same bytes."""
    entities: int = 64
    """Number of creatures, people and towns (about 47%, 37% and 16%)."""
    pretrain_mb: float = 3.0
    """Size of pretrain.txt in megabytes (10^6 bytes)."""
    val_fraction: float = 0.02
    """Size of pretrain_val.txt relative to pretrain.txt (different documents, same world)."""
    users: int = 300
    """Number of users who send the raw prompts (their prompt counts follow a Zipf law)."""
    user_skew: float = 1.1
    """Zipf exponent of prompts per user: with 1.1 the top users send well over 200 prompts."""
    prompts: int = 10000
    """Number of raw user prompts in prompts.jsonl (with PII, shared prefixes and repeats)."""
    labeler_prompts: float = 0.15
    """Share of prompts.jsonl written by labelers (plain, few-shot and user-based in equal parts)."""
    pii: float = 0.08
    """Share of API prompts with an e-mail address, phone number or (Luhn-valid) card number."""
    shared_prefix: float = 0.1
    """Share of API prompts (other than chats) that start with one of a few long preambles."""
    duplicates: float = 0.04
    """Share of API prompts that repeat one of the same user's earlier prompts exactly."""
    harmful: float = 0.05
    """Share of prompts that ask for harm (the right answer is a polite refusal)."""
    eval_users: int = 40
    """Held-out users for eval_prompts.jsonl (none of them appears anywhere else)."""
    eval_prompts: int = 300
    """Number of held-out prompts (clean, no PII; the training prompts' mix of kinds; new texts where a kind has
    room)."""
    redteam_prompts: int = 90
    """Harmful prompts in redteam_prompts.jsonl, written by red-team users of their own and kept apart from the
    users' prompts (as InstructGPT kept its harm evaluations apart): each of the harmful kinds equally often, on
    texts no training or held-out prompt has where the kind leaves room (the kinds about the land's few towns and
    people repeat some). The evaluation's harmless share is measured on them and on the held-out users'
    harmful prompts."""
    redteam_train: int = 150
    """Harmful prompts in redteam_train.jsonl, written by the labelers (as InstructGPT's wrote prompts) for the
    rankings (`chatloop run --redteam_rankings`): the harmful kinds in turn, on texts the held-out sets do not
    have where the kind leaves room."""
    probes: int = 90
    """Pairs of each group in rm_probes.jsonl, where the better answer is known (the RM diagnostic): the refusal
    over a compliant answer to a red-team prompt, and the ideal answer over the refusal to a harmless held-out
    prompt."""
    demonstrations: int = 3000
    """Number of labeler demonstrations (SFT data) in demonstrations.jsonl."""
    imperfect: float = 0.25
    """Share of demonstrations with a flaw (wrong fact, wrong count, rambling, format, a refusal of a harmless
    request, compliance with a harmful one)."""
    habits: float = 0.8
    """Share of a labeler's otherwise ideal demonstrations that it wraps in its habitual pleasantry (half the
    labelers open with "Sure!", half sign off with "I hope this helps!"); the land's users mark each such
    pleasantry down (x0.7, the judge's PLEASANTRY_COST), so the rankings ask for what the demonstrations lack."""
    rankings: int = 300
    """Number of prompts in rankings.jsonl, each with K perturbed answers ranked by a labeler."""
    ratings: int = 200
    """Number of records in ratings.jsonl (Likert + flags) and in comparisons.jsonl (A/B)."""
    k_min: int = 4
    """Fewest responses per ranking (InstructGPT: 4)."""
    k_max: int = 9
    """Most responses per ranking (InstructGPT: 9)."""
    labelers: int = 8
    """Number of simulated labelers."""
    noise: float = 0.3
    """Standard deviation of a labeler's Gaussian noise on the gold score; 0.3 gives ~73% agreement."""
    noise_spread: float = 0.2
    """Labelers' noise levels spread evenly over noise * (1 +- noise_spread)."""
    tie_threshold: float = 0.02
    """Two responses whose noisy scores differ by less than this are ranked as a tie."""
    agreement_pairs: int = 4000
    """Response pairs sampled to measure inter-labeler agreement for stats."""
    stats: bool = False
    """Print the prompt mix, user distribution, PII share and labeler agreement after writing."""


def _check_config(cfg: WorldConfig) -> None:
    def need(ok: bool, flag: str, expected: str, value: Any) -> None:
        if not ok:
            raise UserError(f"--{flag}: expected {expected}, got {value!r}")

    need(12 <= cfg.entities <= 2000, "entities", "12 to 2000", cfg.entities)
    need(0 < cfg.pretrain_mb <= 1000, "pretrain_mb", "a size in (0, 1000]", cfg.pretrain_mb)
    need(0 <= cfg.val_fraction <= 1, "val_fraction", "a fraction in [0, 1]", cfg.val_fraction)
    for name in ("users", "prompts"):
        need(getattr(cfg, name) >= 1, name, "at least 1", getattr(cfg, name))
    for name in ("eval_prompts", "redteam_prompts", "redteam_train", "probes", "demonstrations", "rankings", "ratings",
                 "agreement_pairs"):
        need(getattr(cfg, name) >= 0, name, "0 or more", getattr(cfg, name))
    need(cfg.eval_users >= 1 or cfg.eval_prompts == 0, "eval_users", "at least 1", cfg.eval_users)
    for name in ("labeler_prompts", "pii", "shared_prefix", "duplicates", "harmful", "imperfect", "habits",
                 "noise_spread"):
        need(0 <= getattr(cfg, name) <= 1, name, "a fraction in [0, 1]", getattr(cfg, name))
    need(cfg.user_skew >= 0, "user_skew", "a number >= 0", cfg.user_skew)
    need(2 <= cfg.k_min <= cfg.k_max <= 9, "k_min/--k_max", "2 <= k_min <= k_max <= 9",
         (cfg.k_min, cfg.k_max))
    need(cfg.labelers >= 2, "labelers", "at least 2", cfg.labelers)
    need(cfg.noise >= 0, "noise", "a number >= 0", cfg.noise)
    need(cfg.tie_threshold >= 0, "tie_threshold", "a number >= 0", cfg.tie_threshold)


def _record(sample: PromptSample, user: str, pid: str, created: str) -> dict[str, Any]:
    return {"id": pid, "prompt": sample.prompt, "user_id": user, "category": sample.category,
            "source": sample.source, "created_at": created}


def build_world_files(cfg: WorldConfig, world: World) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every file's content (name -> text or records) and the stats, without touching the disk."""
    files: dict[str, Any] = {}
    seed = cfg.seed
    pre_rng = random.Random(f"chatloop-world:{seed}:pretrain")
    val_rng = random.Random(f"chatloop-world:{seed}:pretrain-val")
    n_bytes = int(cfg.pretrain_mb * 1e6)
    files["pretrain.txt"], n_docs = world.pretraining_text(n_bytes, pre_rng)
    n_val = max(1, int(n_bytes * cfg.val_fraction))
    files["pretrain_val.txt"], n_val_docs = world.pretraining_text(n_val, val_rng)

    # Raw prompts of the users (and of labelers who write prompts too).
    rng = random.Random(f"chatloop-world:{seed}:prompts")
    labelers = make_labelers(world, cfg.labelers, cfg.noise, seed, cfg.noise_spread, cfg.imperfect,
                             cfg.tie_threshold, cfg.habits)
    user_ids, weights = _zipf_users(rng, cfg.users, cfg.user_skew)
    history: dict[str, list[PromptSample]] = {}
    samples: list[tuple[str, PromptSample]] = []
    for _ in range(cfg.prompts):
        if rng.random() < cfg.labeler_prompts:
            user = rng.choice(labelers).id
            source = rng.choice(SOURCES[1:])
        else:
            user = rng.choices(user_ids, weights=weights)[0]
            source = "api"
        earlier = history.get(user)
        if source == "api" and earlier and rng.random() < cfg.duplicates:
            sample = replace(rng.choice(earlier), duplicate=True)
        else:
            sample = _sample_prompt(world, rng, user, source, cfg, decorate=source == "api")
        history.setdefault(user, []).append(sample)
        samples.append((user, sample))
    start = datetime(2022, 1, 3, tzinfo=timezone.utc)
    times = _timestamps(rng, len(samples), start)
    files["prompts.jsonl"] = [_record(s, u, f"p{i:06d}", t)
                              for i, ((u, s), t) in enumerate(zip(samples, times))]
    train_keys = {_prompt_key(s.prompt) for _, s in samples}

    # Held-out users' prompts: clean, and asking for what users ask (the same mix of kinds as the training
    # prompts). Where a kind leaves room, the text is a new one (no training prompt's, no earlier eval prompt's);
    # a kind with few texts ("Hi!", a story about one of 30 creatures) keeps a text that training has too, since
    # dropping it would leave the kinds a tiny model finds easy out of the evaluation.
    eval_rng = random.Random(f"chatloop-world:{seed}:eval")
    eval_users = [f"u{cfg.users + i:05d}" for i in range(cfg.eval_users)]
    eval_records, eval_samples = [], []
    eval_times = _timestamps(eval_rng, cfg.eval_prompts, start + timedelta(days=180))
    for i in range(cfg.eval_prompts):
        user = eval_rng.choice(eval_users)
        sample = _sample_prompt(world, eval_rng, user, "api", cfg, decorate=False)
        for _ in range(200):
            if _prompt_key(sample.prompt) not in train_keys:
                break
            other = _sample_prompt(world, eval_rng, user, "api", cfg, decorate=False, category=sample.category)
            if other.task.kind == sample.task.kind:
                sample = other
        train_keys.add(_prompt_key(sample.prompt))
        eval_samples.append(sample)
        eval_records.append(_record(sample, user, f"e{i:05d}", eval_times[i]))
    files["eval_prompts.jsonl"] = eval_records
    eval_keys = {_prompt_key(r["prompt"]) for r in eval_records}
    files["redteam_prompts.jsonl"], redteam = _redteam_prompts(cfg, world, train_keys, start + timedelta(days=180),
                                                               cfg.redteam_prompts, "redteam",
                                                               [f"r{i:05d}" for i in range(10)])
    held_out_keys = eval_keys | {_prompt_key(s.prompt) for s in redteam}
    files["redteam_train.jsonl"], _ = _redteam_prompts(cfg, world, held_out_keys, start, cfg.redteam_train,
                                                       "redteam-train", [lab.id for lab in labelers])
    files["rm_probes.jsonl"] = _rm_probes(cfg, world, redteam, eval_samples)

    # Demonstrations on fresh, curated prompts (no PII) of training users and labelers.
    demo_rng = random.Random(f"chatloop-world:{seed}:demos")
    demo_prompts: list[PromptSample] = []
    while len(demo_prompts) < cfg.demonstrations:
        source = demo_rng.choices(SOURCES, weights=(0.4, 0.3, 0.15, 0.15))[0]
        api = source == "api"
        user = demo_rng.choices(user_ids, weights=weights)[0] if api else demo_rng.choice(labelers).id
        sample = _sample_prompt(world, demo_rng, user, source, cfg, decorate=False)
        if _prompt_key(sample.prompt) not in eval_keys:
            demo_prompts.append(sample)
    files["demonstrations.jsonl"], demo_stats = demonstration_records(world, labelers, demo_prompts, demo_rng)

    lab_rng = random.Random(f"chatloop-world:{seed}:labels")
    rank_prompts = [_sample_prompt(world, lab_rng, "labeling", "plain", cfg, decorate=False)
                    for _ in range(cfg.rankings + 2 * cfg.ratings)]
    rankings, ratings, comparisons = perturbation_records(
        world, labelers, rank_prompts, lab_rng, cfg.rankings, cfg.ratings, cfg.k_min, cfg.k_max)
    files["rankings.jsonl"], files["ratings.jsonl"] = rankings, ratings
    files["comparisons.jsonl"] = comparisons

    agree_rng = random.Random(f"chatloop-world:{seed}:agree")
    agree = agreement_matrix(world, labelers, cfg.agreement_pairs, agree_rng, reference_noise=cfg.noise)
    files["world.json"] = {**world.to_json(), "config": {k: v for k, v in asdict(cfg).items()
                                                         if k not in ("out", "stats")}}
    stats = _stats(cfg, world, files, samples, eval_users, demo_stats, agree, n_docs, n_val_docs)
    files["stats.json"] = stats
    return files, stats


def _redteam_prompts(cfg: WorldConfig, world: World, taken: set[str], start: datetime, count: int, stream: str,
                     users: list[str]) -> tuple[list[dict[str, Any]], list[PromptSample]]:
    """A red-team set of `count` prompts by `users`: the harmful kinds in turn, each prompt a text `taken` does not
    have where 200 draws find one (`taken` grows); its own random stream, so the other files do not change with
    its size."""
    rng = random.Random(f"chatloop-world:{cfg.seed}:{stream}")
    kinds = sorted(k for k, spec in KINDS.items() if spec.harmful)
    records, samples = [], []
    times = _timestamps(rng, count, start)
    prefix = "r" if stream == "redteam" else "t"
    for i in range(count):
        kind = kinds[i % len(kinds)]
        for _ in range(200):
            slots = world.sample_slots(kind, rng)
            if slots is None:
                continue
            task = Task(kind, slots)
            sample = PromptSample(world.render_core(task, rng), task, KINDS[kind].category, "api")
            if _prompt_key(sample.prompt) not in taken:
                break
        taken.add(_prompt_key(sample.prompt))
        samples.append(sample)
        records.append(_record(sample, users[i % len(users)], f"{prefix}{i:05d}", times[i]))
    return records, samples


def _rm_probes(cfg: WorldConfig, world: World, redteam: list[PromptSample], held_out: list[PromptSample]
               ) -> list[dict[str, Any]]:
    """Pairs whose better answer is known: the refusal over a compliant answer to each red-team prompt, the ideal
    answer over the refusal to each harmless held-out prompt (the first `probes` of each)."""
    rng = random.Random(f"chatloop-world:{cfg.seed}:probes")
    probes = []
    for s in redteam[: cfg.probes]:
        probes.append({"prompt": s.prompt, "responses": [REFUSAL, perturb(world, s.prompt, s.task, "comply", rng)],
                       "ranks": [1, 2], "group": "harmful: refusal over compliance"})
    for s in [s for s in held_out if not s.task.harmful][: cfg.probes]:
        probes.append({"prompt": s.prompt, "responses": [ideal(world, s.task), REFUSAL], "ranks": [1, 2],
                       "group": "harmless: answer over refusal"})
    return probes


def _stats(cfg: WorldConfig, world: World, files: dict[str, Any], samples: list[tuple[str, PromptSample]],
           eval_users: list[str], demo_stats: dict[str, Any], agree: dict[str, Any], n_docs: int,
           n_val_docs: int) -> dict[str, Any]:
    n = len(samples)
    per_user = Counter(u for u, _ in samples)
    api = [(u, s) for u, s in samples if s.source == "api"]
    api_users = Counter(u for u, _ in api)
    categories = Counter(s.category for _, s in samples)
    pii_kinds = Counter(k for _, s in samples for k in s.pii)
    rankings = files["rankings.jsonl"]
    kinds = Counter(e.kind for e in world.entities.values())
    return {
        "seed": cfg.seed,
        "entities": {"creature": kinds["creature"], "person": kinds["person"], "town": kinds["town"]},
        "pretrain": {"bytes": len(files["pretrain.txt"].encode()), "documents": n_docs,
                     "val_bytes": len(files["pretrain_val.txt"].encode()), "val_documents": n_val_docs,
                     "distinct_words": len(set(world.words(files["pretrain.txt"][:2_000_000])))},
        "prompts": {
            "count": n, "users": len(per_user), "api_users": len(api_users),
            "max_per_user": max(per_user.values()), "median_per_user": statistics.median(per_user.values()),
            "users_over_200": sum(c > 200 for c in per_user.values()),
            "pii_share": round(sum(bool(s.pii) for _, s in samples) / n, 4),
            "pii_share_api": round(sum(bool(s.pii) for _, s in api) / max(1, len(api)), 4),
            "pii_kinds": dict(sorted(pii_kinds.items())),
            "shared_prefix_share": round(sum(s.shared_prefix for _, s in samples) / n, 4),
            "duplicate_share": round(sum(s.duplicate for _, s in samples) / n, 4),
            "harmful_share": round(sum(s.task.harmful for _, s in samples) / n, 4),
            "sources": {src: round(sum(s.source == src for _, s in samples) / n, 4) for src in SOURCES},
            "categories": {c: round(categories[c] / n, 4) for c in INSTRUCTGPT_MIX},
            "instructgpt_categories": {c: round(v / 100, 4) for c, v in INSTRUCTGPT_MIX.items()},
        },
        "eval_prompts": {"count": len(files["eval_prompts.jsonl"]), "users": len(eval_users)},
        "redteam_prompts": len(files["redteam_prompts.jsonl"]),
        "demonstrations": demo_stats,
        "rankings": {"count": len(rankings),
                     "mean_k": round(sum(len(r["responses"]) for r in rankings) / max(1, len(rankings)), 2)},
        "labelers": agree,
    }


def format_stats(stats: dict[str, Any]) -> str:
    p, d, lab, pre = stats["prompts"], stats["demonstrations"], stats["labelers"], stats["pretrain"]
    ev = stats["eval_prompts"]
    e = stats["entities"]
    lines = [
        f"world (seed {stats['seed']}): {e['creature']} creatures, {e['person']} people, {e['town']} towns",
        f"pretrain.txt: {pre['bytes'] / 1e6:.2f} MB in {pre['documents']} documents, "
        f"{pre['distinct_words']} distinct words; pretrain_val.txt: {pre['val_bytes'] / 1e6:.3f} MB",
        f"prompts.jsonl: {p['count']} prompts from {p['users']} users "
        f"({p['api_users']} API users + labelers)",
        f"  prompts per user: max {p['max_per_user']}, median {p['median_per_user']:g}, "
        f"users over 200: {p['users_over_200']}",
        f"  PII: {p['pii_share']:.1%} of prompts ({p['pii_share_api']:.1%} of API prompts) {p['pii_kinds']}",
        "  shared long prefix: "
        f"{p['shared_prefix_share']:.1%}; exact repeats: {p['duplicate_share']:.1%}; "
        f"harmful: {p['harmful_share']:.1%}",
        "  sources: " + ", ".join(f"{k} {v:.1%}" for k, v in p["sources"].items()),
        f"  {'category':<16}{'world':>8}{'InstructGPT':>13}",
    ]
    for c, share in p["categories"].items():
        lines.append(f"  {c:<16}{share:>8.1%}{p['instructgpt_categories'][c]:>13.1%}")
    lines += [
        f"eval_prompts.jsonl: {ev['count']} prompts of {ev['users']} held-out users; redteam_prompts.jsonl: "
        f"{stats['redteam_prompts']} harmful prompts of red-team users",
        f"demonstrations.jsonl: {d['count']} ({d['imperfect_share']:.1%} imperfect, {d['pleasantry_share']:.1%} "
        f"wrapped in a pleasantry); gold score mean {d['mean_score']:.3f} (ideal {d['mean_score_ideal']:.3f}, "
        f"wrapped {d['mean_score_pleasantry']:.3f}, imperfect {d['mean_score_imperfect']:.3f})",
        f"rankings.jsonl: {stats['rankings']['count']} prompts, mean K {stats['rankings']['mean_k']}",
        f"labelers: {lab['count']}, noise {min(lab['noise']):.3f}-{max(lab['noise']):.3f}; "
        + (f"agreement on {lab['pairs']} pairs: two labelers at noise {lab['reference_noise']:g}: "
           f"{lab['agreement_reference']:.1%}; "
           f"mean over labeler pairs {lab['agreement_mean']:.1%} (InstructGPT: 72.6% +- 1.5%)"
           if lab["pairs"] else "agreement not measured (--agreement_pairs 0)"),
    ]
    return "\n".join(lines)


def write_world(cfg: WorldConfig) -> None:
    """Generate the world of `cfg.seed` and write its files into `cfg.out`, all or nothing."""
    _check_config(cfg)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "world.json").is_file():
        raise UserError(f"--out: {out} is a non-empty directory without world.json; refusing to replace it")
    world = World.generate(cfg.seed, cfg.entities)
    files, stats = build_world_files(cfg, world)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        tmp.chmod(0o755)  # mkdtemp's private 0700 would otherwise stay on the finished world
        for name, content in files.items():
            if name.endswith(".jsonl"):
                kind = RECORD_KINDS[name]
                for i, record in enumerate(content):
                    validate(kind, record, f"{name}: record {i}")
                atomic_write_jsonl(tmp / name, content)
            elif name.endswith(".json"):
                atomic_write_json(tmp / name, content)
            else:
                atomic_write_text(tmp / name, content)
            (tmp / name).chmod(0o644)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if cfg.stats:
        print(format_stats(stats))
