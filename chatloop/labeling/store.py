"""The labeling database: accounts, batches of tasks, assignment with leases, labels, agreement, exports.

One SQLAlchemy engine, SQLite in WAL mode by default (the prompt store's pragmas) or any URL (PostgreSQL).
Tables:

    meta         key/value: the layout version
    users        accounts: random id, name, role (admin | labeler), argon2 password hash
    sessions     HMAC of each session token (a stolen database does not yield a session), expiry
    invites      HMAC of each invite token, the name and role it creates, expiry, when it was used
    batches      a set of tasks of one kind (demonstration | ranking | rating | comparison) and its overlap
    tasks        what a labeler sees: the prompt and the responses; hidden fields (models, sampling) never leave
                 the server; the prompt's author (never assigned to them), an optional gold answer, and how
                 many assignments count toward the overlap (`taken`; `open` while below it, indexed)
    assignments  (task, labeler) with a lease, the order the responses were shown in, and the status
                 (leased | done | skipped | expired); unique per (task, labeler)
    labels       one per assignment (unique): the answer, stored in the task's order, never in the shown order
    audit        what admins did (invites, batches, overlap, exports), when and who
    screenings   batches that are a screening (qualification) test, with a pass threshold per metric of the job
    qualifications  each candidate's result of a screening batch: passed | failed | review (waiting for an
                 admin's review of their demonstrations), the scores, when and by whom it was decided
    reviews      an admin's 1-7 score of a demonstration written in a screening batch

A labeler sees production batches only after passing every active screening batch (docs/LABELING.md,
"Screening"); admins are never gated.

Every id a labeler can see is random (`secrets.token_urlsafe`), and every read or write of an assignment is
scoped by the current user: another labeler's assignment is "not found". A submission is one transaction
(label + assignment status); a repeated submission of the same assignment returns the stored label.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import math
import os
import random
import secrets
import statistics
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    bindparam,
    exists,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError

from chatloop.data.formats import (
    FLAGS,
    prompt_messages,
    validate_demonstration,
    validate_prompt_value,
)
from chatloop.data.prompts import db_url, open_engine, sqlite_pragmas
from chatloop.errors import UserError
from chatloop.io import utc_time

DEFAULT_DB = "sqlite:///runs/label.db"
STORE_FORMAT = "1"
KINDS = ("demonstration", "ranking", "rating", "comparison")
ROLES = ("admin", "labeler")
# The rating form asks InstructGPT's metadata questions (chatloop.data.formats.FLAGS) plus "contains PII",
# which the rating record carries as its own field `contains_pii` (FLAGS is the judge's fixed set).
LABEL_FLAGS = (*FLAGS, "contains_pii")
K_MIN, K_MAX = 2, 9  # InstructGPT ranks 4..9; 2 and 3 are allowed for small batches and imported pairs
SESSION_S = 12 * 3600
RECLAIM_S = 1.0  # expired leases are looked for at most this often (a lease lasts many minutes)
SESSION_CACHE_S = 5.0  # a session lookup is reused this long (a deactivated account stops within it)
INVITE_S = 7 * 86400
MIN_PASSWORD = 10
MAX_OVERLAP = 1000  # labelers per task: far above any real overlap, and small enough for every database

metadata = MetaData()

meta = Table("meta", metadata, Column("key", String(32), primary_key=True), Column("value", Text, nullable=False))

users = Table(
    "users", metadata,
    Column("id", String(24), primary_key=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("role", String(16), nullable=False),
    Column("password_hash", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("active", Boolean, nullable=False, default=True),
)

sessions = Table(
    "sessions", metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("user_id", String(24), ForeignKey("users.id"), nullable=False),
    Column("expires_at", Float, nullable=False),
)

invites = Table(
    "invites", metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("name", String(64), nullable=False),
    Column("role", String(16), nullable=False),
    Column("created_by", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("used_at", Float),
)

batches = Table(
    "batches", metadata,
    Column("id", String(24), primary_key=True),
    Column("name", Text, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("overlap", Integer, nullable=False),
    Column("active", Boolean, nullable=False, default=True),
    Column("source", Text, nullable=False),
    Column("instructions", Text, nullable=False, default=""),
    Column("created_by", Text, nullable=False),
    Column("created_at", Float, nullable=False),
)

tasks = Table(
    "tasks", metadata,
    Column("id", String(24), primary_key=True),
    Column("batch_id", String(24), ForeignKey("batches.id"), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("prompt", Text, nullable=False),  # JSON: text or messages
    Column("payload", Text, nullable=False),  # JSON shown to labelers: {"responses": [...]} / {"response"} / {"a","b"}
    Column("hidden", Text, nullable=False),  # JSON never shown: {"models": [...], "ended": [...], "source_id": ...}
    Column("author", Text),  # the prompt's user id: that labeler never gets the task
    Column("gold", Text),  # JSON known answer in task order, or NULL
    Column("taken", Integer, nullable=False, default=0),  # assignments that count: live leases + labels
    Column("open", Boolean, nullable=False, default=True),  # taken < the batch's overlap (kept in step)
    Index("ix_tasks_open", "batch_id", "open", "seq"),
)

assignments = Table(
    "assignments", metadata,
    Column("id", String(24), primary_key=True),
    Column("task_id", String(24), ForeignKey("tasks.id"), nullable=False),
    Column("user_id", String(24), ForeignKey("users.id"), nullable=False),
    Column("status", String(8), nullable=False),  # leased | done | skipped | expired (lease ran out)
    Column("shown", Text, nullable=False),  # JSON permutation: shown position -> task index
    Column("leased_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("skip_reason", Text),
    UniqueConstraint("task_id", "user_id"),
    Index("ix_assignments_user_status", "user_id", "status"),
    Index("ix_assignments_lease", "status", "expires_at"),
)

labels = Table(
    "labels", metadata,
    Column("id", String(24), primary_key=True),
    Column("assignment_id", String(24), ForeignKey("assignments.id"), nullable=False, unique=True),
    Column("task_id", String(24), ForeignKey("tasks.id"), nullable=False),
    Column("user_id", String(24), ForeignKey("users.id"), nullable=False),
    Column("answer", Text, nullable=False),  # JSON, in task order
    Column("created_at", Float, nullable=False),
    Column("seconds", Float, nullable=False),  # from lease to submission
    Index("ix_labels_task", "task_id"),
)

screenings = Table(
    "screenings", metadata,
    Column("batch_id", String(24), ForeignKey("batches.id"), primary_key=True),
    Column("thresholds", Text, nullable=False),  # JSON {metric: pass threshold}
    Column("created_by", Text, nullable=False),
    Column("created_at", Float, nullable=False),
)

qualifications = Table(
    "qualifications", metadata,
    Column("batch_id", String(24), ForeignKey("batches.id"), primary_key=True),
    Column("user_id", String(24), ForeignKey("users.id"), primary_key=True),
    Column("status", String(8), nullable=False),  # passed | failed | review (demonstrations await an admin)
    Column("scores", Text, nullable=False),  # JSON {metric: score}
    Column("decided_at", Float, nullable=False),
    Column("decided_by", Text, nullable=False),
)

reviews = Table(
    "reviews", metadata,
    Column("label_id", String(24), ForeignKey("labels.id"), primary_key=True),
    Column("score", Integer, nullable=False),  # 1-7, InstructGPT's scale for screening demonstrations
    Column("reviewer", Text, nullable=False),
    Column("at", Float, nullable=False),
)

audit = Table(
    "audit", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),  # internal only, never in a URL
    Column("at", Float, nullable=False),
    Column("actor", Text, nullable=False),
    Column("action", String(32), nullable=False),
    Column("detail", Text, nullable=False),
)

# The hot path's statements, built once: building a statement costs more than SQLite running it.
Q_SESSION = (select(users.c.id, users.c.name, users.c.role).join(sessions, sessions.c.user_id == users.c.id)
             .where(sessions.c.token_hash == bindparam("th"), sessions.c.expires_at > bindparam("now"),
                    users.c.active.is_(True)))
Q_VIEW = (select(assignments, tasks.c.prompt, tasks.c.payload, tasks.c.batch_id, batches.c.kind,
                 batches.c.name.label("batch_name"), batches.c.instructions)
          .join(tasks, tasks.c.id == assignments.c.task_id).join(batches, batches.c.id == tasks.c.batch_id)
          .where(assignments.c.id == bindparam("aid"), assignments.c.user_id == bindparam("user")))
Q_LABEL = select(labels.c.id, labels.c.answer).where(labels.c.assignment_id == bindparam("aid"))
Q_LIVE = (select(assignments.c.id, tasks.c.batch_id).join(tasks, tasks.c.id == assignments.c.task_id)
          .join(batches, batches.c.id == tasks.c.batch_id)
          .where(assignments.c.user_id == bindparam("user"), assignments.c.status == "leased",
                 assignments.c.expires_at > bindparam("now"), batches.c.active.is_(True)))
Q_EXPIRED = select(assignments.c.id, assignments.c.task_id).where(
    assignments.c.status == "leased", assignments.c.expires_at <= bindparam("now"))
Q_ACTIVE = (select(batches.c.id, batches.c.kind, screenings.c.thresholds)
            .select_from(batches.outerjoin(screenings, screenings.c.batch_id == batches.c.id))
            .where(batches.c.active.is_(True)).order_by(batches.c.created_at))
Q_QUALIFIED = select(qualifications.c.batch_id, qualifications.c.status).where(
    qualifications.c.user_id == bindparam("user"))
_MINE = select(assignments.c.id).where(assignments.c.task_id == tasks.c.id, assignments.c.user_id == bindparam("user"))
_CANDIDATE = (select(tasks.c.id, tasks.c.payload, _MINE.scalar_subquery().label("old"))
              .where(tasks.c.batch_id == bindparam("batch"),
                     or_(tasks.c.author.is_(None), tasks.c.author != bindparam("name")),
                     ~exists(_MINE.where(assignments.c.status.in_(("done", "skipped")))))
              .order_by(tasks.c.seq).limit(1))
Q_CANDIDATE = _CANDIDATE.where(tasks.c.open.is_(True))
Q_SCREEN_CANDIDATE = _CANDIDATE  # a screening batch: every candidate takes every task, whatever the overlap
Q_SUBMIT = (select(assignments.c.status, assignments.c.shown, assignments.c.leased_at, assignments.c.task_id,
                   tasks.c.prompt, tasks.c.payload, tasks.c.batch_id, batches.c.kind, screenings.c.thresholds)
            .join(tasks, tasks.c.id == assignments.c.task_id).join(batches, batches.c.id == tasks.c.batch_id)
            .outerjoin(screenings, screenings.c.batch_id == batches.c.id)
            .where(assignments.c.id == bindparam("aid"), assignments.c.user_id == bindparam("user")))
U_COUNT = update(tasks).where(tasks.c.id == bindparam("t_id")).values(
    taken=tasks.c.taken + bindparam("delta"),
    open=tasks.c.taken + bindparam("delta") < select(batches.c.overlap).where(
        batches.c.id == tasks.c.batch_id).scalar_subquery())
U_STATUS = update(assignments).where(assignments.c.id == bindparam("a_id")).values(status=bindparam("new_status"))
U_LEASE = update(assignments).where(assignments.c.id == bindparam("a_id")).values(
    status="leased", shown=bindparam("new_shown"), leased_at=bindparam("new_at"), expires_at=bindparam("new_until"))
I_ASSIGNMENT = insert(assignments)
I_LABEL = insert(labels)


class NotFound(Exception):
    """No such object for this user (also what another labeler's object looks like)."""


class BadAnswer(Exception):
    """A submitted answer that does not fit the task; the message says which field and what was expected."""


class Conflict(Exception):
    """An action the assignment's state no longer allows (skipping a task already done)."""


def new_id() -> str:
    return secrets.token_urlsafe(12)


_RANDOM = random.SystemRandom()
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_loads = json.loads

# -- secrets --------------------------------------------------------------------------------------------------

WEAK_SECRETS = {"", "secret", "changeme", "change-me", "change_me", "default", "password", "dev", "development",
                "insecure", "test", "admin", "chatloop", "please-change-me"}
MIN_SECRET = 32


def check_secret(value: str, where: str) -> str:
    value = value.strip()
    if value.lower() in WEAK_SECRETS or len(value) < MIN_SECRET:
        raise UserError(f"{where}: refusing to run with an empty, default or short secret (expected at least "
                        f"{MIN_SECRET} random characters; delete the file to have one generated)")
    return value


def load_secret(secret_file: str | Path) -> str:
    """The server secret: $CHATLOOP_LABEL_SECRET, else the file, generated (mode 0600) on first run."""
    if "CHATLOOP_LABEL_SECRET" in os.environ:
        return check_secret(os.environ["CHATLOOP_LABEL_SECRET"], "$CHATLOOP_LABEL_SECRET")
    path = Path(secret_file)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process generated it just now
            return check_secret(path.read_text(), str(path))
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(48) + "\n")
            f.flush()
            os.fsync(f.fileno())
    return check_secret(path.read_text(encoding="utf-8"), str(path))


# -- the store ------------------------------------------------------------------------------------------------


def _begin_sqlite(conn: Connection) -> None:
    # pysqlite's own transaction handling is off (isolation_level=None): we BEGIN ourselves, IMMEDIATE for
    # writers, so that assignment's read-then-write cannot interleave with another writer's.
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("write") else "BEGIN")


def _connect_sqlite(dbapi_conn: Any, record: Any) -> None:
    dbapi_conn.isolation_level = None
    sqlite_pragmas(dbapi_conn, record)
    dbapi_conn.execute("PRAGMA busy_timeout=10000")


class LabelStore:
    """All database work of the app and the admin verbs; the web layer only parses, checks and renders."""

    def __init__(self, db: str, secret: str) -> None:
        try:
            url = make_url(db_url(db))
        except ArgumentError as e:
            raise UserError(f"--db: not a database URL or file path: {db!r} ({e})") from None
        self.db = url.render_as_string(hide_password=True)
        self.secret = secret.encode()
        self._sessions: dict[str, tuple[float, Any]] = {}  # token HMAC -> (looked up at, user): a short cache
        self._reclaimed_at = -math.inf  # when expired leases were last returned to the queue
        self.is_sqlite = url.get_backend_name() == "sqlite"
        if self.is_sqlite and url.database and url.database != ":memory:":
            path = Path(url.database)
            path.parent.mkdir(parents=True, exist_ok=True)
            # Created owner-only (it holds password hashes); SQLite gives its -wal and -shm files the same mode.
            with contextlib.suppress(FileExistsError):
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        self.engine: Engine = open_engine(url, self.db, metadata, meta, "users", STORE_FORMAT, "a labeling store",
                                          on_connect=_connect_sqlite, on_begin=_begin_sqlite, write=True)
        self.writer = self.engine.execution_options(write=True)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def write(self) -> Iterator[Connection]:
        with self.writer.begin() as conn:
            yield conn

    def token_hash(self, token: str) -> str:
        return hmac.new(self.secret, token.encode(), hashlib.sha256).hexdigest()

    # -- audit ------------------------------------------------------------------------------------------------

    def log(self, conn: Connection, actor: str, action: str, **detail: Any) -> None:
        conn.execute(insert(audit).values(at=time.time(), actor=actor, action=action, detail=_dumps(detail)))

    def audit_log(self, limit: int = 100) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(audit).order_by(audit.c.id.desc()).limit(limit)).all()
        return [{"at": utc_time(r.at), "actor": r.actor, "action": r.action, "detail": _loads(r.detail)} for r in rows]

    # -- accounts ---------------------------------------------------------------------------------------------

    def create_invite(self, name: str, role: str, actor: str, ttl_s: float = INVITE_S) -> str:
        """A one-use token that lets `name` choose a password and become a `role`; the token is returned once."""
        name = name.strip()
        if not name or len(name) > 64 or any(c.isspace() for c in name):
            raise UserError(f"--name: expected a user name of 1-64 characters without spaces, got {name!r}")
        if role not in ROLES:
            raise UserError(f"--role: expected one of {', '.join(ROLES)}, got {role!r}")
        token = secrets.token_urlsafe(24)
        with self.write() as conn:
            if conn.execute(select(users.c.id).where(users.c.name == name)).first():
                raise UserError(f"--name: a user named {name!r} exists already")
            now = time.time()
            conn.execute(insert(invites).values(token_hash=self.token_hash(token), name=name, role=role,
                                                created_by=actor, created_at=now, expires_at=now + ttl_s))
            self.log(conn, actor, "invite", name=name, role=role)
        return token

    def invite(self, token: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(invites).where(invites.c.token_hash == self.token_hash(token))).first()
        if row is None or row.used_at is not None or row.expires_at < time.time():
            return None
        return {"name": row.name, "role": row.role}

    def accept_invite(self, token: str, password_hash: str) -> str:
        """Create the invited account (the invite is used up); returns the user id."""
        with self.write() as conn:
            row = conn.execute(select(invites).where(invites.c.token_hash == self.token_hash(token))).first()
            now = time.time()
            if row is None or row.used_at is not None or row.expires_at < now:
                raise NotFound("invite")
            if conn.execute(select(users.c.id).where(users.c.name == row.name)).first():
                raise NotFound("invite")
            uid = new_id()
            conn.execute(insert(users).values(id=uid, name=row.name, role=row.role, password_hash=password_hash,
                                              created_at=now, active=True))
            conn.execute(update(invites).where(invites.c.token_hash == row.token_hash).values(used_at=now))
            self.log(conn, row.name, "accept_invite", role=row.role)
        return uid

    def user_by_name(self, name: str) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(select(users).where(users.c.name == name, users.c.active.is_(True))).first()

    def set_password_hash(self, uid: str, password_hash: str) -> None:
        with self.write() as conn:
            conn.execute(update(users).where(users.c.id == uid).values(password_hash=password_hash))

    def create_session(self, uid: str, ttl_s: float = SESSION_S) -> str:
        token = secrets.token_urlsafe(32)
        with self.write() as conn:
            now = time.time()
            conn.execute(sessions.delete().where(sessions.c.expires_at < now))
            conn.execute(insert(sessions).values(token_hash=self.token_hash(token), user_id=uid,
                                                 expires_at=now + ttl_s))
        return token

    def session_user(self, token: str) -> Any:
        """The (id, name, role) of a live session's active user, or None (remembered for SESSION_CACHE_S)."""
        key, now = self.token_hash(token), time.time()
        hit = self._sessions.get(key)
        if hit is not None and now - hit[0] < SESSION_CACHE_S:
            return hit[1]
        with self.engine.connect() as conn:
            user = conn.execute(Q_SESSION, {"th": key, "now": now}).first()
        if len(self._sessions) > 100_000:
            self._sessions.clear()
        if user is not None:
            self._sessions[key] = (now, user)
        return user

    def end_session(self, token: str) -> None:
        key = self.token_hash(token)
        self._sessions.pop(key, None)
        with self.write() as conn:
            conn.execute(sessions.delete().where(sessions.c.token_hash == key))

    # -- batches ----------------------------------------------------------------------------------------------

    def create_batch(self, name: str, kind: str, items: list[dict[str, Any]], *, overlap: int, source: str,
                     actor: str, instructions: str = "", screening: dict[str, float] | None = None) -> str:
        """A batch of tasks; each item is {"prompt", "payload", "hidden", "author", "gold"} (task_item builds it).
        With `screening` ({metric: pass threshold}) the batch is a screening test (mark_screening)."""
        if kind not in KINDS:
            raise UserError(f"--kind: expected one of {', '.join(KINDS)}, got {kind!r}")
        if not 1 <= overlap <= MAX_OVERLAP:
            raise UserError(f"--overlap: expected 1 to {MAX_OVERLAP} labelers per task, got {overlap}")
        if not items:
            raise UserError(f"{source}: no tasks to create")
        if screening is not None:
            check_screening(kind, screening, [it.get("gold") for it in items])
        bid = new_id()
        with self.write() as conn:
            conn.execute(insert(batches).values(id=bid, name=name, kind=kind, overlap=overlap, active=True,
                                                source=source, instructions=instructions, created_by=actor,
                                                created_at=time.time()))
            rows = [{"id": new_id(), "batch_id": bid, "seq": i, "prompt": _dumps(it["prompt"]),
                     "payload": _dumps(it["payload"]), "hidden": _dumps(it.get("hidden") or {}),
                     "author": None if screening is not None else it.get("author"),  # a test is taken whole
                     "gold": None if it.get("gold") is None else _dumps(it["gold"])}
                    for i, it in enumerate(items)]
            for start in range(0, len(rows), 2000):
                conn.execute(insert(tasks), rows[start : start + 2000])
            self.log(conn, actor, "create_batch", batch=bid, name=name, kind=kind, tasks=len(rows), overlap=overlap,
                     source=source, gold=sum(it.get("gold") is not None for it in items))
            if screening is not None:
                self._mark_screening(conn, bid, kind, screening, actor)
        return bid

    def mark_screening(self, bid: str, thresholds: dict[str, float], actor: str) -> None:
        """Make a batch that nobody has labeled yet a screening (qualification) test with these pass thresholds
        (SCREENING_METRICS); every task must have a gold answer, except demonstrations (an admin reviews them).
        Every candidate takes every task, whoever wrote its prompt."""
        with self.write() as conn:
            row = conn.execute(select(batches.c.kind).where(batches.c.id == bid)).first()
            if row is None:
                raise NotFound("batch")
            if conn.execute(select(screenings.c.batch_id).where(screenings.c.batch_id == bid)).first():
                raise UserError("this batch is a screening batch already")
            if conn.execute(select(func.count()).select_from(labels.join(tasks, tasks.c.id == labels.c.task_id))
                            .where(tasks.c.batch_id == bid)).scalar():
                raise UserError("this batch has labels already: make a new batch for the screening")
            golds = [None if g is None else _loads(g) for g in
                     conn.execute(select(tasks.c.gold).where(tasks.c.batch_id == bid)).scalars()]
            check_screening(row.kind, thresholds, golds)
            conn.execute(update(tasks).where(tasks.c.batch_id == bid).values(author=None))
            self._mark_screening(conn, bid, row.kind, thresholds, actor)

    def _mark_screening(self, conn: Connection, bid: str, kind: str, thresholds: dict[str, float], actor: str) -> None:
        conn.execute(insert(screenings).values(batch_id=bid, thresholds=_dumps(thresholds), created_by=actor,
                                               created_at=time.time()))
        self.log(conn, actor, "mark_screening", batch=bid, kind=kind, thresholds=thresholds)

    def update_batch(self, bid: str, actor: str, *, overlap: int | None = None, active: bool | None = None) -> None:
        values: dict[str, Any] = {}
        if overlap is not None:
            if not 1 <= overlap <= MAX_OVERLAP:
                raise UserError(f"overlap: expected 1 to {MAX_OVERLAP}, got {overlap}")
            values["overlap"] = overlap
        if active is not None:
            values["active"] = active
        with self.write() as conn:
            if conn.execute(update(batches).where(batches.c.id == bid).values(**values)).rowcount != 1:
                raise NotFound("batch")
            if overlap is not None:
                conn.execute(update(tasks).where(tasks.c.batch_id == bid).values(open=tasks.c.taken < overlap))
            self.log(conn, actor, "update_batch", batch=bid, **values)

    def batch_list(self) -> list[dict[str, Any]]:
        """Every batch with its progress: tasks, labels done, labels needed (tasks x overlap), skips. A screening
        batch needs nothing (every candidate takes all of it): its `screening` holds the pass thresholds."""
        with self.engine.connect() as conn:
            n_tasks = dict(conn.execute(select(tasks.c.batch_id, func.count()).group_by(tasks.c.batch_id)).all())
            done = dict(conn.execute(select(tasks.c.batch_id, func.count()).select_from(
                labels.join(tasks, tasks.c.id == labels.c.task_id)).group_by(tasks.c.batch_id)).all())
            skipped = dict(conn.execute(select(tasks.c.batch_id, func.count()).select_from(
                assignments.join(tasks, tasks.c.id == assignments.c.task_id)).where(
                assignments.c.status == "skipped").group_by(tasks.c.batch_id)).all())
            tests = {b: _loads(t) for b, t in conn.execute(select(screenings.c.batch_id, screenings.c.thresholds))}
            rows = conn.execute(select(batches).order_by(batches.c.created_at)).all()
        out = []
        for b in rows:
            needed = done.get(b.id, 0) if b.id in tests else n_tasks.get(b.id, 0) * b.overlap
            out.append({"id": b.id, "name": b.name, "kind": b.kind, "overlap": b.overlap, "active": b.active,
                        "source": b.source, "created_at": utc_time(b.created_at), "tasks": n_tasks.get(b.id, 0),
                        "labels": done.get(b.id, 0), "needed": needed, "skipped": skipped.get(b.id, 0),
                        "remaining": max(0, needed - done.get(b.id, 0)), "instructions": b.instructions,
                        "screening": tests.get(b.id)})
        return out

    # -- assignment -------------------------------------------------------------------------------------------

    def next_assignment(self, user: Any, batch_id: str | None = None, lease_s: float = 1800,
                        now: float | None = None) -> str | None:
        """The user's live lease, else a new lease on the first task that still needs a labeler.

        A task needs a labeler while its live leases plus labels (`taken`) are fewer than the batch's overlap
        (`open`). The user never gets a task they did or skipped, nor one whose prompt they wrote. Leases that
        ran out are reclaimed first, so abandoned tasks go back to the queue. The open tasks are an index range,
        so finding work costs the same with a thousand labels done or a million.
        """
        with self.write() as conn:
            return self._next(conn, user, batch_id, lease_s, time.time() if now is None else now)

    def assignment(self, user: Any, aid: str) -> dict[str, Any]:
        """What the labeler sees of their assignment (responses in the shown order, no model names)."""
        with self.engine.connect() as conn:
            return self._view(conn, user, aid)

    def submit(self, user: Any, aid: str, answer: dict[str, Any], now: float | None = None) -> tuple[str, bool]:
        """Store the label in one transaction; returns (label id, whether it was stored before).

        The answer is in the shown order and is stored in the task's order. A repeat (double click, retry) of
        a submitted assignment returns the first label unchanged. A late submission after the lease expired is
        still stored: a label is never thrown away.
        """
        with self.write() as conn:
            return self._submit(conn, user, aid, answer, time.time() if now is None else now)

    def submit_then_next(self, user: Any, aid: str, answer: dict[str, Any], lease_s: float = 1800
                         ) -> tuple[str, bool, dict[str, Any] | None]:
        """submit() and then next_assignment() with its view, in one transaction (one round trip per task)."""
        now = time.time()
        with self.write() as conn:
            label_id, duplicate = self._submit(conn, user, aid, answer, now)
            following = self._next(conn, user, None, lease_s, now)
            return label_id, duplicate, None if following is None else self._view(conn, user, following)

    def _next(self, conn: Connection, user: Any, batch_id: str | None, lease_s: float, now: float) -> str | None:
        allowed = self._allowed(conn, user)[1]
        for aid, bid in conn.execute(Q_LIVE, {"user": user.id, "now": now}).all():
            if bid in allowed and (batch_id is None or bid == batch_id):
                return aid
        if not 0 <= now - self._reclaimed_at < RECLAIM_S:
            self._reclaimed_at = now
            for aid, tid in conn.execute(Q_EXPIRED, {"now": now}).all():
                conn.execute(U_STATUS, {"a_id": aid, "new_status": "expired"})
                conn.execute(U_COUNT, {"t_id": tid, "delta": -1})
        row = kind = None
        for bid, (batch_kind, screening) in allowed.items():
            if batch_id is not None and bid != batch_id:
                continue
            query = Q_SCREEN_CANDIDATE if screening else Q_CANDIDATE
            row = conn.execute(query, {"batch": bid, "user": user.id, "name": user.name}).first()
            if row is not None:
                kind = batch_kind
                break
        if row is None:
            return None
        shown = list(range(_n_options(kind, _loads(row.payload))))
        _RANDOM.shuffle(shown)  # order randomised per labeler: hides position and model identity
        conn.execute(U_COUNT, {"t_id": row.id, "delta": 1})
        if row.old:  # the user's own expired lease of this task: lease it again
            conn.execute(U_LEASE, {"a_id": row.old, "new_shown": _dumps(shown), "new_at": now,
                                   "new_until": now + lease_s})
            return row.old
        aid = new_id()
        conn.execute(I_ASSIGNMENT, {"id": aid, "task_id": row.id, "user_id": user.id, "status": "leased",
                                    "shown": _dumps(shown), "leased_at": now, "expires_at": now + lease_s})
        return aid

    @staticmethod
    def _allowed(conn: Connection, user: Any) -> tuple[str, dict[str, tuple[str, bool]]]:
        """(the user's screening state, the active batches they may work on: id -> (kind, is screening)).

        States: "open" (no active screening batch, or an admin: everything), "screening" (the screening batches
        not yet taken), "review" (all taken; demonstrations wait for an admin's review: nothing), "failed"
        (failed an active screening batch: nothing), "qualified" (passed every one: the production batches).
        """
        active = {bid: (kind, thresholds is not None) for bid, kind, thresholds in conn.execute(Q_ACTIVE)}
        tests = [bid for bid, (_, screening) in active.items() if screening]
        if not tests or user.role == "admin":
            return "open", active
        status = dict(conn.execute(Q_QUALIFIED, {"user": user.id}).all())
        if any(status.get(bid) == "failed" for bid in tests):
            return "failed", {}
        if all(status.get(bid) == "passed" for bid in tests):
            return "qualified", {bid: v for bid, v in active.items() if not v[1]}
        left = {bid: active[bid] for bid in tests if bid not in status}
        return ("screening" if left else "review"), left

    def qualification(self, user: Any) -> str:
        """The user's screening state (see _allowed): open, screening, review, failed or qualified."""
        with self.engine.connect() as conn:
            return self._allowed(conn, user)[0]

    @staticmethod
    def _view(conn: Connection, user: Any, aid: str) -> dict[str, Any]:
        row = conn.execute(Q_VIEW, {"aid": aid, "user": user.id}).first()
        if row is None:
            raise NotFound("assignment")
        answer = _loads(conn.execute(Q_LABEL, {"aid": aid}).first().answer) if row.status == "done" else None
        payload, shown = _loads(row.payload), _loads(row.shown)
        view: dict[str, Any] = {"id": row.id, "kind": row.kind, "batch": row.batch_id, "batch_name": row.batch_name,
                                "instructions": row.instructions, "status": row.status,
                                "prompt": prompt_messages(_loads(row.prompt)), "expires_at": utc_time(row.expires_at)}
        if row.kind == "ranking":
            view["responses"] = [payload["responses"][i] for i in shown]
        elif row.kind == "comparison":
            view["a"], view["b"] = (payload["a"], payload["b"]) if shown == [0, 1] else (payload["b"], payload["a"])
        elif row.kind == "rating":
            view["response"] = payload["response"]
        if answer is not None:
            view["answer"] = to_shown(row.kind, answer, shown)
        return view

    def _submit(self, conn: Connection, user: Any, aid: str, answer: dict[str, Any], now: float) -> tuple[str, bool]:
        row = conn.execute(Q_SUBMIT, {"aid": aid, "user": user.id}).first()
        if row is None:
            raise NotFound("assignment")
        if row.status == "done":
            return conn.execute(Q_LABEL, {"aid": aid}).first().id, True
        stored = check_answer(row.kind, _loads(row.prompt), _loads(row.payload), _loads(row.shown), answer)
        if row.status != "leased":  # a late label (lease expired, or skipped first): it counts again
            conn.execute(U_COUNT, {"t_id": row.task_id, "delta": 1})
        lid = new_id()
        try:
            with conn.begin_nested() if not self.is_sqlite else _nothing():
                conn.execute(I_LABEL, {"id": lid, "assignment_id": aid, "task_id": row.task_id, "user_id": user.id,
                                       "answer": _dumps(stored), "created_at": now,
                                       "seconds": max(0.0, now - row.leased_at)})
        except IntegrityError:  # a concurrent duplicate won the race (only possible off SQLite)
            return conn.execute(Q_LABEL, {"aid": aid}).first().id, True
        conn.execute(U_STATUS, {"a_id": aid, "new_status": "done"})
        if row.thresholds is not None:
            self._decide(conn, user.id, user.name, row.batch_id, row.kind, _loads(row.thresholds), "screening", now)
        return lid, False

    def skip(self, user: Any, aid: str, reason: str) -> None:
        """Give the task back with a reason; it goes to another labeler and never comes back to this one. In a
        screening batch a skipped task scores as a wrong answer."""
        reason = reason.strip()
        if not reason:
            raise BadAnswer("reason: expected why the task is skipped")
        with self.write() as conn:
            row = conn.execute(select(assignments.c.status, assignments.c.task_id, tasks.c.batch_id, batches.c.kind,
                                      screenings.c.thresholds)
                               .join(tasks, tasks.c.id == assignments.c.task_id)
                               .join(batches, batches.c.id == tasks.c.batch_id)
                               .outerjoin(screenings, screenings.c.batch_id == batches.c.id)
                               .where(assignments.c.id == aid, assignments.c.user_id == user.id)).first()
            if row is None:
                raise NotFound("assignment")
            if row.status == "done":
                raise Conflict("this task is done already: its label is kept and it cannot be skipped")
            if row.status in ("leased", "expired"):
                conn.execute(update(assignments).where(assignments.c.id == aid).values(
                    status="skipped", skip_reason=reason[:2000]))
                if row.status == "leased":
                    conn.execute(U_COUNT, {"t_id": row.task_id, "delta": -1})
                if row.thresholds is not None:
                    self._decide(conn, user.id, user.name, row.batch_id, row.kind, _loads(row.thresholds),
                                 "screening", time.time())

    def user_summary(self, user: Any) -> tuple[str, list[dict[str, Any]]]:
        """The user's screening state (qualification) and, per batch they may work on, how many they did and
        how many are left (for the home page; in a screening batch, the tasks left to them)."""
        with self.engine.connect() as conn:
            state, allowed = self._allowed(conn, user)
            mine = dict(conn.execute(select(tasks.c.batch_id, func.count()).select_from(
                assignments.join(tasks, tasks.c.id == assignments.c.task_id)).where(
                assignments.c.user_id == user.id, assignments.c.status.in_(("done", "skipped")))
                .group_by(tasks.c.batch_id)).all())
        out = []
        for b in self.batch_list():
            if b["id"] in allowed:
                left = b["tasks"] - mine.get(b["id"], 0) if b["screening"] else b["remaining"]
                out.append({**b, "mine": mine.get(b["id"], 0), "remaining": left})
        return state, out

    # -- screening ------------------------------------------------------------------------------------------------

    def _decide(self, conn: Connection, user_id: str, name: str, bid: str, kind: str, thresholds: dict[str, float],
                actor: str, now: float) -> None:
        """Once a candidate has done (or skipped) every task of a screening batch: passed or failed, logged. With
        demonstrations not yet reviewed by an admin the state is "review" until the last review."""
        found = conn.execute(select(qualifications.c.status).where(qualifications.c.batch_id == bid,
                                                                   qualifications.c.user_id == user_id)).scalar()
        if found in ("passed", "failed"):
            return
        progress = screening_scores(kind, self._screening_items(conn, bid, user_id))
        if not progress["complete"]:
            return
        status = "review" if progress["pending_reviews"] else (
            "passed" if passes(progress["scores"], thresholds) else "failed")
        values = {"status": status, "scores": _dumps(progress["scores"]), "decided_at": now, "decided_by": actor}
        if found is None:
            conn.execute(insert(qualifications).values(batch_id=bid, user_id=user_id, **values))
        else:
            conn.execute(update(qualifications).where(qualifications.c.batch_id == bid,
                                                      qualifications.c.user_id == user_id).values(**values))
        if status != "review":
            self.log(conn, actor, "screening", batch=bid, labeler=name, passed=status == "passed",
                     scores=progress["scores"], thresholds=thresholds)

    @staticmethod
    def _screening_items(conn: Connection, bid: str, user_id: str) -> list[dict[str, Any]]:
        """Per task of the batch: its gold, the user's assignment status, answer and the admin's review score."""
        mine = (select(assignments.c.task_id, assignments.c.status, labels.c.id.label("label_id"), labels.c.answer,
                       reviews.c.score).select_from(assignments.outerjoin(labels, labels.c.assignment_id ==
                                                                          assignments.c.id)
                                                    .outerjoin(reviews, reviews.c.label_id == labels.c.id))
                .where(assignments.c.user_id == user_id).subquery())
        rows = conn.execute(select(tasks.c.id, tasks.c.gold, mine.c.status, mine.c.label_id, mine.c.answer,
                                   mine.c.score).select_from(tasks.outerjoin(mine, mine.c.task_id == tasks.c.id))
                            .where(tasks.c.batch_id == bid).order_by(tasks.c.seq)).all()
        return [{"task_id": r.id, "gold": None if r.gold is None else _loads(r.gold), "status": r.status,
                 "label_id": r.label_id, "answer": None if r.answer is None else _loads(r.answer), "review": r.score}
                for r in rows]

    def review(self, label_id: str, score: int, actor: str) -> None:
        """An admin's 1-7 score of a demonstration written in a screening batch (InstructGPT's scale); the last
        review of a candidate's demonstrations decides their screening. A decided screening is not reopened."""
        if not isinstance(score, int) or isinstance(score, bool) or not 1 <= score <= 7:
            raise BadAnswer("score: expected an integer from 1 to 7")
        with self.write() as conn:
            row = conn.execute(select(labels.c.user_id, users.c.name, tasks.c.batch_id, batches.c.kind,
                                      screenings.c.thresholds, qualifications.c.status)
                               .join(users, users.c.id == labels.c.user_id).join(tasks, tasks.c.id == labels.c.task_id)
                               .join(batches, batches.c.id == tasks.c.batch_id)
                               .join(screenings, screenings.c.batch_id == batches.c.id)
                               .outerjoin(qualifications, (qualifications.c.batch_id == batches.c.id)
                                          & (qualifications.c.user_id == labels.c.user_id))
                               .where(labels.c.id == label_id, batches.c.kind == "demonstration")).first()
            if row is None:
                raise NotFound("demonstration of a screening batch")
            if row.status in ("passed", "failed"):
                raise Conflict(f"{row.name}'s screening is decided already ({row.status})")
            now = time.time()
            if conn.execute(update(reviews).where(reviews.c.label_id == label_id).values(
                    score=score, reviewer=actor, at=now)).rowcount == 0:
                conn.execute(insert(reviews).values(label_id=label_id, score=score, reviewer=actor, at=now))
            self.log(conn, actor, "review", label=label_id, labeler=row.name, score=score)
            self._decide(conn, row.user_id, row.name, row.batch_id, row.kind, _loads(row.thresholds), actor, now)

    def pending_reviews(self) -> list[dict[str, Any]]:
        """Demonstrations of screening batches that no admin has scored yet, oldest first."""
        query = (select(labels.c.id, labels.c.answer, labels.c.created_at, users.c.name, batches.c.name.label("batch"))
                 .join(users, users.c.id == labels.c.user_id).join(tasks, tasks.c.id == labels.c.task_id)
                 .join(batches, batches.c.id == tasks.c.batch_id)
                 .join(screenings, screenings.c.batch_id == batches.c.id)
                 .outerjoin(reviews, reviews.c.label_id == labels.c.id)
                 .where(batches.c.kind == "demonstration", reviews.c.label_id.is_(None))
                 .order_by(labels.c.created_at))
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [{"label_id": r.id, "labeler": r.name, "batch": r.batch, "messages": _loads(r.answer)["messages"],
                 "created_at": utc_time(r.created_at)} for r in rows]

    def screening_report(self) -> list[dict[str, Any]]:
        """Per screening batch: its thresholds and every candidate's progress, scores and decision."""
        out = []
        with self.engine.connect() as conn:
            tests = conn.execute(select(batches.c.id, batches.c.name, batches.c.kind, batches.c.active,
                                        screenings.c.thresholds)
                                 .join(screenings, screenings.c.batch_id == batches.c.id)
                                 .order_by(batches.c.created_at)).all()
            for t in tests:
                thresholds = _loads(t.thresholds)
                people = conn.execute(select(users.c.id, users.c.name).distinct()
                                      .join(assignments, assignments.c.user_id == users.c.id)
                                      .join(tasks, tasks.c.id == assignments.c.task_id)
                                      .where(tasks.c.batch_id == t.id).order_by(users.c.name)).all()
                decided = {r.user_id: r for r in conn.execute(select(qualifications).where(
                    qualifications.c.batch_id == t.id))}
                candidates = {}
                for uid, name in people:
                    progress = screening_scores(t.kind, self._screening_items(conn, t.id, uid))
                    d = decided.get(uid)
                    candidates[name] = {**progress, "status": d.status if d else "in progress",
                                        "decided_at": utc_time(d.decided_at) if d else None,
                                        "decided_by": d.decided_by if d else None}
                out.append({"id": t.id, "name": t.name, "kind": t.kind, "active": t.active, "thresholds": thresholds,
                            "candidates": candidates})
        return out

    # -- reading labels back ----------------------------------------------------------------------------------

    def label_rows(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Every label with its task and labeler, in submission order (`screening`: from a screening batch)."""
        query = (select(labels.c.id, labels.c.answer, labels.c.created_at, labels.c.seconds, labels.c.task_id,
                        users.c.name.label("labeler"), tasks.c.prompt, tasks.c.payload, tasks.c.hidden, tasks.c.gold,
                        batches.c.kind, batches.c.name.label("batch"), screenings.c.batch_id.label("screening"))
                 .join(users, users.c.id == labels.c.user_id).join(tasks, tasks.c.id == labels.c.task_id)
                 .join(batches, batches.c.id == tasks.c.batch_id)
                 .outerjoin(screenings, screenings.c.batch_id == batches.c.id)
                 .order_by(labels.c.created_at, labels.c.id))
        if kind is not None:
            query = query.where(batches.c.kind == kind)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [{"id": r.id, "answer": _loads(r.answer), "created_at": r.created_at, "seconds": r.seconds,
                 "task_id": r.task_id, "labeler": r.labeler, "prompt": _loads(r.prompt), "payload": _loads(r.payload),
                 "hidden": _loads(r.hidden), "gold": None if r.gold is None else _loads(r.gold), "kind": r.kind,
                 "batch": r.batch, "screening": r.screening is not None} for r in rows]

    def labeler_names(self) -> list[str]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(users.c.name).where(users.c.role == "labeler").order_by(users.c.name))
                        .scalars())


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _n_options(kind: str, payload: dict[str, Any]) -> int:
    return {"ranking": lambda: len(payload["responses"]), "comparison": lambda: 2}.get(kind, lambda: 1)()


# -- answers: shown order <-> task order ---------------------------------------------------------------------------


def dense(ranks: list[int]) -> list[int]:
    """Ranks renumbered 1, 2, ... keeping order and ties ([1, 3, 3, 7] -> [1, 2, 2, 3])."""
    levels = {r: i + 1 for i, r in enumerate(sorted(set(ranks)))}
    return [levels[r] for r in ranks]


def check_answer(kind: str, prompt: Any, payload: dict[str, Any], shown: list[int],
                 answer: dict[str, Any]) -> dict[str, Any]:
    """Validate an answer given in the shown order; return it in the task's order, as stored."""
    if not isinstance(answer, dict):
        raise BadAnswer("expected an object")
    if kind == "ranking":
        k = len(payload["responses"])
        none = answer.get("none_acceptable", False) is True
        ranks = answer.get("ranks")
        if ranks is None and none:
            return {"ranks": None, "none_acceptable": True}
        if (not isinstance(ranks, list) or len(ranks) != k
                or not all(isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= k for r in ranks)):
            raise BadAnswer(f"ranks: expected {k} integers from 1 (best) to {k}, one per response; equal = tie")
        ordered = [0] * k
        for position, task_index in enumerate(shown):
            ordered[task_index] = ranks[position]
        return {"ranks": dense(ordered), "none_acceptable": none}
    if kind == "comparison":
        winner = answer.get("winner")
        if winner not in ("a", "b", "tie"):
            raise BadAnswer("winner: expected 'a', 'b' or 'tie'")
        if winner != "tie" and shown == [1, 0]:
            winner = "b" if winner == "a" else "a"
        return {"winner": winner}
    if kind == "rating":
        likert = answer.get("likert")
        if not isinstance(likert, int) or isinstance(likert, bool) or not 1 <= likert <= 7:
            raise BadAnswer("likert: expected an integer from 1 to 7")
        flags = answer.get("flags", [])
        named = list(flags) if isinstance(flags, dict) else flags  # {"name": true/false} or ["name", ...]
        if (not isinstance(named, list) or not all(isinstance(f, str) for f in named)
                or isinstance(flags, dict) and not all(isinstance(on, bool) for on in flags.values())):
            raise BadAnswer(f"flags: expected a list of names from {', '.join(LABEL_FLAGS)}")
        unknown = sorted({f for f in named if f not in LABEL_FLAGS})
        if unknown:
            raise BadAnswer(f"flags: unknown {', '.join(map(repr, unknown))} (expected names from "
                            f"{', '.join(LABEL_FLAGS)})")
        if isinstance(flags, dict):
            flags = [name for name, on in flags.items() if on]
        return {"likert": likert, "flags": sorted(set(flags))}
    if kind == "demonstration":
        text = answer.get("answer")
        turns = answer.get("turns", [])
        if not isinstance(text, str) or not text.strip():
            raise BadAnswer("answer: expected the assistant's answer")
        if not isinstance(turns, list) or len(turns) % 2 or not all(isinstance(t, str) and t.strip() for t in turns):
            raise BadAnswer("turns: expected follow-up pairs of non-empty (user, assistant) messages")
        messages = [*prompt_messages(prompt), {"role": "assistant", "content": text.strip()}]
        messages += [{"role": ("user", "assistant")[i % 2], "content": t.strip()} for i, t in enumerate(turns)]
        try:
            validate_demonstration({"messages": messages}, "answer")
        except UserError as e:
            raise BadAnswer(str(e)) from None
        return {"messages": messages}
    raise BadAnswer(f"unknown task kind {kind!r}")


def to_shown(kind: str, stored: dict[str, Any], shown: list[int]) -> dict[str, Any]:
    """A stored answer as the labeler gave it (the inverse of check_answer's reordering)."""
    if kind == "ranking" and stored.get("ranks") is not None:
        return {**stored, "ranks": [stored["ranks"][i] for i in shown]}
    if kind == "comparison" and stored["winner"] != "tie" and shown == [1, 0]:
        return {"winner": "b" if stored["winner"] == "a" else "a"}
    return stored


# -- building tasks -------------------------------------------------------------------------------------------------


def task_item(kind: str, record: dict[str, Any], where: str) -> dict[str, Any]:
    """A task from one input record: {"prompt"} (demonstration), {"prompt", "responses"} (ranking),
    {"prompt", "response"} (rating), {"prompt", "a", "b"} (comparison); optional "user_id" (the prompt's
    author), "model"/"models", "gold" (the known answer, task order) and "id"."""
    if not isinstance(record.get("prompt"), (str, list)):
        raise UserError(f"{where}: field 'prompt': missing (expected text or a list of messages)")
    validate_prompt_value(record["prompt"], where)
    hidden = {k: record[k] for k in ("model", "models", "compare", "ended", "sampling", "id", "category", "source")
              if k in record}
    if kind == "demonstration":
        payload: dict[str, Any] = {}
    elif kind == "ranking":
        responses = record.get("responses")
        if not isinstance(responses, list) or not K_MIN <= len(responses) <= K_MAX or not all(
                isinstance(r, str) for r in responses):
            raise UserError(f"{where}: field 'responses': expected a list of {K_MIN}-{K_MAX} strings "
                            "(InstructGPT ranks K = 4..9)")
        # Copies of one answer are one answer to a labeler (ranking them apart would be noise): shown once.
        keep = [i for i, text in enumerate(responses) if responses.index(text) == i]
        if len(keep) < K_MIN:
            raise UserError(f"{where}: field 'responses': expected at least {K_MIN} distinct answers, got {len(keep)}")
        if len(keep) < len(responses):
            if isinstance(hidden.get("ended"), list) and len(hidden["ended"]) == len(responses):
                hidden["ended"] = [hidden["ended"][i] for i in keep]
            models = hidden.get("models")
            if isinstance(models, list) and len(models) == len(responses):  # one answer per model: the models
                # whose answer was a copy of another's are tied with that one's model
                hidden["same_answer"] = {models[i]: models[responses.index(responses[i])]
                                         for i in range(len(responses)) if i not in keep}
                hidden["models"] = [models[i] for i in keep]
            hidden["duplicates_removed"] = len(responses) - len(keep)
            responses = [responses[i] for i in keep]
        payload = {"responses": responses}
    elif kind == "rating":
        if not isinstance(record.get("response"), str):
            raise UserError(f"{where}: field 'response': expected a string")
        payload = {"response": record["response"]}
    elif kind == "comparison":
        if not isinstance(record.get("a"), str) or not isinstance(record.get("b"), str):
            raise UserError(f"{where}: fields 'a' and 'b': expected the two responses as strings")
        payload = {"a": record["a"], "b": record["b"]}
    else:
        raise UserError(f"--kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    gold = record.get("gold")
    if gold is not None:
        try:
            gold = check_answer(kind, record["prompt"], payload, list(range(_n_options(kind, payload))), gold)
        except BadAnswer as e:
            raise UserError(f"{where}: field 'gold': {e}") from None
    author = record.get("user_id")
    return {"prompt": record["prompt"], "payload": payload, "hidden": hidden,
            "author": author if isinstance(author, str) else None, "gold": gold}


# -- agreement ---------------------------------------------------------------------------------------------------


def as_ranks(kind: str, answer: dict[str, Any]) -> list[int] | None:
    """A ranking or an A/B answer as ranks in task order (A/B is K = 2); None when there is no order."""
    if kind == "ranking":
        return answer.get("ranks")
    if kind == "comparison":
        return {"a": [1, 2], "b": [2, 1], "tie": [1, 1]}[answer["winner"]]
    return None


def pair_agreement(a: list[int], b: list[int] | list[float]) -> tuple[int, int]:
    """(agreeing, comparable) response pairs: pairs both order strictly, agreeing when in the same direction."""
    agree = total = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            if a[i] == a[j] or b[i] == b[j]:
                continue
            total += 1
            agree += (a[i] < a[j]) == (b[i] < b[j])
    return agree, total


def agreement(by_task: dict[str, dict[str, list[int]]]) -> dict[str, Any]:
    """Pairwise agreement of each labeler with the others, and with the consensus of the others.

    by_task: task -> labeler -> ranks (task order). With other labelers: over every task two labelers both
    ranked, the share of response pairs both ordered strictly that they ordered the same way (InstructGPT
    reports 72.6 +- 1.5% between its labelers). With the consensus: against the mean rank the *other*
    labelers of the task gave (leave-one-out, so a labeler does not agree with themselves).
    """
    pair_counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    cons_counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    overall = [0, 0]
    for ranked in by_task.values():
        names = sorted(ranked)
        for x, u in enumerate(names):
            for v in names[x + 1 :]:
                agree, total = pair_agreement(ranked[u], ranked[v])
                for who in (u, v):
                    pair_counts[who][0] += agree
                    pair_counts[who][1] += total
                overall[0] += agree
                overall[1] += total
            others = [ranked[v] for v in names if v != u]
            if others:
                mean = [sum(r[i] for r in others) / len(others) for i in range(len(ranked[u]))]
                agree, total = pair_agreement(ranked[u], mean)
                cons_counts[u][0] += agree
                cons_counts[u][1] += total

    def share(c: list[int]) -> float | None:
        return c[0] / c[1] if c[1] else None

    labelers = sorted(set(pair_counts) | set(cons_counts))
    return {"overall": share(overall), "pairs": overall[1],
            "labelers": {u: {"with_others": share(pair_counts[u]), "with_consensus": share(cons_counts[u]),
                             "pairs": pair_counts[u][1]} for u in labelers}}


def gold_score(kind: str, answer: dict[str, Any], gold: dict[str, Any]) -> float | None:
    """How well one answer matches a gold task's known answer, in [0, 1] (None: nothing to compare)."""
    if kind in ("ranking", "comparison"):
        mine, known = as_ranks(kind, answer), as_ranks(kind, gold)
        if mine is None or known is None:
            return None
        if kind == "comparison":
            return float(mine == known)
        agree, total = pair_agreement(mine, known)
        return agree / total if total else None
    if kind == "rating":
        return float(abs(answer["likert"] - gold["likert"]) <= 1)
    return None


# -- screening ------------------------------------------------------------------------------------------------

# What a screening batch of each job measures (each candidate's scores; a threshold per metric decides):
#   ranking        share of gold's strictly ordered pairs the candidate orders the same way, per task, averaged
#   comparison     share of A/B tasks with gold's winner
#   likert         share of rated tasks with a Likert score within 1 of gold's
#   flags          flag agreement: per rated task, flags both set / flags either set (1 when neither sets any)
#   demonstration  mean 1-7 score an admin gives the candidate's demonstrations (InstructGPT screened on 6/7)
SCREENING_METRICS = {"ranking": ("ranking",), "comparison": ("comparison",), "rating": ("likert", "flags"),
                     "demonstration": ("demonstration",)}


def check_screening(kind: str, thresholds: dict[str, float], golds: list[Any]) -> None:
    """Thresholds that fit the job (shares in [0, 1]; a demonstration score in [1, 7]), and a gold answer on
    every task that needs one (a ranking's with at least one strict pair)."""
    allowed = SCREENING_METRICS[kind]
    if not thresholds:
        raise UserError(f"--screening: expected at least one pass threshold, for {kind}: "
                        + ", ".join(f"{m}=VALUE" for m in allowed))
    for metric, value in thresholds.items():
        if metric not in allowed:
            raise UserError(f"--screening: {metric!r} is not measured by a {kind} batch; expected "
                            + " or ".join(allowed))
        low, high = (1.0, 7.0) if metric == "demonstration" else (0.0, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise UserError(f"--screening: {metric}: expected a threshold from {low:g} to {high:g}, got {value!r}")
    if kind == "demonstration":
        return
    for i, gold in enumerate(golds):
        if gold is None or (kind == "ranking" and not any(a != b for a in gold["ranks"] for b in gold["ranks"])):
            raise UserError(f"--screening: task {i + 1} has no gold answer to score candidates against"
                            + (" (a ranking needs two different gold ranks)" if gold is not None else ""))


def gold_pair_share(mine: list[int], gold: list[int]) -> float:
    """Of the pairs gold orders strictly, the share `mine` orders the same way (a tie of mine counts as wrong,
    so tying everything but the easiest pair does not pass a screening)."""
    right = total = 0
    for i in range(len(gold)):
        for j in range(i + 1, len(gold)):
            if gold[i] != gold[j]:
                total += 1
                right += mine[i] != mine[j] and (mine[i] < mine[j]) == (gold[i] < gold[j])
    return right / total if total else 0.0


def flag_agreement(mine: list[str], gold: list[str]) -> float:
    """Flags both set over flags either set; 1.0 when neither sets any."""
    both, either = set(mine) & set(gold), set(mine) | set(gold)
    return len(both) / len(either) if either else 1.0


def screening_scores(kind: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    """A candidate's progress and scores on a screening batch from its items (_screening_items: per task the
    gold, the candidate's assignment status, answer and review). A skipped task scores as wrong (the lowest
    review, 1, for a demonstration); scores are means over the tasks answered or skipped so far."""
    per: dict[str, list[float]] = {m: [] for m in SCREENING_METRICS[kind]}
    done = skipped = pending = 0
    for item in items:
        status, answer, gold = item["status"], item["answer"], item["gold"]
        if status == "done":
            done += 1
        elif status == "skipped":
            skipped += 1
        else:
            continue
        if kind == "demonstration":
            if status == "skipped":
                per["demonstration"].append(1.0)
            elif item["review"] is None:
                pending += 1
            else:
                per["demonstration"].append(float(item["review"]))
        elif kind == "rating":
            per["likert"].append(0.0 if answer is None else float(abs(answer["likert"] - gold["likert"]) <= 1))
            per["flags"].append(0.0 if answer is None else flag_agreement(answer["flags"], gold.get("flags", [])))
        elif kind == "ranking":
            ranks = None if answer is None else answer.get("ranks")  # "none acceptable" without an order: wrong
            per["ranking"].append(0.0 if ranks is None else gold_pair_share(ranks, gold["ranks"]))
        else:
            per[kind].append(0.0 if answer is None else float(answer["winner"] == gold["winner"]))
    scores = {m: (sum(v) / len(v) if v else None) for m, v in per.items()}
    return {"tasks": len(items), "done": done, "skipped": skipped, "pending_reviews": pending,
            "complete": bool(items) and done + skipped == len(items), "scores": scores}


def passes(scores: dict[str, float | None], thresholds: dict[str, float]) -> bool:
    return all(scores.get(m) is not None and scores[m] >= t for m, t in thresholds.items())


# -- reports -----------------------------------------------------------------------------------------------------


@dataclass
class Report:
    batches: list[dict[str, Any]]
    labelers: dict[str, dict[str, Any]]
    agreement: dict[str, Any]
    throughput: dict[str, Any]
    screening: list[dict[str, Any]] = field(default_factory=list)
    """Per screening batch: thresholds and each candidate's scores and decision (LabelStore.screening_report)."""

    def as_json(self) -> dict[str, Any]:
        return {"batches": self.batches, "labelers": self.labelers, "agreement": self.agreement,
                "throughput": self.throughput, "screening": self.screening}


def report(store: LabelStore, now: float | None = None) -> Report:
    """Progress per batch, throughput, and per labeler: counts, speed, agreement and gold accuracy."""
    now = time.time() if now is None else now
    rows = store.label_rows()
    by_task: dict[str, dict[str, list[int]]] = defaultdict(dict)
    per: dict[str, dict[str, Any]] = {name: {"labels": 0, "last_hour": 0, "last_day": 0, "seconds": [], "gold": []}
                                      for name in store.labeler_names()}
    for r in rows:
        p = per.setdefault(r["labeler"], {"labels": 0, "last_hour": 0, "last_day": 0, "seconds": [], "gold": []})
        p["labels"] += 1
        p["last_hour"] += r["created_at"] > now - 3600
        p["last_day"] += r["created_at"] > now - 86400
        p["seconds"].append(r["seconds"])
        ranks = as_ranks(r["kind"], r["answer"])
        if ranks is not None and not r["screening"]:  # agreement of production work, not of candidates' tests
            by_task[r["task_id"]][r["labeler"]] = ranks
        if r["gold"] is not None:
            score = gold_score(r["kind"], r["answer"], r["gold"])
            if score is not None:
                p["gold"].append(score)
    agree = agreement(by_task)
    labelers = {}
    for name, p in sorted(per.items()):
        a = agree["labelers"].get(name, {})
        labelers[name] = {"labels": p["labels"], "last_hour": p["last_hour"], "last_day": p["last_day"],
                          "median_seconds": statistics.median(p["seconds"]) if p["seconds"] else None,
                          "agreement_with_others": a.get("with_others"),
                          "agreement_with_consensus": a.get("with_consensus"),
                          "gold_tasks": len(p["gold"]),
                          "gold_accuracy": sum(p["gold"]) / len(p["gold"]) if p["gold"] else None}
    day = [r for r in rows if r["created_at"] > now - 86400]
    throughput = {"labels": len(rows), "last_hour": sum(r["created_at"] > now - 3600 for r in rows),
                  "last_day": len(day), "active_labelers_last_day": len({r["labeler"] for r in day})}
    return Report(store.batch_list(), labelers, agree, throughput, store.screening_report())


def plan(labels_needed: int, per_day: float, labelers: list[int]) -> list[dict[str, Any]]:
    """Days to finish `labels_needed` labels with n labelers each doing `per_day` tasks a day."""
    if per_day <= 0:
        raise UserError(f"--per_day: expected tasks per labeler per day > 0, got {per_day}")
    return [{"labelers": n, "days": labels_needed / (n * per_day) if n > 0 else float("inf")} for n in labelers]


# -- exports ------------------------------------------------------------------------------------------------------


def export_records(store: LabelStore) -> tuple[dict[str, list[dict[str, Any]]], dict[str, int]]:
    """The labels as chatloop records, one per (task, labeler): rankings (raw, each labeler's own), the merged
    rankings (mean rank over labelers), demonstrations, ratings and comparisons; plus counts of what was left
    out (rankings marked "none acceptable" without an order)."""
    out: dict[str, list[dict[str, Any]]] = {"rankings": [], "rankings_merged": [], "demonstrations": [],
                                            "ratings": [], "comparisons": []}
    left_out = {"none_acceptable_unranked": 0, "screening": 0}
    merged: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in store.label_rows():
        if r["screening"]:  # a candidate's test, not training data (a candidate who fails it may be noisy)
            left_out["screening"] += 1
            continue
        meta = {"id": f"{r['task_id']}/{r['id']}", "labeler_id": r["labeler"], "created_at": utc_time(r["created_at"]),
                "batch": r["batch"], "task_id": r["task_id"]}
        model = r["hidden"].get("model")
        if isinstance(model, str) and model:
            meta["model"] = model
        kind, answer, prompt, payload = r["kind"], r["answer"], r["prompt"], r["payload"]
        if kind == "ranking":
            if answer["ranks"] is None:
                left_out["none_acceptable_unranked"] += 1
                continue
            record = {"prompt": prompt, "responses": payload["responses"], "ranks": answer["ranks"], **meta}
            if answer.get("none_acceptable"):
                record["none_acceptable"] = True
            if isinstance(r["hidden"].get("models"), list):  # one answer of each model (label batch --compare)
                record.update({k: r["hidden"][k] for k in ("models", "same_answer", "compare") if r["hidden"].get(k)})
            out["rankings"].append(record)
            merged[r["task_id"]].append(record)
        elif kind == "demonstration":
            out["demonstrations"].append({"messages": answer["messages"], **meta})
        elif kind == "rating":
            flags = {name: name in answer["flags"] for name in FLAGS}
            out["ratings"].append({"prompt": prompt, "response": payload["response"], "likert": answer["likert"],
                                   "flags": flags, "contains_pii": "contains_pii" in answer["flags"], **meta})
        elif kind == "comparison":
            record = {"prompt": prompt, "a": payload["a"], "b": payload["b"], "winner": answer["winner"], **meta}
            if isinstance(r["hidden"].get("models"), list):
                record.update({k: r["hidden"][k] for k in ("models", "compare") if r["hidden"].get(k)})
            out["comparisons"].append(record)
    for task_id, group in merged.items():
        k = len(group[0]["responses"])
        mean = [sum(g["ranks"][i] for g in group) / len(group) for i in range(k)]
        first = group[0]
        out["rankings_merged"].append({
            "id": task_id, "prompt": first["prompt"], "responses": first["responses"], "ranks": dense(mean),
            "labelers": [g["labeler_id"] for g in group], "batch": first["batch"],
            **({"model": first["model"]} if "model" in first else {})})
    return out, left_out
