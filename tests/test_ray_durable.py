"""The Ray broker actor journals to its data directory: SIGKILL it under load, Ray
restarts it, and clients carry on with the leases and queued actions it restored.

On a real local Ray cluster of its own (like tests/test_ray_broker.py). Without the
journal (``data_dir=None``, the old actor) the leases held at a kill are not restored
and the first check after the first kill fails.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import ray

import tangram.ray as tr
from tangram.executors.sandbox import Command
from tangram.spec import Action, Lease

NAME = "durable"
NAMESPACE = "tangram-durable"
TTL = 10.0  # longer than a restart takes: restored leases must not lapse meanwhile
CONFIG: dict[str, Any] = {
    "lease_ttl_seconds": TTL,
    "pools": {"cpu": {"kind": "cpu", "nodes": [{"name": "n0", "cores": 4, "memory_gb": 8}]}},
}
CLIENTS = 3
LOOPS = 3  # per client: 9 loops of 1 or 2 cores on 3 free cores, so actions queue
KILLS = 3


@dataclass
class Held:
    """One grant as its client saw it: held from ``start`` (the grant arrived) until
    ``end`` (release was called), a window inside the broker's own."""

    lease_id: str
    action_id: str
    token: int
    units: frozenset[tuple[str, int]]
    start: float
    end: float | None = None


@dataclass
class Kill:
    at: float
    held: list[Held]  # leases the clients held at the kill
    waiting: set[str]  # actions the clients waited for at the kill
    restored: set[str]  # lease ids the next life restored
    requeued: set[str]  # action ids the next life queued again


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def units_of(lease: Lease) -> frozenset[tuple[str, int]]:
    return frozenset((p, u) for p, a in lease.allocation.items() for u in a.units)


async def snapshot(handle: Any) -> dict[str, Any]:
    snap: dict[str, Any] = await handle.snapshot.remote()
    return snap


async def next_life(handle: Any, pid: int) -> dict[str, Any]:
    """The ping of the restarted actor (calls that reach the dying one fail)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            info: dict[str, Any] = await handle.ping.remote()
        except ray.exceptions.RayActorError:
            info = {"pid": pid}
        if info["pid"] != pid:
            return info
        assert time.monotonic() < deadline, "the broker actor did not come back"
        await asyncio.sleep(0.05)


async def until(handle: Any, ok: Any, within: float, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        snap = await snapshot(handle)
        if ok(snap):
            return snap
        assert time.monotonic() < deadline, f"{what}: {snap}"
        await asyncio.sleep(0.05)


@pytest.mark.timeout(120)
async def test_leases_and_queued_actions_survive_killed_broker_actors(
    cluster: None, tmp_path: Path
) -> None:
    data = tmp_path / "journal"
    handle = tr.start_broker(
        CONFIG,
        name=NAME,
        namespace=NAMESPACE,
        data_dir=str(data),
        max_restarts=-1,
        detached=False,
        executors=False,
    )
    clients = [tr.Client(name=NAME, namespace=NAMESPACE) for _ in range(CLIENTS)]
    records: list[Held] = []
    errors: list[str] = []
    stop = asyncio.Event()
    rng = random.Random(7)

    async def loop(client: tr.Client, traj: str) -> None:
        while not stop.is_set():
            action = Action.build(traj, {"cpu": rng.choice((1, 1, 2))})
            try:
                lease = await client.acquire(action, timeout=30)
                client.hold(lease)
                rec = Held(
                    lease.id, action.id, lease.fencing_token, units_of(lease), time.monotonic()
                )
                records.append(rec)
                await asyncio.sleep(rng.uniform(0.05, 0.4))
                if lease.id in client._lost:  # a heartbeat failed: the broker forgot it
                    errors.append(f"{traj}: lease {lease.id} lost: {client._lost[lease.id]}")
                rec.end = time.monotonic()
                await client.release(lease.id)
            except Exception as exc:
                errors.append(f"{traj}: {type(exc).__name__}: {exc}")
                return

    # One lease held across every kill: heartbeats and the final release must work.
    anchor_client = tr.Client(name=NAME, namespace=NAMESPACE)
    anchor = await anchor_client.acquire(Action.build("anchor", {"cpu": 1}))
    anchor_client.hold(anchor)
    anchored = Held(
        anchor.id, anchor.action.id, anchor.fencing_token, units_of(anchor), time.monotonic()
    )
    tasks = [
        asyncio.create_task(loop(c, f"c{i}-l{j}"))
        for i, c in enumerate(clients)
        for j in range(LOOPS)
    ]
    kills: list[Kill] = []
    started = time.monotonic()
    try:
        life = (await handle.ping.remote())["life"]
        for _ in range(KILLS):
            await asyncio.sleep(1.0)
            # Leases held and actions queued at the kill, by the broker's own count.
            await until(
                handle,
                lambda s: s["queued"] >= 2 and s["leases"] >= 3,
                10,
                "no load before the kill",
            )
            pid = (await handle.ping.remote())["pid"]
            # No await between the record and the kill: nothing changes meanwhile.
            held = [r for r in records if r.end is None]
            waiting = {a for c in clients for a in c._waiting}
            at = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            info = await next_life(handle, pid)  # Ray restarts it
            assert info["life"] != life
            life = info["life"]
            got = await handle.recovered.remote()
            kills.append(Kill(at, held, waiting, set(got["leases"]), set(got["queued"])))
            # The anchor, restored, renews and still holds its unit.
            reply = await handle.exchange.remote("probe", [], [], [anchor.id], [], 0.0)
            assert reply[2] == [], f"heartbeat of a lease held across the kill: {reply[2]}"
            assert not errors, errors
        await asyncio.sleep(1.0)  # the restored actions get granted and run
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
    anchored.end = time.monotonic()
    await anchor_client.release(anchor.id)  # raises if the broker forgot it
    for c in [*clients, anchor_client]:
        await c.aclose()
    elapsed = time.monotonic() - started
    assert not errors, errors

    # Every lease held at a kill was restored; every action queued again was one a
    # client waited for, and it was granted after the restart.
    granted_actions = {r.action_id for r in records}
    for k in kills:
        held_ids = {r.lease_id for r in k.held} | {anchor.id}
        assert held_ids <= k.restored, f"not restored: {held_ids - k.restored}"
        assert k.requeued <= k.waiting, f"queued again for nobody: {k.requeued - k.waiting}"
        assert k.requeued <= granted_actions, f"never granted: {k.requeued - granted_actions}"
    assert any(k.requeued for k in kills), "no action was queued at any kill"
    assert all(c.restarts >= 1 for c in clients)

    # Fencing tokens issued by a new life are above every token issued before the kill.
    for k in kills:
        before = [r.token for r in records if r.start < k.at or r.lease_id in k.restored]
        after = [r.token for r in records if r.start > k.at and r.lease_id not in k.restored]
        assert after, "nothing granted after a restart"
        assert min(after) > max(before)
    assert len({r.token for r in records}) == len(records)

    # No unit was ever held by two leases at once (the clients' windows lie inside the
    # broker's: a grant arrives after it is made, a release is sent before it is done).
    windows: dict[tuple[str, int], list[tuple[float, float, str]]] = defaultdict(list)
    for r in [*records, anchored]:
        assert r.end is not None
        for u in r.units:
            windows[u].append((r.start, r.end, r.lease_id))
    for u, ws in windows.items():
        ws.sort()
        for (_, end, a), (start, _, b) in itertools.pairwise(ws):
            assert end <= start, f"unit {u} held by {a} and {b} at once"

    # Every unit is free at the end.
    await until(
        handle,
        lambda s: s["leases"] == 0 and s["queued"] == 0 and s["pools"]["cpu"]["in_use"] == 0,
        5,
        "units still held at the end",
    )
    print(f"{len(records)} leases, {len(kills)} kills in {elapsed:.1f} s")
    tr.stop_broker(NAME, NAMESPACE)


async def test_a_submission_again_attaches_to_the_live_action(
    cluster: None, tmp_path: Path
) -> None:
    """What the client relies on after a restart or a failed call: submitting a live
    action id again gets its one grant; another client's submission of it is refused."""
    name = "attach"
    handle = tr.start_broker(
        CONFIG,
        name=name,
        namespace=NAMESPACE,
        data_dir=str(tmp_path),
        detached=False,
        executors=False,
    )
    try:
        big = Action.build("t", {"cpu": 4})
        big.id = "a-big"
        small = Action.build("t", {"cpu": 1})
        small.id = "a-small"
        grants, *_ = await handle.exchange.remote("a", [big], [], [], [], 0.0)
        ((aid, wire, err, _),) = grants
        assert aid == "a-big" and wire is not None and err is None
        lease_id = wire["id"]
        # Again: the same lease, not a second action (its reply may have been lost).
        grants, *_ = await handle.exchange.remote("a", [big], [], [], [], 0.0)
        assert [(a, w["id"] if w else None) for a, w, _, _ in grants] == [("a-big", lease_id)]
        grants, *_ = await handle.exchange.remote("b", [big], [], [], [], 0.0)
        assert [(a, e) for a, _, e, _ in grants] == [("a-big", "InvalidAction")]
        # Queued, submitted twice: granted once, when the cores come back.
        for _ in range(2):
            grants, *_ = await handle.exchange.remote("a", [small], [], [], [], 0.0)
            assert grants == []
        got, released, *_ = await handle.exchange.remote(
            "a", [], [(lease_id, "ok", None)], [], [], 0.0
        )
        assert released == [(lease_id, None, None)]
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not got:
            got, *_ = await handle.exchange.remote("a", [], [], [], [], 1.0)
        assert [a for a, w, _, _ in got if w is not None] == ["a-small"]
        got, *_ = await handle.exchange.remote("a", [], [], [], [], 0.3)
        assert got == []
    finally:
        tr.stop_broker(name, NAMESPACE)


async def test_an_idle_trajectory_is_closed_and_its_sandbox_directory_removed(
    cluster: None, tmp_path: Path
) -> None:
    """A trajectory whose client never closes it (verl's tools have no end hook) is
    closed by the broker after trajectory_idle_seconds, and its working directory on
    the node's sandbox executor goes with it."""
    name, namespace = "idle", "tangram-idle"
    cfg = {**CONFIG, "trajectory_idle_seconds": 0.5}
    root = tmp_path / "sandboxes"
    tr.start_broker(
        cfg, name=name, namespace=namespace, data_dir=None, detached=False,
        sandbox_root=str(root), sandbox_isolate=False,
    )  # fmt: skip
    client = tr.Client(name=name, namespace=namespace)
    try:
        res = await client.run(Action.build("never-closed", {"cpu": 1}), Command("echo x > f"))
        assert Path(res.workdir).exists()
        deadline = time.monotonic() + 10
        while Path(res.workdir).exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not Path(res.workdir).exists(), "the idle trajectory's directory stayed"
        snap = await client.snapshot()
        assert snap["counts"]["idle_closed"] == 1
        assert snap["pools"]["cpu"]["trajectories"] == 0
    finally:
        await client.aclose()
        tr.stop_broker(name, namespace)
