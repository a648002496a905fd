"""The durable lease journal: live leases and the fencing counter in SQLite (WAL mode).

A driver buffers what a round decided (grants, heartbeats, ends) and calls ``flush`` once
per round, before it tells any client: one transaction for the whole round, so the grant
path pays one commit however many leases it grants (group commit). After a crash,
``load`` returns every live lease and the highest fencing token and action sequence ever
issued, for ``Core.restore``.

Times are stored as wall-clock times (the broker's monotonic clock starts afresh in a
new process) and converted back on load.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tangram.core.state import Core
from tangram.spec import Action, Allocation, Demand, Lease, efficiency_to_wire, parse_efficiency

SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    id TEXT PRIMARY KEY,
    fencing INTEGER NOT NULL,
    expires_wall REAL NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(slots=True)
class Restored:
    fencing: int
    seq: int
    leases: list[Lease]


class Journal:
    """``synchronous`` NORMAL (default) survives a crash of the broker process; FULL also
    survives a crash of the machine, at the price of an fsync per round."""

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: str = "NORMAL",
        mono: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError("synchronous must be NORMAL or FULL")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.executescript(SCHEMA)
        self._mono, self._wall = mono, wall
        self._grants: dict[str, Lease] = {}
        self._beats: dict[str, float] = {}
        self._ends: set[str] = set()
        self.commits = 0

    # ------------------------------------------------------------------ as an observer
    # Attached to a core (``core.observers.append(journal)``) it records every lease
    # event; the driver calls ``flush`` before it tells anyone about a grant.
    def on_grant(self, lease: Lease, now: float) -> None:
        self.grant(lease)

    def on_end(self, lease: Lease, now: float) -> None:
        self.end(lease.id)

    def on_heartbeat(self, lease: Lease, now: float) -> None:
        self.heartbeat(lease)

    def on_submit(self, action: Action, now: float) -> None:
        pass

    def on_refuse(self, action: Action, reason: str) -> None:
        pass

    def on_cancel(self, action: Action, now: float) -> None:
        pass

    def on_round(self, seconds: float, candidates: int, deferred: int) -> None:
        pass

    # ------------------------------------------------------------------ buffering
    def grant(self, lease: Lease) -> None:
        self._grants[lease.id] = lease
        self._ends.discard(lease.id)

    def heartbeat(self, lease: Lease) -> None:
        if lease.id not in self._grants:
            self._beats[lease.id] = lease.expires_at

    def end(self, lease_id: str) -> None:
        if self._grants.pop(lease_id, None) is None:
            self._ends.add(lease_id)
        self._beats.pop(lease_id, None)

    @property
    def pending(self) -> bool:
        return bool(self._grants or self._beats or self._ends)

    def flush(self) -> None:
        """Make everything buffered durable in one transaction."""
        if not self.pending:
            return
        offset = self._wall() - self._mono()
        db = self._db
        db.execute("BEGIN")
        try:
            if self._grants:
                db.executemany(
                    "INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?)",
                    [
                        (x.id, x.fencing_token, x.expires_at + offset, _dump(x, offset))
                        for x in self._grants.values()
                    ],
                )
                top = max(x.fencing_token for x in self._grants.values())
                seq = max(x.action.seq for x in self._grants.values())
                db.executemany(
                    "INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) "
                    "DO UPDATE SET value = max(value, excluded.value)",
                    [("fencing", top), ("seq", seq)],
                )
            if self._beats:
                db.executemany(
                    "UPDATE leases SET expires_wall = ? WHERE id = ?",
                    [(t + offset, i) for i, t in self._beats.items()],
                )
            if self._ends:
                db.executemany("DELETE FROM leases WHERE id = ?", [(i,) for i in self._ends])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._grants.clear()
        self._beats.clear()
        self._ends.clear()
        self.commits += 1

    # ------------------------------------------------------------------ recovery
    def load(self) -> Restored:
        """Every live lease (with times on this process's monotonic clock), the highest
        fencing token and action sequence ever recorded."""
        offset = self._wall() - self._mono()
        meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        rows = self._db.execute("SELECT body, expires_wall FROM leases ORDER BY fencing")
        leases = [_load(body, expires, offset) for body, expires in rows]
        return Restored(int(meta.get("fencing", 0)), int(meta.get("seq", 0)), leases)

    def restore_into(self, core: Core, now: float) -> list[Lease]:
        """Give a fresh core every live lease of the journal and continue its counters;
        returns the leases restored (a lease whose units no longer exist in the
        configuration is dropped from the journal, with its units)."""
        restored = self.load()
        core.resume(restored.fencing, restored.seq)
        out = []
        for lease in restored.leases:
            try:
                core.restore(lease, now)
            except ValueError:
                self.end(lease.id)
                continue
            out.append(lease)
        self.flush()
        return out

    def close(self) -> None:
        self.flush()
        self._db.close()


def _dump(lease: Lease, offset: float) -> str:
    a = lease.action
    return json.dumps(
        {
            "id": lease.id,
            "fencing_token": lease.fencing_token,
            "granted_at": lease.granted_at + offset,
            "ttl": lease.ttl,
            "allocation": {p: list(al) for p, al in lease.allocation.items()},
            "action": {
                "id": a.id,
                "seq": a.seq,
                "trajectory": a.trajectory,
                "task": a.task,
                "tenant": a.tenant,
                "idempotency_key": a.idempotency_key,
                "demands": {p: d.to_wire() for p, d in a.demands.items()},
                "key": a.key,
                "duration": a.duration,
                "efficiency": efficiency_to_wire(a.efficiency),
                "service": a.service,
                "tokens": a.tokens,
                "memory_gb": a.memory_gb,
                "ttl": a.ttl,
                "submitted_at": a.submitted_at + offset,
            },
        }
    )


def _load(body: str, expires_wall: float, offset: float) -> Lease:
    """A lease from its row; the deadline comes from its column, which heartbeats update."""
    d: dict[str, Any] = json.loads(body)
    a = d["action"]
    action = Action(
        trajectory=a["trajectory"],
        demands={p: Demand.parse(w, p) for p, w in a["demands"].items()},
        task=a["task"],
        key=a["key"],
        duration=a["duration"],
        efficiency=parse_efficiency(a["efficiency"]),
        service=a["service"],
        tokens=a["tokens"],
        memory_gb=a["memory_gb"],
        ttl=a["ttl"],
        tenant=a["tenant"],
        idempotency_key=a.get("idempotency_key"),
        id=a["id"],
        submitted_at=a["submitted_at"] - offset,
        seq=a["seq"],
    )
    alloc = {
        p: Allocation(v[0], v[1], tuple(v[2]), bool(v[3]), tuple(v[4]), bool(v[5]))
        for p, v in d["allocation"].items()
    }
    return Lease(
        id=d["id"],
        action=action,
        fencing_token=d["fencing_token"],
        allocation=alloc,
        granted_at=d["granted_at"] - offset,
        expires_at=expires_wall - offset,
        ttl=d["ttl"],
    )
