"""The labeling database's layout: its tables, the layout version, the values some columns hold, the
statements the hot path reuses, and how an engine is opened.

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
"""

from __future__ import annotations

import contextlib
import os
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
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError

from chatloop.data.formats import FLAGS
from chatloop.data.prompts import db_url, open_engine, sqlite_pragmas
from chatloop.errors import UserError

STORE_FORMAT = "1"
KINDS = ("demonstration", "ranking", "rating", "comparison")
ROLES = ("admin", "labeler")
# The rating form asks InstructGPT's metadata questions (chatloop.data.formats.FLAGS) plus "contains PII",
# which the rating record carries as its own field `contains_pii` (FLAGS is the judge's fixed set).
LABEL_FLAGS = (*FLAGS, "contains_pii")

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


def _begin_sqlite(conn: Connection) -> None:
    # pysqlite's own transaction handling is off (isolation_level=None): we BEGIN ourselves, IMMEDIATE for
    # writers, so that assignment's read-then-write cannot interleave with another writer's.
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("write") else "BEGIN")


def _connect_sqlite(dbapi_conn: Any, record: Any) -> None:
    dbapi_conn.isolation_level = None
    sqlite_pragmas(dbapi_conn, record)
    dbapi_conn.execute("PRAGMA busy_timeout=10000")


def open_database(db: str) -> tuple[Engine, str]:
    """An engine on `db` (an SQLAlchemy URL or an SQLite path), its tables made and its layout version checked,
    and the URL as shown to people (password hidden)."""
    try:
        url = make_url(db_url(db))
    except ArgumentError as e:
        raise UserError(f"--db: not a database URL or file path: {db!r} ({e})") from None
    shown = url.render_as_string(hide_password=True)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        path = Path(url.database)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Created owner-only (it holds password hashes); SQLite gives its -wal and -shm files the same mode.
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    engine = open_engine(url, shown, metadata, meta, "users", STORE_FORMAT, "a labeling store",
                         on_connect=_connect_sqlite, on_begin=_begin_sqlite, write=True)
    return engine, shown
