"""The client protocol every door shares (tangram/leasing.py): one lease context and one
keep-alive over a door's four calls, tested on a door of its own, on a fast-forwarding
loop (looptime)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from tangram.broker import Broker
from tangram.client import HttpClient
from tangram.config import parse_config
from tangram.leasing import Beats, Door, KeepAlive, LeaseContext, finish
from tangram.spec import LeaseExpired, TangramError

pytestmark = pytest.mark.looptime


@dataclass
class Slip:
    id: str
    ttl: float


class Desk:
    """A door that writes down what it is asked."""

    def __init__(self) -> None:
        self.released: list[tuple[str, str, Mapping[str, Any] | None]] = []
        self.beats: list[tuple[float, list[str]]] = []
        self.fail_release: TangramError | None = None
        self.release_takes = 0.0
        self.refuse: dict[str, TangramError] = {}
        self.keep: KeepAlive[Slip] = KeepAlive(self.heartbeat_many)
        self.n = 0

    async def acquire(self, action: float, timeout: float | None = None) -> Slip:
        self.n += 1
        return Slip(f"l{self.n}", action)  # the action is the TTL it wants

    async def release_lease(
        self, lease: Slip, outcome: str = "ok", usage: Mapping[str, Any] | None = None
    ) -> None:
        self.keep.drop(lease.id)
        if self.release_takes:
            await asyncio.sleep(self.release_takes)
        self.released.append((lease.id, outcome, usage))
        if self.fail_release is not None:
            raise self.fail_release

    async def heartbeat_many(self, leases: Sequence[Slip]) -> Beats:
        now = asyncio.get_running_loop().time()
        self.beats.append((now, [x.id for x in leases]))
        return {x.id: self.refuse.get(x.id, now + x.ttl) for x in leases}

    async def cancel_action(self, action_id: str) -> bool:
        return False

    def lease(self, ttl: float) -> LeaseContext[float, Slip]:
        return LeaseContext(self, self.keep, ttl, None)


async def test_every_door_implements_the_protocol() -> None:
    from tangram.ray.client import Client

    broker = Broker.from_config(parse_config({"pools": {"api": {"kind": "quota"}}}))
    async with HttpClient("http://127.0.0.1:9") as http:
        ray_client = Client(broker=object())  # no actor is called until it is used
        for door in (broker, http, ray_client, Desk()):
            assert isinstance(door, Door), door
    await broker.close()


async def test_release_on_exit_ok_with_usage_and_error_on_an_exception() -> None:
    desk = Desk()
    async with desk.lease(3.0) as a:
        pass
    ctx = desk.lease(3.0)
    async with ctx as b:
        ctx.usage = {"tokens": 7}
    with pytest.raises(RuntimeError, match="boom"):
        async with desk.lease(3.0) as c:
            raise RuntimeError("boom")
    assert desk.released == [(a.id, "ok", None), (b.id, "ok", {"tokens": 7}), (c.id, "error", None)]
    assert not desk.keep.held


async def test_the_bodys_error_wins_over_a_failed_release_but_a_clean_exit_hears_it() -> None:
    desk = Desk()
    desk.fail_release = LeaseExpired("lapsed")
    with pytest.raises(RuntimeError, match="boom"):
        async with desk.lease(3.0):
            raise RuntimeError("boom")
    with pytest.raises(LeaseExpired):
        async with desk.lease(3.0):
            pass


async def test_a_release_is_carried_through_when_cancelled_again_meanwhile() -> None:
    entered = asyncio.Event()

    async def body() -> None:
        async with desk.lease(3.0):
            entered.set()
            await asyncio.sleep(10)

    class SlowDoor(Desk):
        async def release_lease(self, lease: Slip, outcome: str = "ok", usage: Any = None) -> None:
            await finish(Desk.release_lease(self, lease, outcome, usage))

    desk = SlowDoor()
    desk.release_takes = 1.0
    task = asyncio.create_task(body())
    await entered.wait()
    task.cancel()
    await asyncio.sleep(0.5)  # the release is under way
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(1.0)
    assert [(i, o) for i, o, _ in desk.released] == [("l1", "error")]


async def test_one_batched_beat_a_third_of_the_shortest_ttl_apart() -> None:
    desk = Desk()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    async with desk.lease(3.0) as a, desk.lease(6.0) as b:
        await asyncio.sleep(2.5)
        assert [(round(t - t0, 6), ids) for t, ids in desk.beats] == [
            (1.0, [a.id, b.id]),
            (2.0, [a.id, b.id]),
        ]
        async with desk.lease(0.3) as c:  # a shorter TTL wakes the sleeping task
            await asyncio.sleep(0.25)
            assert [round(t - t0, 6) for t, _ in desk.beats[2:]] == [2.6, 2.7]
            assert desk.beats[-1][1] == [a.id, b.id, c.id]
    assert not desk.keep.held


async def test_a_shorter_ttl_never_puts_off_a_beat_that_was_due() -> None:
    desk = Desk()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    async with desk.lease(3.0) as a:  # due at 1.0
        await asyncio.sleep(0.9)
        async with desk.lease(2.7) as b:  # a third from now would be 1.8
            await asyncio.sleep(1.0)
    assert [(round(t - t0, 6), ids) for t, ids in desk.beats] == [(1.0, [a.id, b.id])]


async def test_a_lease_released_before_the_keep_alive_ran_ends_it_quietly() -> None:
    desk = Desk()
    async with desk.lease(3.0):
        pass  # no await: the keep-alive task has not run yet
    task = desk.keep._task
    assert task is not None
    await asyncio.sleep(0)
    assert task.done() and task.exception() is None and not desk.beats


async def test_a_lease_whose_heartbeat_fails_is_dropped_and_its_error_kept() -> None:
    desk = Desk()
    async with desk.lease(3.0) as a, desk.lease(3.0) as b:
        desk.refuse[a.id] = LeaseExpired("lapsed")
        await asyncio.sleep(2.5)
        assert [ids for _, ids in desk.beats] == [[a.id, b.id], [b.id]]
        assert isinstance(desk.keep.lost[a.id], LeaseExpired)
    assert not desk.keep.lost  # released: forgotten
