"""`chatloop prompts ingest | export | stats`: the prompt store (`curate` lives in chatloop.data.curate).

The store is a database reached through SQLAlchemy: SQLite by default (`--db runs/prompts.db` or
`sqlite:///runs/prompts.db`), PostgreSQL or any SQLAlchemy URL otherwise. Tables:

    ingests    one row per file ingested: path, sha256, counts (read, added, already stored, invalid)
    prompts    raw prompt records, append-only: never updated or deleted (id = ingest order)
    curations  one row per `chatloop prompts curate` run: its config and report (JSON and markdown)
    curated    (curation id, prompt id) -> split, category, redacted prompt: the curated view of one run
    feedback   the chat page's judgements (`chatloop serve`): thumbs up/down of an answer, and which of two
               answers to one prompt (a regenerate) the user kept; `chatloop prompts feedback` exports pairs

Input formats (JSONL, plain or .gz), one reader for all of them:

- prompt records (chatloop.data.formats): `{"prompt": <text or messages>, "user_id": "...", "category":
  "...", "source": "...", "created_at": "2024-01-15T10:00:00Z", "id": ...}`; `category`, `source`,
  `created_at` and `id` are optional.
- the request log that `chatloop serve` writes: prompt records with `source: "api"` and the extra fields
  `model` (the checkpoint that answered), `sampling` (an object: temperature, top_p, max_tokens, ...) and
  `created_at` (when the request arrived). Extra fields are kept in the store as they are.
- labeler-written prompts: prompt records with `source` "plain", "few_shot" or "user_based" and the
  labeler's id as `user_id`; `--source` and `--user_id` fill these in for files that lack them.

Idempotency: a record's key is a 128-bit BLAKE2 hash of its line (without surrounding whitespace, line
ending or byte-order mark) plus its occurrence number among identical lines of the same file. Re-ingesting
a file, a copy of it, or a log that has grown since, adds only the lines not yet stored; a record sent
twice (two identical lines) is stored twice, once per occurrence. (A copy reformatted with other spacing or
key order would be stored again; curation's dedup then removes the repeats, as it removes every repeat.)

Bad input: a malformed line (not UTF-8, not JSON, not a valid prompt record, a bad time) is reported as
`file:line: ...`. By default it stops the run and nothing of that file is stored (each file is one
transaction; files before it stay ingested, and re-running after a fix is safe). With `--skip_invalid`
bad lines are skipped, counted and reported, and the rest of the file is stored.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    insert,
    inspect,
    select,
    update,
)
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError

from chatloop.data.formats import Prompt, validate_prompt_record
from chatloop.errors import DiskFull, UserError
from chatloop.io import (
    atomic_write_json,
    atomic_write_text,
    check_input_file,
    free_bytes,
    human_bytes,
    no_room,
    replace_dir,
    sha256_file,
    temp_dir_beside,
    utc_time,
)

DEFAULT_DB = "sqlite:///runs/prompts.db"
_BATCH = 5000  # rows per INSERT / key look-up: well under SQLite's 32766 bound variables


@dataclass(slots=True)
class Row:
    """A raw prompt as curation sees it (slots: a million of these must fit in well under a gigabyte)."""

    pid: int
    """Store id, increasing in ingest order."""
    prompt: Prompt
    user_id: str
    category: str | None = None
    source: str | None = None
    created_at: str | None = None
    """UTC time in a fixed-width ISO form (sorts as text), or None when the record had none."""


@dataclass(slots=True)
class CuratedRow:
    pid: int
    split: str
    category: str
    tagged: bool
    """True when the category came from the rules, not from the record."""
    prompt: Prompt | None
    """The redacted prompt, or None when curation did not change it."""
    pii: tuple[str, ...] = ()
    """PII types redacted from it."""


STORE_FORMAT = "1"
"""Version of the table layout below; a store of another version is refused rather than misread."""

metadata = MetaData()

meta = Table(
    "meta", metadata,
    Column("key", String(32), primary_key=True),
    Column("value", Text, nullable=False),
)

ingests = Table(
    "ingests", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("path", Text, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("started_at", String(32), nullable=False),
    Column("records", Integer, nullable=False, default=0),
    Column("added", Integer, nullable=False, default=0),
    Column("already_stored", Integer, nullable=False, default=0),
    Column("invalid", Integer, nullable=False, default=0),
)

prompts = Table(
    "prompts", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("record_key", String(48), nullable=False, unique=True),
    Column("record_id", Text),
    Column("prompt_text", Text),  # a text prompt as it is, or NULL
    Column("prompt_messages", Text),  # a message prompt as JSON, or NULL (exactly one of the two is set)
    Column("user_id", Text, nullable=False),
    Column("category", Text),
    Column("source", Text),
    Column("created_at", String(32)),  # fixed-width UTC ISO time (sorts as text), NULL when unknown
    Column("extra", Text),  # JSON object of the record's other fields (model, sampling, ...), NULL if none
    Column("ingest_id", Integer, ForeignKey("ingests.id"), nullable=False),  # the file it was first read from
    Column("line", Integer, nullable=False),  # and the line
)

curations = Table(
    "curations", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("created_at", String(32), nullable=False),
    Column("prompts", Integer, nullable=False),
    Column("config", Text, nullable=False),
    Column("report", Text, nullable=False),
    Column("report_md", Text, nullable=False),
)

curated = Table(
    "curated", metadata,
    Column("curation_id", Integer, ForeignKey("curations.id"), primary_key=True),
    Column("prompt_id", Integer, ForeignKey("prompts.id"), primary_key=True),
    Column("split", String(8), nullable=False),
    Column("category", Text, nullable=False),
    Column("tagged", Boolean, nullable=False),
    Column("prompt", Text),  # the redacted prompt (JSON), NULL when curation left it unchanged
    Column("pii", Text),  # comma-separated PII types redacted from it, NULL if none
)

feedback = Table(
    "feedback", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("user_id", Text, nullable=False),  # the API key's user
    Column("client_id", String(64), nullable=False),  # the page's id of the judgement: a repeat updates it
    Column("kind", String(16), nullable=False),  # thumb | regenerate
    Column("prompt", Text, nullable=False),  # JSON: the conversation up to the user's turn answered
    Column("answers", Text, nullable=False),  # JSON: [the answer] (thumb) or [first, regenerated] (regenerate)
    Column("verdict", String(8), nullable=False),  # thumb: up | down | none; regenerate: the kept one, 0 or 1
    Column("model", Text, nullable=False),
    Column("created_at", String(32), nullable=False),
    Column("updated_at", String(32), nullable=False),
    UniqueConstraint("user_id", "client_id"),
)

_CORE_FIELDS = ("prompt", "user_id", "category", "source", "created_at", "id")
# The columns of `prompts` that ingest writes, in the order of the tuples it builds.
_ROW_COLUMNS = ("record_key", "record_id", "prompt_text", "prompt_messages", "user_id", "category", "source",
                "created_at", "extra", "ingest_id", "line")


def normalize_time(value: str, where: str) -> str:
    """An ISO 8601 time as fixed-width UTC `YYYY-MM-DDTHH:MM:SS.ffffffZ` (so text order is time order).

    A time without a zone is taken as UTC; a date alone is midnight UTC.
    """
    if len(value) == 20 and value[10] == "T" and value[19] == "Z" and value[4] == "-":  # the common case, fast
        return value[:19] + ".000000Z"
    try:
        dt = datetime.fromisoformat(value)
    except (ValueError, TypeError):
        raise UserError(f"{where}: field 'created_at': expected an ISO 8601 time such as "
                        f"2024-01-15T10:00:00Z, got {value!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def display_time(stored: str) -> str:
    """A stored time as people write it: `2024-01-15T10:00:00Z` (microseconds only when there are some)."""
    return stored.replace(".000000Z", "Z")


def refused_write(e: BaseException) -> bool:
    """Whether a database error is the disk refusing a write: no room (chatloop.io.no_room: SQLite's "database or
    disk is full", ENOSPC, a quota) or a disk I/O error. SQLite rolls such a transaction back: nothing of it is
    stored, and the same write can be sent again once there is room."""
    return no_room(e) or "disk I/O error" in str(e)


def db_url(db: str) -> str:
    """An SQLAlchemy URL as given, or `sqlite:///PATH` for a plain file path."""
    return db if "://" in db else f"sqlite:///{db}"


class PromptStore:
    """The prompt database: append-only raw prompts, ingest bookkeeping, and curation runs."""

    def __init__(self, db: str = DEFAULT_DB, create: bool = True) -> None:
        try:
            url = make_url(db_url(db))
        except ArgumentError as e:
            raise UserError(f"--db: not a database URL or file path: {db!r} ({e})") from None
        self.db = url.render_as_string(hide_password=True) if "://" in db else db
        """The store as messages, reports and manifests name it (a password in the URL is masked)."""
        self.is_sqlite = url.get_backend_name() == "sqlite"
        self.path: Path | None = None
        """The SQLite file, if the store is one."""
        if self.is_sqlite and url.database and url.database != ":memory:":
            path = self.path = Path(url.database)
            if not create and not path.is_file():
                raise UserError(f"--db: no prompt store at {path} (run `chatloop prompts ingest` first)")
            path.parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = open_engine(url, self.db, metadata, meta, "prompts", STORE_FORMAT, "a prompt store",
                                          " (ingest the JSONL files into a new store)")

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction. One the disk refuses (refused_write) is DiskFull naming the store: it was rolled
        back, so nothing of it is stored, and the same command or request can be sent again once there is room."""
        try:
            with self.engine.begin() as conn:
                yield conn
        except (OperationalError, sqlite3.OperationalError) as e:  # sqlite3's own: _sqlite_insert's cursor
            if not refused_write(e):
                raise
            free = free_bytes(self.path) if self.path else None
            raise DiskFull(f"{self.db}: cannot write to the prompt store: {getattr(e, 'orig', e)}"
                           + (f" ({human_bytes(free)} free there)" if free is not None else "")
                           + "; nothing of this write was stored: make room and run it again") from None

    # -- ingest -----------------------------------------------------------------------------------------------

    def ingest_file(self, path: str | Path, *, source: str | None = None, user_id: str | None = None,
                    skip_invalid: bool = False) -> IngestResult:
        """Add the file's records not yet stored, in one transaction (module docstring)."""
        path = check_input_file(path)
        result = IngestResult(str(path))
        seen: dict[str, int] = {}  # occurrences of each line so far (a Counter's missing-key path is slow)
        with self.write() as conn:
            ingest_id = conn.execute(insert(ingests).values(
                path=str(path), sha256=sha256_file(path), started_at=utc_time())).inserted_primary_key[0]
            batch: list[tuple[Any, ...]] = []
            for lineno, raw in _read_lines(path):
                try:
                    parsed = parse_line(raw, f"{path}:{lineno}", source=source, user_id=user_id, first=lineno == 1)
                except UserError as e:
                    if not skip_invalid:
                        raise
                    result.invalid.append(str(e))
                    continue
                if parsed is None:
                    continue
                digest, fields = parsed
                n = seen.get(digest, 0)
                seen[digest] = n + 1
                batch.append((f"{digest}#{n}", *fields, ingest_id, lineno))
                result.records += 1
                if len(batch) >= _BATCH:
                    result.added += self._insert_new(conn, batch)
                    batch = []
            if batch:
                result.added += self._insert_new(conn, batch)
            conn.execute(update(ingests).where(ingests.c.id == ingest_id).values(
                records=result.records, added=result.added, already_stored=result.records - result.added,
                invalid=len(result.invalid)))
        return result

    def _insert_new(self, conn: Any, batch: list[tuple[Any, ...]]) -> int:
        """Insert the rows (tuples in _ROW_COLUMNS order) whose key is not stored yet; return how many."""
        if self.is_sqlite:
            return _sqlite_insert(conn, "prompts", _ROW_COLUMNS, batch, conflict_key="record_key")
        # Any other database: look the keys up first (portable; PostgreSQL and others).
        keys = [r[0] for r in batch]
        stored = set(conn.execute(select(prompts.c.record_key).where(prompts.c.record_key.in_(keys))).scalars())
        new = [dict(zip(_ROW_COLUMNS, r)) for r in batch if r[0] not in stored]
        if new:
            try:
                conn.execute(insert(prompts), new)
            except IntegrityError:
                raise UserError(f"{self.db}: another process stored some of these records at the same time; "
                                "run the ingest again (it adds only what is missing)") from None
        return len(new)

    def start_log(self, path: str) -> int:
        """An `ingests` row for records that arrive one by one (`chatloop serve`); returns its id."""
        with self.write() as conn:
            return conn.execute(insert(ingests).values(path=path, sha256="live", started_at=utc_time())
                                ).inserted_primary_key[0]

    def append_lines(self, ingest_id: int, lines: list[tuple[int, str]]) -> int:
        """Store (line number, JSONL line) records as they arrive, under `ingest_id` (start_log), in one
        transaction; returns how many were new. Keys are what ingesting a file of these lines would give,
        so ingesting `chatloop serve`'s request log afterwards adds nothing."""
        batch = []
        for lineno, line in lines:
            parsed = parse_line(line.encode("utf-8"), f"{ingest_id}:{lineno}")
            if parsed is not None:
                digest, fields = parsed
                batch.append((f"{digest}#0", *fields, ingest_id, lineno))
        with self.write() as conn:
            added = self._insert_new(conn, batch)
            conn.execute(update(ingests).where(ingests.c.id == ingest_id).values(
                records=ingests.c.records + len(batch), added=ingests.c.added + added,
                already_stored=ingests.c.already_stored + len(batch) - added))
        return added

    def put_feedback(self, user_id: str, client_id: str, kind: str, prompt: Any, answers: list[str], verdict: str,
                     model: str) -> tuple[int, bool]:
        """Store a user's judgement from the chat page, or change the verdict of the one with the same client id
        (a second click); returns (row id, whether it was new). The same id with another prompt or other answers
        is a UserError (an id names one judgement)."""
        now = utc_time()
        body, texts = _ENCODE(prompt), _ENCODE(answers)
        for _ in range(2):  # a concurrent first insert of the same id: the second try finds it and updates
            try:
                with self.write() as conn:
                    row = conn.execute(select(feedback.c.id, feedback.c.kind, feedback.c.prompt, feedback.c.answers)
                                       .where(feedback.c.user_id == user_id, feedback.c.client_id == client_id)).first()
                    if row is not None:
                        if (row.kind, row.prompt, row.answers) != (kind, body, texts):
                            raise UserError(f"id: {client_id!r} names another judgement (a new one needs a new id)")
                        conn.execute(update(feedback).where(feedback.c.id == row.id).values(verdict=verdict,
                                                                                           updated_at=now))
                        return row.id, False
                    return conn.execute(insert(feedback).values(
                        user_id=user_id, client_id=client_id, kind=kind, prompt=body, answers=texts, verdict=verdict,
                        model=model, created_at=now, updated_at=now)).inserted_primary_key[0], True
            except IntegrityError:
                continue
        raise UserError(f"id: {client_id!r}: stored concurrently; send it again")

    def feedback_rows(self) -> list[dict[str, Any]]:
        """Every chat-page judgement, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(feedback).order_by(feedback.c.id)).all()
        return [{"id": r.id, "user_id": r.user_id, "client_id": r.client_id, "kind": r.kind,
                 "prompt": json.loads(r.prompt), "answers": json.loads(r.answers), "verdict": r.verdict,
                 "model": r.model, "created_at": r.created_at, "updated_at": r.updated_at} for r in rows]

    # -- reading --------------------------------------------------------------------------------------------------

    def load_rows(self) -> list[Row]:
        """Every raw prompt as a curation Row, in ingest order."""
        cols = (prompts.c.id, prompts.c.prompt_text, prompts.c.prompt_messages, prompts.c.user_id,
                prompts.c.category, prompts.c.source, prompts.c.created_at)
        loads = json.loads
        with self.engine.connect() as conn:
            result = conn.execution_options(yield_per=20000).execute(select(*cols).order_by(prompts.c.id))
            return [Row(pid, text if text is not None else loads(messages), user, category, source, created)
                    for pid, text, messages, user, category, source, created in result]

    def latest_curation(self) -> int | None:
        with self.engine.connect() as conn:
            return conn.execute(select(func.max(curations.c.id))).scalar()

    def curation_report(self, curation_id: int) -> tuple[dict[str, Any], str]:
        with self.engine.connect() as conn:
            row = conn.execute(select(curations.c.report, curations.c.report_md)
                               .where(curations.c.id == curation_id)).first()
        if row is None:
            raise UserError(f"--curation: no curation {curation_id} in {self.db}")
        return json.loads(row[0]), row[1]

    def curated_records(self, curation_id: int) -> dict[str, list[dict[str, Any]]]:
        """Prompt records of a curation, by split, in ingest order (redacted prompts where curation redacted)."""
        cols = (curated.c.prompt_id, curated.c.split, curated.c.category, curated.c.prompt, curated.c.pii,
                prompts.c.record_id, prompts.c.prompt_text, prompts.c.prompt_messages, prompts.c.user_id,
                prompts.c.source, prompts.c.created_at)
        query = (select(*cols).join(prompts, prompts.c.id == curated.c.prompt_id)
                 .where(curated.c.curation_id == curation_id).order_by(curated.c.prompt_id))
        out: dict[str, list[dict[str, Any]]] = {}
        with self.engine.connect() as conn:
            for pid, split, category, redacted, pii, rid, text, messages, user, source, created in (
                    conn.execution_options(yield_per=20000).execute(query)):
                if redacted is not None:
                    prompt = json.loads(redacted)
                else:
                    prompt = text if text is not None else json.loads(messages)
                record: dict[str, Any] = {"id": rid if rid is not None else f"prompt-{pid}", "prompt": prompt,
                                          "user_id": user, "category": category}
                if source is not None:
                    record["source"] = source
                if created is not None:
                    record["created_at"] = display_time(created)
                if pii:
                    record["pii_redacted"] = pii.split(",")
                out.setdefault(split, []).append(record)
        return out

    # -- curations ------------------------------------------------------------------------------------------------

    def save_curation(self, rows: Sequence[CuratedRow], report: dict[str, Any],
                      render: Callable[[dict[str, Any]], str]) -> int:
        """Store a curation run and its rows in one transaction; sets report["curation_id"]; returns the id."""
        dumps = json.dumps
        with self.write() as conn:
            cid = conn.execute(insert(curations).values(
                created_at=utc_time(), prompts=len(rows), config=dumps(report.get("config", {})), report="{}",
                report_md="")).inserted_primary_key[0]
            report["curation_id"] = cid
            names = ("curation_id", "prompt_id", "split", "category", "tagged", "prompt", "pii")
            for i in range(0, len(rows), 20000):
                batch = [(cid, r.pid, r.split, r.category, r.tagged, None if r.prompt is None else _ENCODE(r.prompt),
                          ",".join(r.pii) or None) for r in rows[i : i + 20000]]
                if self.is_sqlite:
                    _sqlite_insert(conn, "curated", names, batch)
                else:
                    conn.execute(insert(curated), [dict(zip(names, r)) for r in batch])
            conn.execute(update(curations).where(curations.c.id == cid).values(
                report=dumps(report, default=str), report_md=render(report)))
        return cid

    # -- stats ------------------------------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        with self.engine.connect() as conn:
            def count(col: Any, where: Any = None) -> int:
                q = select(func.count(col))
                return conn.execute(q if where is None else q.where(where)).scalar() or 0

            by = {}
            for name in ("source", "category"):
                col = prompts.c[name]
                by[name] = {str(k): n for k, n in conn.execute(
                    select(col, func.count()).group_by(col).order_by(func.count().desc())).all()}
            runs = conn.execute(select(curations.c.id, curations.c.created_at, curations.c.prompts)
                                .order_by(curations.c.id.desc()).limit(5)).all()
            splits = {}
            if runs:
                splits = dict(conn.execute(select(curated.c.split, func.count()).where(
                    curated.c.curation_id == runs[0][0]).group_by(curated.c.split)).all())
            return {
                "prompts": count(prompts.c.id),
                "users": conn.execute(select(func.count(prompts.c.user_id.distinct()))).scalar() or 0,
                "ingests": count(ingests.c.id),
                "by_source": by["source"], "by_category": by["category"],
                "curations": [{"id": i, "created_at": t, "prompts": n} for i, t, n in runs],
                "latest_curation_splits": splits,
            }


def _sqlite_insert(conn: Any, table: str, names: Sequence[str], rows: list[tuple[Any, ...]],
                   conflict_key: str | None = None) -> int:
    """SQLite fast path: `executemany` on the driver's own cursor, inside the open transaction (SQLAlchemy's
    per-row parameter handling costs as much as the insert itself). Rows whose `conflict_key` is stored
    already are skipped. Returns the number of rows inserted."""
    sql = f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
    if conflict_key:
        sql += f" ON CONFLICT ({conflict_key}) DO NOTHING"
    cursor = conn.connection.driver_connection.cursor()
    try:
        cursor.executemany(sql, rows)
        return cursor.rowcount  # sqlite3 sums the rows changed by all the statements of an executemany
    finally:
        cursor.close()


def open_engine(url: URL, shown: str, tables: MetaData, meta_table: Table, marker: str, version: str, what: str,
                hint: str = "", *, on_connect: Callable[[Any, Any], None] | None = None,
                on_begin: Callable[[Any], None] | None = None, **begin_options: Any) -> Engine:
    """An engine on `url` (SQLite: the pragmas below on every connection), its tables created, and the layout
    version in `meta_table` checked: a store of another version is refused rather than misread. `marker` is a
    table whose absence means a fresh store. The labeling store passes its own connect/begin hooks."""
    try:
        engine = create_engine(url)
    except Exception as e:  # a missing driver (e.g. psycopg for postgresql://) is the user's to install
        raise UserError(f"--db: cannot open {shown!r}: {e}") from None
    if url.get_backend_name() == "sqlite":
        event.listen(engine, "connect", on_connect or sqlite_pragmas)
        if on_begin is not None:
            event.listen(engine, "begin", on_begin)
    try:
        with engine.execution_options(**begin_options).begin() as conn:
            fresh = not inspect(conn).has_table(marker)
            tables.create_all(conn)
            if fresh:
                conn.execute(insert(meta_table).values(key="format", value=version))
            found = conn.execute(select(meta_table.c.value).where(meta_table.c.key == "format")).scalar()
    except OperationalError as e:  # a store that cannot be created on a full disk is DiskFull (exit 2 too)
        raise (DiskFull if refused_write(e) else UserError)(f"--db: cannot open {shown!r}: {e.orig}") from None
    if found != version:
        raise UserError(f"--db: {shown!r} is {what} of format {found!r}, this chatloop reads format {version!r}"
                        + hint)
    return engine


def sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    """The pragmas of every SQLite connection of a store (the labeling store sets them on its connections too)."""
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")  # readers (stats, export) do not block an ingest
    cursor.execute("PRAGMA synchronous=NORMAL")  # durable at each commit in WAL mode, and much faster
    cursor.execute("PRAGMA cache_size=-131072")  # 128 MiB: the key index of a million prompts stays cached
    cursor.close()


def _read_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, raw bytes) so that one undecodable line can be skipped like any other bad line."""
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            yield from enumerate(f, 1)
    except (gzip.BadGzipFile, EOFError) as e:
        raise UserError(f"{path}: not a valid gzip file ({e})") from None


# Reused encoders: json.dumps with non-default arguments builds a new encoder per call, which costs more than
# the encoding itself here.
_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_DECODE = json.JSONDecoder().raw_decode
_ENCODE_LINE = json.JSONEncoder(ensure_ascii=False).encode  # the spacing of chatloop.io.atomic_write_jsonl


def parse_line(raw: bytes, where: str, *, source: str | None = None, user_id: str | None = None,
               first: bool = False) -> tuple[str, tuple[Any, ...]] | None:
    """The line's hash and its `prompts` columns from record_id to extra (_ROW_COLUMNS); None for a blank line."""
    line = raw.strip()
    if first and line.startswith(b"\xef\xbb\xbf"):
        line = line[3:]
    if not line:
        return None
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        obj, end = _DECODE(text)  # the text is stripped already: skip json.loads' whitespace handling
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if end != len(text):
        raise UserError(f"{where}: invalid JSON (extra data after the object at column {end + 1})")
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object (a prompt record), got {type(obj).__name__}")
    if source is not None and "source" not in obj:
        obj["source"] = source
    if user_id is not None and "user_id" not in obj:
        obj["user_id"] = user_id
    validate_prompt_record(obj, where)
    if "sampling" in obj and not isinstance(obj["sampling"], dict):
        raise UserError(f"{where}: field 'sampling': expected an object of sampling settings, "
                        f"got {obj['sampling']!r}")
    prompt = obj["prompt"]
    created = obj.get("created_at")
    extra = {k: v for k, v in obj.items() if k not in _CORE_FIELDS}
    fields = (
        None if "id" not in obj else str(obj["id"]),
        prompt if isinstance(prompt, str) else None,
        None if isinstance(prompt, str) else _ENCODE(prompt),
        obj["user_id"], obj.get("category"), obj.get("source"),
        None if created is None else normalize_time(created, where),
        _ENCODE(extra) if extra else None,
    )
    return hashlib.blake2b(line, digest_size=16).hexdigest(), fields


@dataclass
class IngestResult:
    path: str
    records: int = 0
    """Valid records read."""
    added: int = 0
    """Records stored by this ingest (the others were already stored)."""
    invalid: list[str] = field(default_factory=list)
    """Messages (file:line: why) of the lines skipped with --skip_invalid."""


# -- commands ---------------------------------------------------------------------------------------------------------


@dataclass
class IngestConfig:
    inputs: list[str] = field(default_factory=list)
    """JSONL files (.jsonl or .jsonl.gz) of prompt records, request logs or labeler-written prompts."""
    db: str = DEFAULT_DB
    """The prompt store: an SQLAlchemy URL (sqlite:///file.db, postgresql://...) or a plain SQLite file path."""
    source: str | None = None
    """Source for records without one: api (user requests), plain, few_shot or user_based (labeler-written)."""
    user_id: str | None = None
    """User id for records without one (e.g. the labeler who wrote a file of prompts)."""
    skip_invalid: bool = False
    """Skip malformed lines (counted and reported) instead of stopping with nothing of that file stored."""


def ingest(cfg: IngestConfig) -> list[IngestResult]:
    if not cfg.inputs:
        raise UserError("--inputs: expected one or more JSONL files of prompt records")
    paths = [check_input_file(p) for p in cfg.inputs]  # a typo in the last file stops before the first
    for name in ("source", "user_id"):
        value = getattr(cfg, name)
        if value is not None and not value.strip():
            raise UserError(f"--{name}: expected a non-empty string")
    store = PromptStore(cfg.db)
    results = []
    for path in paths:
        start = time.perf_counter()
        result = store.ingest_file(path, source=cfg.source, user_id=cfg.user_id, skip_invalid=cfg.skip_invalid)
        results.append(result)
        print(f"{path}: {result.records} records, {result.added} added, {result.records - result.added} "
              f"already stored, {len(result.invalid)} invalid skipped ({time.perf_counter() - start:.1f} s)")
        for message in result.invalid[:20]:
            print(f"  skipped {message}", file=sys.stderr)
        if len(result.invalid) > 20:
            print(f"  ... and {len(result.invalid) - 20} more", file=sys.stderr)
    stats = store.stats()
    print(f"{store.db}: {stats['prompts']} prompts from {stats['users']} users")
    return results


@dataclass
class PromptExportConfig:
    db: str = DEFAULT_DB
    """The prompt store: an SQLAlchemy URL (sqlite:///file.db, postgresql://...) or a plain SQLite file path."""
    out: str = "runs/prompt_sets"
    """Directory for sft/rm/ppo/val/test.jsonl, the curation report and a manifest (replaced as a whole)."""
    curation: int | None = None
    """Curation run to export (`chatloop prompts stats` lists them); none = the latest."""
    sft: float = 0.2
    """Share of the training split in sft.jsonl (prompts for labelers' demonstrations)."""
    rm: float = 0.4
    """Share of the training split in rm.jsonl (prompts whose samples labelers rank)."""
    ppo: float = 0.4
    """Share of the training split in ppo.jsonl (prompts of the RL episodes). The three sets are disjoint."""
    seed: int = 0
    """Seed of the draw that divides the training split between the three sets."""


EXPORT_FILES = ("sft.jsonl", "rm.jsonl", "ppo.jsonl", "val.jsonl", "test.jsonl")


def divide_train(records: list[dict[str, Any]], shares: dict[str, float], seed: int
                 ) -> dict[str, list[dict[str, Any]]]:
    """Disjoint sets of the training records in the given shares (a seeded shuffle, then slices)."""
    order = list(range(len(records)))
    random.Random(f"{seed}:export").shuffle(order)
    out, start = {}, 0
    for name, share in shares.items():
        n = min(round(share * len(records)), len(records) - start)
        out[name] = [records[i] for i in sorted(order[start : start + n])]
        start += n
    return out


def export(cfg: PromptExportConfig) -> dict[str, int]:
    shares = {"sft": cfg.sft, "rm": cfg.rm, "ppo": cfg.ppo}
    for name, share in shares.items():
        if not 0 <= share <= 1:
            raise UserError(f"--{name}: expected a share of the training split in [0, 1], got {share}")
    if sum(shares.values()) > 1 + 1e-9:
        raise UserError(f"--sft/--rm/--ppo: expected shares that sum to at most 1, got "
                        f"{cfg.sft} + {cfg.rm} + {cfg.ppo} = {sum(shares.values()):g}")
    store = PromptStore(cfg.db, create=False)
    curation_id = cfg.curation if cfg.curation is not None else store.latest_curation()
    if curation_id is None:
        raise UserError(f"{store.db}: no curation yet (run `chatloop prompts curate` first)")
    report, markdown = store.curation_report(curation_id)
    by_split = store.curated_records(curation_id)
    sets = divide_train(by_split.get("train", []), shares, cfg.seed)
    sets["val"], sets["test"] = by_split.get("val", []), by_split.get("test", [])
    out = Path(cfg.out)
    tmp = temp_dir_beside(out)
    counts = {}
    for name in ("sft", "rm", "ppo", "val", "test"):
        records = sets[name]
        for i, record in enumerate(records):  # what is written must read back as valid prompt records
            validate_prompt_record(record, f"{name}.jsonl: record {i}")
        atomic_write_text(tmp / f"{name}.jsonl", "".join(_ENCODE_LINE(r) + "\n" for r in records))
        counts[name] = len(records)
    atomic_write_json(tmp / "report.json", report)
    atomic_write_text(tmp / "report.md", markdown)
    atomic_write_json(tmp / "manifest.json", {
        "db": store.db, "curation": curation_id, "seed": cfg.seed, "shares": shares, "counts": counts,
        "users": {name: len({r["user_id"] for r in sets[name]}) for name in counts},
        "files": {f: sha256_file(tmp / f) for f in EXPORT_FILES}, "created_at": utc_time()})
    replace_dir(tmp, out)
    print(f"curation {curation_id} -> {out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return counts


@dataclass
class PromptStatsConfig:
    db: str = DEFAULT_DB
    """The prompt store: an SQLAlchemy URL (sqlite:///file.db, postgresql://...) or a plain SQLite file path."""


def stats(cfg: PromptStatsConfig) -> dict[str, Any]:
    store = PromptStore(cfg.db, create=False)
    s = store.stats()
    print(f"{store.db}: {s['prompts']} prompts from {s['users']} users, {s['ingests']} ingests")
    print("  by source: " + ", ".join(f"{k} {v}" for k, v in s["by_source"].items()))
    print("  by category: " + ", ".join(f"{k} {v}" for k, v in s["by_category"].items()))
    for c in s["curations"]:
        print(f"  curation {c['id']} at {c['created_at']}: {c['prompts']} prompts")
    if s["latest_curation_splits"]:
        print("  latest curation: " + ", ".join(f"{k} {v}" for k, v in s["latest_curation_splits"].items()))
    return s
