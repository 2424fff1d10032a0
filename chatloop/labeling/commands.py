"""`chatloop label serve | batch | invite | export | stats | plan`: run the app and administer it.

Every verb opens the same database (`--db`, SQLite by default, any SQLAlchemy URL) with the same secret
(`--secret_file`, generated on first use; or $CHATLOOP_LABEL_SECRET). Admin actions on the command line are
written to the audit log with the actor `cli:$USER`.
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatloop.data.formats import validate_prompt_value, write_records
from chatloop.errors import UserError
from chatloop.io import atomic_write_json, atomic_write_jsonl, read_jsonl, replace_dir, sha256_file, temp_dir_beside
from chatloop.labeling.answers import K_MAX, task_item
from chatloop.labeling.reports import export_records, plan, report
from chatloop.labeling.schema import KINDS
from chatloop.labeling.secret import load_secret
from chatloop.labeling.store import DEFAULT_DB, LabelStore

DEFAULT_SECRET = "runs/label.secret"


def open_store(db: str, secret_file: str) -> LabelStore:
    return LabelStore(db, load_secret(secret_file))


def cli_actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


@dataclass
class LabelServeConfig:
    db: str = DEFAULT_DB
    """The labeling database: an SQLAlchemy URL (sqlite:///runs/label.db, postgresql://...) or an SQLite path."""
    secret_file: str = DEFAULT_SECRET
    """Server secret (HMAC of sessions, invites, CSRF tokens); generated with mode 0600 if missing. An empty,
    default or short secret is refused. $CHATLOOP_LABEL_SECRET overrides the file."""
    host: str = "127.0.0.1"
    """Address to listen on (put a TLS-terminating proxy in front for anything but localhost)."""
    port: int = 8080
    """Port to listen on."""
    secure_cookies: bool = False
    """Mark cookies Secure (browsers then send them over HTTPS only): set it when served over HTTPS."""
    root_path: str = ""
    """URL prefix when a proxy serves the app under a path (e.g. /label)."""
    proxy_headers: bool = False
    """Trust X-Forwarded-For/-Proto from `forwarded_allow_ips` (client addresses for the login rate limit)."""
    forwarded_allow_ips: str = "127.0.0.1"
    """Proxy addresses whose X-Forwarded-* headers are trusted (comma-separated)."""
    lease_minutes: float = 30.0
    """How long a labeler holds a task; an expired lease returns the task to the queue."""
    login_limit: int = 5
    """Failed logins per name within login_window_s before further attempts get 429 (4x per client address)."""
    login_window_s: float = 300.0
    """Window of the login rate limit, in seconds."""
    public_url: str = ""
    """Where people reach the app, e.g. https://label.example.org (invite links start with it; never taken
    from a request's Host header). Empty: the admin page shows invite links as paths."""
    max_body_bytes: int = 1_000_000
    """Largest request body read (413 beyond; a longer streamed body is cut off at this size)."""
    max_hashes: int = 2
    """Password hashes computed at once (argon2: 64 MiB each); further logins wait briefly, then get 429."""


def serve(cfg: LabelServeConfig) -> None:
    import uvicorn

    from chatloop.labeling.app import create_app

    for name in ("login_limit", "max_body_bytes", "max_hashes"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name}: expected a positive integer, got {getattr(cfg, name)}")
    if cfg.public_url and not cfg.public_url.startswith(("http://", "https://")):
        raise UserError(f"--public_url: expected an http:// or https:// address, got {cfg.public_url!r}")
    store = open_store(cfg.db, cfg.secret_file)
    app = create_app(store, secure_cookies=cfg.secure_cookies, lease_s=cfg.lease_minutes * 60,
                     login_limit=cfg.login_limit, login_window_s=cfg.login_window_s, public_url=cfg.public_url,
                     max_body_bytes=cfg.max_body_bytes, max_hashes=cfg.max_hashes)
    print(f"label: serving {store.db} on http://{cfg.host}:{cfg.port}{cfg.root_path}/")
    uvicorn.run(app, host=cfg.host, port=cfg.port, root_path=cfg.root_path, proxy_headers=cfg.proxy_headers,
                forwarded_allow_ips=cfg.forwarded_allow_ips, log_level="warning")


@dataclass
class BatchConfig:
    kind: str = "ranking"
    """Job of every task: demonstration, ranking, rating or comparison."""
    name: str = ""
    """Batch name shown to labelers (default: kind and source)."""
    data: str = ""
    """JSONL tasks: {"prompt"} (demonstration), {"prompt", "responses"} (ranking), {"prompt", "response"}
    (rating), {"prompt", "a", "b"} (comparison); optional "user_id" (author), "model", "gold", "id"."""
    prompts: str = ""
    """Prompt records (JSONL) for demonstrations, or to sample from --model for rankings/comparisons."""
    store: str = ""
    """A prompt store (chatloop prompts; URL or SQLite path) to take the prompts from instead of --prompts."""
    split: str = "train"
    """With --store: the split of the latest curation (train, val, test); all raw prompts if never curated."""
    model: list[str] = field(default_factory=list)
    """Checkpoint(s) to sample answers from: one for a ranking batch (K answers per prompt), two for an A/B
    comparison batch (one answer each; identities hidden, order randomised per labeler)."""
    k: int = 4
    """Answers per prompt for a sampled ranking batch (InstructGPT: 4..9); 0 draws K from k_min..k_max."""
    k_min: int = 4
    """Smallest K when --k=0."""
    k_max: int = 9
    """Largest K when --k=0."""
    limit: int = 0
    """Use only the first N prompts or tasks (0: all)."""
    max_new_tokens: int = 64
    """Answer length budget when sampling."""
    temperature: float = 1.0
    """Sampling temperature."""
    seed: int = 0
    """Seed of the sampler."""
    overlap: int = 1
    """Labelers per task (each task goes to this many distinct labelers; 2+ measures agreement)."""
    instructions: str = ""
    """Instructions shown above every task of the batch."""
    db: str = DEFAULT_DB
    """The labeling database (URL or SQLite path)."""
    secret_file: str = DEFAULT_SECRET
    """Server secret file (see `chatloop label serve --help`)."""
    samples_out: str = ""
    """Where to keep the sampled answers (default: beside the database, runs/label-samples-<batch>.jsonl)."""
    compare: list[str] = field(default_factory=list)
    """Checkpoints to compare blind on --prompts/--store (one answer of each per prompt): two make an A/B
    batch, three to nine a ranking batch. Which model is A is drawn per prompt, the shown order per labeler,
    and the model names stay on the server (the export's `models`, for `chatloop eval --human`)."""
    screening: list[str] = field(default_factory=list)
    """Make the batch a screening (qualification) test: METRIC=THRESHOLD pass thresholds for its job, ranking=0.7
    (share of gold's ordered pairs ordered alike), comparison=0.8 (right winners), likert=0.8 (within 1 of gold)
    and flags=0.75 (flag agreement) for ratings, demonstration=6 (mean admin review, 1-7). Labelers see other
    batches only after passing every active screening batch; every task needs a gold answer (demonstrations:
    an admin reviews them)."""


def _prompt_records(cfg: BatchConfig) -> tuple[list[dict[str, Any]], str]:
    if cfg.store:
        from chatloop.data.prompts import PromptStore

        store = PromptStore(cfg.store, create=False)
        curation = store.latest_curation()
        if curation is None:
            records = [{"prompt": r.prompt, "user_id": r.user_id, "id": f"prompt-{r.pid}"} for r in store.load_rows()]
        else:
            records = store.curated_records(curation).get(cfg.split, [])
        source = f"{store.db} ({f'curation {curation} {cfg.split}' if curation else 'raw'})"
    elif cfg.prompts:
        records, source = [], cfg.prompts
        for lineno, r in read_jsonl(cfg.prompts):
            validate_prompt_value(r.get("prompt"), f"{cfg.prompts}:{lineno}")
            records.append(r)
    else:
        raise UserError("--prompts or --store: expected where the prompts come from")
    records = records[: cfg.limit] if cfg.limit else records
    if not records:
        raise UserError(f"{source}: no prompts")
    return records, source


def _sample(cfg: BatchConfig, model: str, records: list[dict[str, Any]], k: int, out: Path) -> list[dict]:
    from chatloop.sample import SampleConfig, sample

    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": r["prompt"], "user_id": r.get("user_id") or "unknown"}) + "\n"
                                   for r in records), encoding="utf-8")
        return sample(SampleConfig(model=model, prompts=str(prompts), out=str(out), k=k, k_min=cfg.k_min,
                                   k_max=cfg.k_max, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                   seed=cfg.seed))


def parse_thresholds(entries: list[str]) -> dict[str, float]:
    """["ranking=0.7", "likert=0.8"] -> {"ranking": 0.7, "likert": 0.8}."""
    out = {}
    for entry in entries:
        metric, _, value = entry.partition("=")
        try:
            out[metric.strip()] = float(value)
        except ValueError:
            raise UserError(f"--screening: expected METRIC=THRESHOLD (e.g. ranking=0.7), got {entry!r}") from None
    return out


def _compare_items(cfg: BatchConfig, records: list[dict[str, Any]], out: Path) -> list[dict[str, Any]]:
    """One answer of each --compare checkpoint per prompt, the models in an order drawn per prompt."""
    import random

    from chatloop.checkpoint import load_model
    from chatloop.device import resolve_device
    from chatloop.generate import answer
    from chatloop.tokenizer import Tokenizer

    if not 2 <= len(cfg.compare) <= K_MAX or len(set(cfg.compare)) != len(cfg.compare):
        raise UserError(f"--compare: expected 2 to {K_MAX} different checkpoints, got {cfg.compare}")
    device = resolve_device("auto")
    prompts = [r["prompt"] for r in records]
    texts = {}
    for path in cfg.compare:
        model = load_model(path, device=device).eval()
        texts[path] = answer(model, Tokenizer.load(path), prompts, cfg.max_new_tokens, cfg.temperature,
                             cfg.seed).texts
    rng = random.Random(f"chatloop-compare:{cfg.seed}")
    kind = "comparison" if len(cfg.compare) == 2 else "ranking"
    items, samples = [], []
    for i, r in enumerate(records):
        models = rng.sample(cfg.compare, len(cfg.compare))
        answers = [texts[m][i] for m in models]
        samples.append({"prompt": r["prompt"], "responses": answers, "models": models})
        task = ({"a": answers[0], "b": answers[1]} if kind == "comparison" else {"responses": answers})
        items.append(task_item(kind, {"prompt": r["prompt"], **task, "models": models, "compare": list(cfg.compare),
                                      "user_id": r.get("user_id"), **({"id": r["id"]} if "id" in r else {})},
                               f"{out}:{i + 1}"))
    atomic_write_jsonl(out, samples)
    return items


def batch(cfg: BatchConfig) -> str:
    """Create a batch; returns its id. Sampling from --model turns each new policy's answers into tasks."""
    if cfg.compare:
        cfg = dataclasses.replace(cfg, kind="comparison" if len(cfg.compare) == 2 else "ranking")
    if cfg.kind not in KINDS:
        raise UserError(f"--kind: expected one of {', '.join(KINDS)}, got {cfg.kind!r}")
    thresholds = parse_thresholds(cfg.screening) if cfg.screening else None
    store = open_store(cfg.db, cfg.secret_file)
    samples_dir = Path(cfg.samples_out).parent if cfg.samples_out else Path(
        store.engine.url.database or "runs/label.db").parent
    if cfg.data:
        raw = [(f"{cfg.data}:{n}", r) for n, r in read_jsonl(cfg.data)]
        raw = raw[: cfg.limit] if cfg.limit else raw
        items, source = [task_item(cfg.kind, r, where) for where, r in raw], cfg.data
    elif cfg.compare or (cfg.model and cfg.kind == "comparison"):
        compare = dataclasses.replace(cfg, compare=cfg.compare or cfg.model)
        records, source = _prompt_records(cfg)
        out = Path(cfg.samples_out) if cfg.samples_out else samples_dir / f"label-samples-{cfg.kind}.jsonl"
        items = _compare_items(compare, records, out)
        source = f"{' vs '.join(compare.compare)} on {source}"
    elif cfg.model:
        records, source = _prompt_records(cfg)
        if cfg.kind == "ranking":
            if len(cfg.model) != 1:
                raise UserError("--model: a ranking batch samples from one checkpoint")
            out = Path(cfg.samples_out) if cfg.samples_out else samples_dir / "label-samples-ranking.jsonl"
            sampled = _sample(cfg, cfg.model[0], records, cfg.k, out)
            items = [task_item("ranking", {**s, "user_id": r.get("user_id"), "id": r.get("id", s["id"])},
                               f"{out}:{i + 1}") for i, (s, r) in enumerate(zip(sampled, records))]
        else:
            raise UserError(f"--model: sampling makes ranking or comparison batches, not {cfg.kind}")
        source = f"{', '.join(cfg.model)} on {source}"
    elif cfg.kind == "demonstration":
        records, source = _prompt_records(cfg)
        items = [task_item("demonstration", r, f"{source}: prompt {i}") for i, r in enumerate(records)]
    else:
        raise UserError(f"--data, or --model with --prompts/--store: nothing to make {cfg.kind} tasks from")
    name = cfg.name or f"{'screening ' if thresholds else ''}{cfg.kind} from {Path(source.split(' on ')[-1]).name}"
    bid = store.create_batch(name, cfg.kind, items, overlap=cfg.overlap, source=source, actor=cli_actor(),
                             instructions=cfg.instructions, screening=thresholds)
    what = f"screening, pass {', '.join(f'{m} >= {v:g}' for m, v in thresholds.items())}" if thresholds else (
        f"overlap {cfg.overlap}")
    print(f"label batch: {bid} ({cfg.kind}, {len(items)} tasks, {what}) from {source}")
    return bid


@dataclass
class InviteConfig:
    name: str = ""
    """The invited person's user name."""
    role: str = "labeler"
    """labeler or admin."""
    url: str = "http://127.0.0.1:8080"
    """Where the app is reached (the invite link starts with it)."""
    days: float = 7.0
    """Days the invite stays valid."""
    db: str = DEFAULT_DB
    """The labeling database (URL or SQLite path)."""
    secret_file: str = DEFAULT_SECRET
    """Server secret file (see `chatloop label serve --help`)."""


def invite(cfg: InviteConfig) -> str:
    """Print a one-use invite link (the first admin is made this way)."""
    store = open_store(cfg.db, cfg.secret_file)
    token = store.create_invite(cfg.name, cfg.role, cli_actor(), ttl_s=cfg.days * 86400)
    link = f"{cfg.url.rstrip('/')}/invite/{token}"
    print(f"invite for {cfg.name} ({cfg.role}), valid {cfg.days:g} days:\n{link}")
    return link


@dataclass
class LabelExportConfig:
    out: str = "runs/labels"
    """Directory for rankings.jsonl, rankings_merged.jsonl, demonstrations.jsonl, ratings.jsonl,
    comparisons.jsonl and manifest.json (replaced as a whole)."""
    db: str = DEFAULT_DB
    """The labeling database (URL or SQLite path)."""
    secret_file: str = DEFAULT_SECRET
    """Server secret file (see `chatloop label serve --help`)."""


EXPORT_KINDS = {"rankings": "ranking", "rankings_merged": "ranking", "demonstrations": "demonstration",
                "ratings": "rating", "comparisons": "comparison"}


def export(cfg: LabelExportConfig) -> dict[str, int]:
    """Write every label as the records the trainers read: `chatloop rm --data OUT/rankings.jsonl`,
    `chatloop sft --data OUT/demonstrations.jsonl`. Rankings are raw (one record per labeler)."""
    store = open_store(cfg.db, cfg.secret_file)
    records, left_out = export_records(store)
    out = Path(cfg.out)
    tmp = temp_dir_beside(out)
    counts = {}
    for name, kind in EXPORT_KINDS.items():
        write_records(tmp / f"{name}.jsonl", kind, records[name])  # validated: what the trainers read
        counts[name] = len(records[name])
    atomic_write_json(tmp / "manifest.json", {
        "db": store.db, "counts": counts, "left_out": left_out,
        "files": {f"{n}.jsonl": sha256_file(tmp / f"{n}.jsonl") for n in EXPORT_KINDS}})
    replace_dir(tmp, out)
    with store.write() as conn:
        store.log(conn, cli_actor(), "export", out=str(out), **counts)
    print(f"label export -> {out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return counts


@dataclass
class LabelStatsConfig:
    db: str = DEFAULT_DB
    """The labeling database (URL or SQLite path)."""
    secret_file: str = DEFAULT_SECRET
    """Server secret file (see `chatloop label serve --help`)."""
    json: bool = False
    """Print the report as JSON."""


def stats(cfg: LabelStatsConfig) -> dict[str, Any]:
    """Progress per batch, throughput, and each labeler's agreement and gold accuracy."""
    r = report(open_store(cfg.db, cfg.secret_file))
    data = r.as_json()
    if cfg.json:
        print(json.dumps(data, indent=2))
        return data

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    for b in r.batches:
        print(f"batch {b['id']} {b['name']!r} ({b['kind']}, overlap {b['overlap']}{'' if b['active'] else ', paused'}):"
              f" {b['labels']}/{b['needed']} labels, {b['skipped']} skipped, {b['tasks']} tasks")
    t = r.throughput
    print(f"throughput: {t['labels']} labels, {t['last_hour']} last hour, {t['last_day']} last day by "
          f"{t['active_labelers_last_day']} labelers; agreement {pct(r.agreement['overall'])} "
          f"over {r.agreement['pairs']} pairs")
    for name, s in r.labelers.items():
        print(f"  {name}: {s['labels']} labels, agreement with others {pct(s['agreement_with_others'])}, "
              f"with consensus {pct(s['agreement_with_consensus'])}, gold {pct(s['gold_accuracy'])} "
              f"({s['gold_tasks']} tasks)")
    for line in screening_lines(r.screening):
        print(line)
    return data


def screening_lines(screening: list[dict[str, Any]]) -> list[str]:
    """Each screening batch and each candidate's scores and decision, as `label stats` prints them."""

    def score(metric: str, value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}" if metric == "demonstration" else f"{100 * value:.1f}%"

    lines = []
    for t in screening:
        need = ", ".join(f"{m} >= {v:g}" for m, v in t["thresholds"].items())
        lines.append(f"screening {t['id']} {t['name']!r} ({t['kind']}; pass: {need}): "
                     f"{len(t['candidates'])} candidates")
        for name, c in t["candidates"].items():
            scores = ", ".join(f"{m} {score(m, v)}" for m, v in c["scores"].items())
            review = f", {c['pending_reviews']} to review" if c["pending_reviews"] else ""
            lines.append(f"  {name}: {c['status']}; {scores}; {c['done']} done, {c['skipped']} skipped of "
                         f"{c['tasks']} tasks{review}")
    return lines


@dataclass
class PlanConfig:
    per_day: float = 200.0
    """Tasks one labeler does a day (InstructGPT-style ranking of K=4..9: roughly 100-300)."""
    labelers: list[int] = field(default_factory=lambda: [1, 2, 5, 10, 20, 40])
    """Team sizes to compare."""
    tasks: int = 0
    """Tasks to plan for; 0 uses what the database still needs (tasks x overlap - labels)."""
    overlap: int = 1
    """Labelers per task when --tasks is given."""
    db: str = DEFAULT_DB
    """The labeling database (URL or SQLite path), read when --tasks is 0."""
    secret_file: str = DEFAULT_SECRET
    """Server secret file (see `chatloop label serve --help`)."""


def plan_cmd(cfg: PlanConfig) -> list[dict[str, Any]]:
    """Labelers needed against days to finish: days = labels needed / (labelers x tasks per labeler per day)."""
    if cfg.tasks:
        needed = cfg.tasks * cfg.overlap
    else:
        needed = sum(b["remaining"] for b in open_store(cfg.db, cfg.secret_file).batch_list() if b["active"])
    rows = plan(needed, cfg.per_day, cfg.labelers)
    print(f"{needed} labels at {cfg.per_day:g} tasks per labeler per day:")
    for row in rows:
        print(f"  {row['labelers']:>4} labelers: {row['days']:.1f} days ({math.ceil(row['days'])} working days)")
    return rows
