"""The durable journal: queued actions, live leases and the id counters in SQLite (WAL
mode), with a high-water mark beside it that survives the loss of the WAL's tail.

A driver buffers what the core decided (submits, grants, heartbeats, ends, cancels) and
calls ``flush`` before it tells any client about any of it: one transaction for
everything since the last flush, so a round pays one commit however many actions it
touched (group commit). After a crash, ``restore_into`` gives a fresh core every live
lease and every queued action (with its id, idempotency key and place in the queue).

The mark file (``journal.mark``) holds what must never go backwards even if the
database loses its newest transactions (a damaged or deleted ``-wal`` file, a machine
crash under ``durability=normal``): the fencing tokens and action numbers reserved ahead
of use in blocks (fsynced before any of them is issued, as sequence allocators do), the
number of commits made, and the latest expiry of any lease ever told to a client. A
database with fewer commits than the mark says has lost some: the restored broker then
holds back every grant until that latest expiry, when every lease it may have forgotten
has lapsed, so no unit is ever held twice.

Times are stored as wall-clock times (the broker's clock, its event loop's monotonic
one, starts afresh in a new process) and converted back on load. This module never
decides anything: it only records what the core did and gives it back.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from tangram import wire
from tangram.core.state import Core
from tangram.errors import JournalError as JournalError
from tangram.errors import JournalUnavailable as JournalUnavailable
from tangram.errors import WireError
from tangram.leasing import loop_time
from tangram.spec import Action, InvalidAction, Lease

log = logging.getLogger("tangram.journal")

# Rows are keyed by the fencing token and the action number, which only grow: new rows
# land at the right edge of the B-tree and a commit touches a few pages, where random
# ids as keys would touch a page per row.
SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    fencing INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    expires_wall REAL NOT NULL,
    ttl REAL NOT NULL,
    body BLOB NOT NULL,
    state TEXT NOT NULL DEFAULT 'granted',
    ended_wall REAL
);
CREATE TABLE IF NOT EXISTS actions (seq INTEGER PRIMARY KEY, id TEXT NOT NULL, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

DURABILITY = {"normal": "NORMAL", "full": "FULL"}
BLOCK = 1024  # fencing tokens and action numbers reserved per fsync of the mark
# Ended leases are kept a while, so a release retried across a restart is still
# answered as released, not as unknown.
ENDED_KEPT_LEASES = 100_000  # the newest ended leases kept (by fencing token)
PRUNE_EVERY = 1000  # commits between two prunes of ended leases
# A mark that is gone while the database is not: tokens may have gone this far past
# the database's record, so a restart continues above it.
LOST_MARK_JUMP = 1 << 32


@dataclass(slots=True)
class Restored:
    fencing: int
    seq: int
    leases: list[Lease]
    queued: list[Action] = field(default_factory=list)
    ended: list[Lease] = field(default_factory=list)  # released or expired, kept a while
    # Wall time until which nothing may be granted: the database lost transactions, and
    # leases it forgot may be live until then. None when nothing was lost.
    hold_until: float | None = None


# --------------------------------------------------------------------------- the mark
_SLOT = struct.Struct("<QQQQdI")  # generation, fencing, seq, commits, horizon, crc32
_SLOT_SIZE = 64


@dataclass(slots=True)
class Mark:
    fencing: int = 0  # every token issued is at most this
    seq: int = 0  # every action number issued is at most this
    commits: int = 0  # commits the database has made (at least)
    horizon: float = 0.0  # no lease told to a client expires later (wall time)
    generation: int = 0


class MarkFile:
    """Two checksummed slots written in turn, so a torn write loses only the newer one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.existed = path.exists()
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self.value = self._read()

    def _read(self) -> Mark:
        best = Mark()
        for slot in range(2):
            raw = os.pread(self._fd, _SLOT.size, slot * _SLOT_SIZE)
            if len(raw) < _SLOT.size:
                continue
            gen, fencing, seq, commits, horizon, crc = _SLOT.unpack(raw)
            if zlib.crc32(raw[:-4]) != crc or gen < best.generation:
                continue
            best = Mark(fencing, seq, commits, horizon, gen)
        return best

    @property
    def valid(self) -> bool:
        return self.value.generation > 0

    def write(self, mark: Mark, *, sync: bool) -> None:
        mark.generation = self.value.generation + 1
        body = struct.pack("<QQQQd", mark.generation, mark.fencing, mark.seq, mark.commits,
                           mark.horizon)  # fmt: skip
        raw = body + struct.pack("<I", zlib.crc32(body))
        n = os.pwrite(self._fd, raw, (mark.generation % 2) * _SLOT_SIZE)
        if n != len(raw):
            raise OSError(f"short write to {self.path}")
        if sync:
            os.fsync(self._fd)
        self.value = mark

    def close(self) -> None:
        os.close(self._fd)


# --------------------------------------------------------------------------- the journal
class Journal:
    """``durability`` normal survives a crash of the broker process (SIGKILL, OOM);
    full also survives a crash of the machine, at the price of an fsync per flush.
    Either way the fencing counter never goes backwards (the mark is fsynced before a
    new block of tokens is used)."""

    def __init__(
        self,
        path: str | Path,
        *,
        durability: str = "normal",
        mono: Callable[[], float] = loop_time,  # the broker's clock
        wall: Callable[[], float] = time.time,
    ) -> None:
        if durability not in DURABILITY:
            raise ValueError(f"durability must be one of {', '.join(DURABILITY)}")
        self.path = Path(path)
        self.full = durability == "full"
        self._mono, self._wall = mono, wall
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            had_db = self.path.exists() and self.path.stat().st_size > 0
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={DURABILITY[durability]}")
            self._db.executescript(SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(leases)")}
            if "state" not in columns:
                raise JournalError(
                    f"{self.path} was written by an older Tangram (no queued actions, no "
                    "high-water mark); drain that broker and move the file away"
                )
            # A data directory that cannot be written is refused now, not at the first
            # grant: one real write through the database and the mark.
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('commits', 0)")
            self._db.execute("COMMIT")
            self.mark = MarkFile(self.path.with_name(self.path.name + ".mark"))
            self._lost_mark = had_db and not self.mark.valid
            self.mark.write(self.mark.value, sync=True)
        except (sqlite3.Error, OSError) as exc:
            raise JournalError(
                f"cannot use the journal {self.path}: {exc}; the data directory must be "
                "writable by this user and not shared with another running broker"
            ) from None
        self._submits: dict[str, Action] = {}
        # The encoded action of each action queued in the journal, reused in its lease's
        # row at grant (one encoding per action, not two).
        self._bodies: dict[str, bytes] = {}
        self._unqueued: set[int] = set()  # action numbers (seq)
        self._grants: dict[str, Lease] = {}
        # lease id -> (fencing token, expires at, ttl) and (fencing token, state, ended at)
        self._beats: dict[str, tuple[int, float, float]] = {}
        self._ends: dict[str, tuple[int, str, float]] = {}
        self._top = 0  # the highest fencing token written
        self._mark_dirty = False
        self.commits = 0
        self.failures = 0

    # ------------------------------------------------------------------ as an observer
    # Attached to a core (``core.observers.append(journal)``) it records every change a
    # client will be told about; the driver calls ``flush`` before telling anyone.
    def on_submit(self, action: Action, now: float) -> None:
        self._submits[action.id] = action

    def on_cancel(self, action: Action, now: float) -> None:
        self._unqueue(action)

    def on_grant(self, lease: Lease, now: float) -> None:
        self._unqueue(lease.action)
        self._grants[lease.id] = lease
        self._ends.pop(lease.id, None)

    def on_end(self, lease: Lease, now: float) -> None:
        self.end(lease, lease.state, now)

    def on_heartbeat(self, lease: Lease, now: float) -> None:
        if lease.id not in self._grants:
            self._beats[lease.id] = (lease.fencing_token, lease.expires_at, lease.ttl)

    def on_refuse(self, action: Action, reason: str) -> None:
        pass

    def on_round(self, seconds: float, candidates: int, deferred: int) -> None:
        pass

    def _unqueue(self, action: Action) -> None:
        # Queued and dequeued between two flushes: the row was never written.
        if self._submits.pop(action.id, None) is None:
            self._unqueued.add(action.seq)
            self._bodies.pop(action.id, None)

    def end(self, lease: Lease, state: str = "released", now: float | None = None) -> None:
        # A lease granted and ended between two flushes was never told to anyone.
        if self._grants.pop(lease.id, None) is None:
            t = self._mono() if now is None else now
            self._ends[lease.id] = (lease.fencing_token, state, t)
        self._beats.pop(lease.id, None)

    def _body(self, action: Action, offset: float) -> bytes:
        body = self._bodies[action.id] = _dump_action(action, offset)
        return body

    @property
    def pending(self) -> bool:
        return bool(
            self._submits
            or self._unqueued
            or self._grants
            or self._beats
            or self._ends
            or self._mark_dirty
        )

    # ------------------------------------------------------------------ writing
    def flush(self) -> None:
        """Make everything buffered durable in one transaction. JournalUnavailable if
        it cannot: nothing is lost, the buffer stays for the next try."""
        if not self.pending:
            return
        try:
            self._flush()
        except (sqlite3.Error, OSError) as exc:
            self.failures += 1
            raise JournalUnavailable(f"the journal {self.path} cannot write: {exc}") from None

    def _flush(self) -> None:
        offset = self._wall() - self._mono()
        mark = self.mark.value
        grants = self._grants.values()
        top = max((x.fencing_token for x in grants), default=0)
        seq = max((a.seq for a in self._submits.values()), default=0)
        if top > mark.fencing or seq > mark.seq:
            # Reserve a block ahead of use, fsynced before any of it is told.
            reserved = Mark(
                max(mark.fencing, top + BLOCK), max(mark.seq, seq + BLOCK),
                mark.commits, mark.horizon,
            )  # fmt: skip
            self.mark.write(reserved, sync=True)
            mark = reserved
        horizon = max(
            max((x.expires_at for x in grants), default=0.0),
            max((t for _, t, _ in self._beats.values()), default=0.0),
        )
        horizon = max(mark.horizon, horizon + offset) if horizon else mark.horizon
        db = self._db
        if self._submits or self._unqueued or grants or self._beats or self._ends:
            db.execute("BEGIN")
            try:
                if self._submits:
                    db.executemany(
                        "INSERT OR REPLACE INTO actions VALUES (?, ?, ?)",
                        [(a.seq, a.id, self._body(a, offset)) for a in self._submits.values()],
                    )
                if self._unqueued:
                    db.executemany(
                        "DELETE FROM actions WHERE seq = ?", [(i,) for i in self._unqueued]
                    )
                if grants:
                    db.executemany(
                        "INSERT OR REPLACE INTO leases (fencing, id, expires_wall, ttl, body) "
                        "VALUES (?, ?, ?, ?, ?)",
                        [
                            (
                                x.fencing_token,
                                x.id,
                                x.expires_at + offset,
                                x.ttl,
                                _dump_lease(x, self._bodies.pop(x.action.id, None), offset),
                            )
                            for x in grants
                        ],
                    )
                if self._beats:
                    db.executemany(
                        "UPDATE leases SET expires_wall = ?, ttl = ? WHERE fencing = ?",
                        [(t + offset, ttl, f) for f, t, ttl in self._beats.values()],
                    )
                if self._ends:
                    db.executemany(
                        "UPDATE leases SET state = ?, ended_wall = ? WHERE fencing = ?",
                        [(st, t + offset, f) for f, st, t in self._ends.values()],
                    )
                self._top = max(self._top, top)
                if self.commits % PRUNE_EVERY == 0 and self._top > ENDED_KEPT_LEASES:
                    db.execute(
                        "DELETE FROM leases WHERE fencing < ? AND state != 'granted'",
                        (self._top - ENDED_KEPT_LEASES,),
                    )
                meta = [("commits", 1)]
                if top:
                    meta.append(("fencing", top))
                if seq:
                    meta.append(("seq", seq))
                db.executemany(
                    "INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = "
                    "CASE WHEN key = 'commits' THEN value + 1 ELSE max(value, excluded.value) END",
                    meta,
                )
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            self._submits.clear()
            self._unqueued.clear()
            self._grants.clear()
            self._beats.clear()
            self._ends.clear()
            self.commits += 1
            mark = Mark(mark.fencing, mark.seq, mark.commits + 1, horizon)
            self._mark_dirty = True
        # After the commit, before anyone is told: the mark never claims a commit the
        # database did not make, and it knows every expiry a client has heard of.
        self.mark.write(mark, sync=self.full)
        self._mark_dirty = False

    # ------------------------------------------------------------------ recovery
    def load(self, max_ttl: float = 0.0) -> Restored:
        """Every live lease and queued action (times on this process's monotonic clock),
        the counters to continue above, and until when grants must wait if the database
        lost transactions (``max_ttl``: how long a forgotten lease could live when even
        the mark is gone)."""
        offset = self._wall() - self._mono()
        meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        rows = self._db.execute(
            "SELECT body, expires_wall, ttl, state, ended_wall FROM leases ORDER BY fencing"
        )
        leases, ended = [], []
        try:
            for body, expires, ttl, state, ended_wall in rows:
                lease = _load_lease(body, expires, ttl, offset)
                if state == "granted":
                    leases.append(lease)
                else:
                    lease.state = lease.outcome = state
                    lease.ended_at = ended_wall - offset
                    ended.append(lease)
            rows = self._db.execute("SELECT body FROM actions ORDER BY seq")
            queued = [wire.action_from_record(orjson.loads(body), offset) for (body,) in rows]
        except WireError as exc:
            raise JournalError(
                f"cannot read the journal {self.path}: it holds a {exc}. Restore it with "
                "the Tangram version that wrote it, or drain that broker and move the file "
                "away"
            ) from None
        mark = self.mark.value
        fencing = max(int(meta.get("fencing", 0)), mark.fencing)
        self._top = int(meta.get("fencing", 0))
        seq = max(int(meta.get("seq", 0)), mark.seq)
        hold: float | None = None
        commits = int(meta.get("commits", 0))
        if self._lost_mark:
            log.warning(
                "journal: %s has no valid mark beside it; continuing tokens far "
                "above the database's and holding grants for %g s",
                self.path,
                max_ttl,
            )
            fencing += LOST_MARK_JUMP
            seq += LOST_MARK_JUMP
            hold = self._wall() + max_ttl
        elif commits < mark.commits:
            log.warning("journal: %s lost %d of its newest transactions; holding grants "
                        "until every lease it may have forgotten has lapsed",
                        self.path, mark.commits - commits)  # fmt: skip
            hold = mark.horizon
        if commits < mark.commits or self._lost_mark:
            # From now on the database's count is the truth again.
            self._db.execute(
                "INSERT INTO meta VALUES ('commits', ?) ON CONFLICT(key) DO UPDATE "
                "SET value = excluded.value", (max(commits, mark.commits),),
            )  # fmt: skip
            self.mark.write(Mark(fencing, seq, max(commits, mark.commits), mark.horizon),
                            sync=True)  # fmt: skip
        if hold is not None and hold <= self._wall():
            hold = None
        return Restored(
            fencing, seq, leases, queued, ended, None if hold is None else hold - offset
        )

    def restore_into(self, core: Core, now: float) -> Restored:
        """Give a fresh core every live lease and queued action of the journal and
        continue its counters. A lease whose units, or an action whose pools, no longer
        exist in the configuration is dropped from the journal."""
        restored = self.load(core.lease_ttl)
        core.resume(restored.fencing, restored.seq)
        leases = []
        for lease in restored.leases:
            try:
                core.restore(lease, now)
            except ValueError:
                self.end(lease)
                continue
            leases.append(lease)
        queued = []
        for action in restored.queued:
            try:
                core.submit(action, now, restored=True)
            except InvalidAction as exc:
                log.warning("journal: dropping queued action %s: %s", action.id, exc)
                self._unqueued.add(action.seq)
                continue
            queued.append(action)
        for lease in restored.ended:
            core.remember(lease)
        restored.leases, restored.queued = leases, queued
        self.flush()
        return restored

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._db.close()
            self.mark.close()


# --------------------------------------------------------------------------- rows
# The bodies are tangram.wire's versioned records; the table layout stays as it was.
def _dump_action(a: Action, offset: float) -> bytes:
    return orjson.dumps(wire.action_record(a, offset))


def _dump_lease(lease: Lease, action: bytes | None, offset: float) -> bytes:
    """The lease's row; ``action`` is its action already encoded, if at hand."""
    head = orjson.dumps(wire.lease_record(lease, offset))
    return b"".join((head[:-1], b',"action":', action or _dump_action(lease.action, offset), b"}"))


def _load_lease(body: bytes | str, expires_wall: float, ttl: float, offset: float) -> Lease:
    """A lease from its row; the deadline and TTL come from their columns, which
    heartbeats update."""
    d: dict[str, Any] = orjson.loads(body)
    wire.check_version(d, "lease")
    if not isinstance(d.get("action"), dict):
        raise WireError("malformed lease: no action")
    action = wire.action_from_record(d["action"], offset)
    return wire.lease_from_record(d, action, expires_wall - offset, ttl, offset)
