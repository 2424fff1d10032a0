"""The labeling store: LabelStore, all database work of the app and the admin verbs (accounts and sessions,
batches, assignment with leases and overlap, submissions, screening decisions and reviews, reading labels back),
and its NotFound and Conflict (a bad answer is answers.BadAnswer). The tables are chatloop.labeling.schema's.

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
import random
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from chatloop.data.formats import prompt_messages
from chatloop.errors import UserError
from chatloop.io import utc_time
from chatloop.labeling.answers import BadAnswer, check_answer, n_options, shown_payload, to_shown
from chatloop.labeling.quality import check_screening, passes, screening_scores
from chatloop.labeling.schema import (
    I_ASSIGNMENT,
    I_LABEL,
    KINDS,
    Q_ACTIVE,
    Q_CANDIDATE,
    Q_EXPIRED,
    Q_LABEL,
    Q_LIVE,
    Q_QUALIFIED,
    Q_SCREEN_CANDIDATE,
    Q_SESSION,
    Q_SUBMIT,
    Q_VIEW,
    ROLES,
    U_COUNT,
    U_LEASE,
    U_STATUS,
    assignments,
    audit,
    batches,
    invites,
    labels,
    open_database,
    qualifications,
    reviews,
    screenings,
    sessions,
    tasks,
    users,
)

DEFAULT_DB = "sqlite:///runs/label.db"
SESSION_S = 12 * 3600
RECLAIM_S = 1.0  # expired leases are looked for at most this often (a lease lasts many minutes)
SESSION_CACHE_S = 5.0  # a session lookup is reused this long (a deactivated account stops within it)
INVITE_S = 7 * 86400
MIN_PASSWORD = 10
MAX_OVERLAP = 1000  # labelers per task: far above any real overlap, and small enough for every database


class NotFound(Exception):
    """No such object for this user (also what another labeler's object looks like)."""


class Conflict(Exception):
    """An action the assignment's state no longer allows (skipping a task already done)."""


def new_id() -> str:
    return secrets.token_urlsafe(12)


_RANDOM = random.SystemRandom()
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_loads = json.loads


class LabelStore:
    """All database work of the app and the admin verbs; the web layer only parses, checks and renders."""

    def __init__(self, db: str, secret: str) -> None:
        self.engine, self.db = open_database(db)
        self.secret = secret.encode()
        self._sessions: dict[str, tuple[float, Any]] = {}  # token HMAC -> (looked up at, user): a short cache
        self._reclaimed_at = -math.inf  # when expired leases were last returned to the queue
        self.is_sqlite = self.engine.url.get_backend_name() == "sqlite"
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
        shown = list(range(n_options(kind, _loads(row.payload))))
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
        view.update(shown_payload(row.kind, payload, shown))
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
            with conn.begin_nested() if not self.is_sqlite else contextlib.nullcontext():
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
            row = conn.execute(Q_SUBMIT, {"aid": aid, "user": user.id}).first()  # the same lookup as a submission's
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
