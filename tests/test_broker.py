"""The asyncio broker: leases as context managers, waiters, timeouts, cancel, timers.

The broker runs on its event loop's clock, and these tests run on a loop whose clock
fast-forwards (looptime): a TTL, a timeout or a refill passes at once, and exactly."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tangram.broker import Broker
from tangram.config import parse_config
from tangram.spec import Action, ActionCancelled, InvalidAction, LeaseExpired

CPU2: dict[str, Any] = {
    "cpu": {"kind": "cpu", "nodes": [{"name": "n", "cores": 2, "memory_gb": 8}]}
}
ONE: dict[str, Any] = {"api": {"kind": "quota", "concurrency": 1}}

pytestmark = pytest.mark.looptime


@pytest.fixture
async def make_broker():
    made: list[Broker] = []

    def build(pools: dict[str, Any], *, policy: str = "tangram", lease_ttl: float = 60.0):
        cfg = parse_config({"policy": policy, "lease_ttl_seconds": lease_ttl, "pools": pools})
        broker = Broker.from_config(cfg)
        made.append(broker)
        return broker

    yield build
    for b in made:
        await b.close()


def cpu(traj: str = "t", n: int = 2, **kw: Any) -> Action:
    return Action.build(traj, {"cpu": n}, **kw)


def api(traj: str = "t", **kw: Any) -> Action:
    return Action.build(traj, {"api": 1}, **kw)


def in_use(broker: Broker, pool: str = "cpu") -> int:
    return broker.snapshot()["pools"][pool]["in_use"]


async def settle() -> None:
    """Let scheduled rounds run."""
    for _ in range(5):
        await asyncio.sleep(0)


# --------------------------------------------------------------------------- context manager


async def test_lease_context_releases_on_normal_exit(make_broker):
    broker = make_broker(CPU2)
    async with broker.lease(cpu()) as lease:
        assert lease.state == "granted"
        assert in_use(broker) == 2
        assert sorted(lease.allocation["cpu"].units) == [0, 1]
    assert (lease.state, lease.outcome) == ("released", "ok")
    assert in_use(broker) == 0
    assert not broker.core.leases


async def test_lease_context_releases_on_exception(make_broker):
    broker = make_broker(CPU2)
    with pytest.raises(RuntimeError, match="boom"):
        async with broker.lease(cpu()) as lease:
            assert in_use(broker) == 2
            raise RuntimeError("boom")
    assert (lease.state, lease.outcome) == ("released", "error")
    assert in_use(broker) == 0


async def test_lease_context_releases_on_task_cancellation(make_broker):
    broker = make_broker(CPU2)
    entered = asyncio.Event()
    holder: dict[str, Any] = {}

    async def body() -> None:
        async with broker.lease(cpu()) as lease:
            holder["lease"] = lease
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(body())
    await asyncio.wait_for(entered.wait(), 1.0)
    assert in_use(broker) == 2
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert holder["lease"].state == "released"
    assert in_use(broker) == 0


async def test_cancelling_a_waiting_task_leaves_the_queue(make_broker):
    broker = make_broker(CPU2)
    holder = await broker.acquire(cpu("holder"))
    task = asyncio.create_task(broker.acquire(cpu("w")))
    await settle()
    assert broker.core.queue_length == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert broker.core.queue_length == 0
    broker.release(holder.id)
    await settle()
    assert not broker.core.leases and in_use(broker) == 0


@pytest.mark.parametrize("yields", range(5))
async def test_cancel_racing_with_the_grant_leaks_nothing(make_broker, yields):
    broker = make_broker(CPU2)
    task = asyncio.create_task(broker.acquire(cpu()))
    for _ in range(yields):
        await asyncio.sleep(0)
    task.cancel()
    try:
        lease = await task
    except asyncio.CancelledError:
        pass
    else:  # the grant won the race: the caller owns it
        broker.release(lease.id)
    await settle()
    assert not broker.core.leases and broker.core.queue_length == 0
    assert in_use(broker) == 0


async def test_grant_for_a_waiter_that_gave_up_is_released(make_broker):
    broker = make_broker(CPU2)
    events: list[tuple[str, Any]] = []
    broker.subscribe(lambda kind, obj: events.append((kind, obj)))
    fut = broker.submit_nowait(cpu())
    fut.cancel()  # before the round runs
    await settle()
    assert not broker.core.leases and in_use(broker) == 0
    kinds = [k for k, _ in events]
    assert "grant" in kinds and "release" in kinds
    released = next(obj for k, obj in events if k == "release")
    assert released.outcome == "abandoned"


# --------------------------------------------------------------------------- waiters


async def test_waiters_are_granted_in_order_as_units_free_up(make_broker):
    broker = make_broker(ONE)
    first = await broker.acquire(api("a"))
    actions = [api(f"w{i}") for i in range(3)]
    tasks = [asyncio.create_task(broker.acquire(a)) for a in actions]
    await settle()
    assert not any(t.done() for t in tasks)
    assert broker.core.queue_length == 3
    held = first
    for a, task in zip(actions, tasks, strict=True):
        broker.release(held.id)
        held = await asyncio.wait_for(task, 1.0)
        assert held.action is a
        assert held.allocation["api"].units == (0,)
    broker.release(held.id)
    assert in_use(broker, "api") == 0


async def test_acquire_timeout_leaves_nothing_queued_or_held(make_broker):
    broker = make_broker(ONE)
    holder = await broker.acquire(api("holder"))
    late = api("late")
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await broker.acquire(late, timeout=0.05)
    assert loop.time() - started == pytest.approx(0.05)
    assert broker.core.queue_length == 0
    assert list(broker.core.leases) == [holder.id]
    broker.release(holder.id)
    await settle()
    assert not broker.core.leases  # the timed-out action was not granted afterwards
    assert in_use(broker, "api") == 0


async def test_cancel_makes_the_waiter_raise_action_cancelled(make_broker):
    broker = make_broker(ONE)
    holder = await broker.acquire(api("holder"))
    action = api("w")
    task = asyncio.create_task(broker.acquire(action))
    await settle()
    assert broker.cancel(action.id) is True
    with pytest.raises(ActionCancelled):
        await asyncio.wait_for(task, 1.0)
    assert broker.core.queue_length == 0
    assert broker.cancel(action.id) is False
    assert broker.cancel(holder.action.id) is False  # granted, not queued
    assert broker.cancel("nope") is False


async def test_close_trajectory_fails_its_waiters(make_broker):
    broker = make_broker(CPU2)
    holder = await broker.acquire(cpu("holder"))
    mine = asyncio.create_task(broker.acquire(cpu("t1", 1)))
    other = asyncio.create_task(broker.acquire(cpu("t2", 1)))
    await settle()
    assert broker.close_trajectory("t1") == 1
    with pytest.raises(ActionCancelled):
        await asyncio.wait_for(mine, 1.0)
    broker.release(holder.id)
    lease = await asyncio.wait_for(other, 1.0)
    assert lease.action.trajectory == "t2"


async def test_invalid_action_raises_at_submit_and_queues_nothing(make_broker):
    broker = make_broker(CPU2)
    with pytest.raises(InvalidAction, match="has 2 cores"):
        await broker.acquire(cpu(n=4))
    assert broker.core.queue_length == 0 and not broker.core.leases


# --------------------------------------------------------------------------- timers


async def test_lease_expiry_fires_without_any_other_event(make_broker):
    broker = make_broker(CPU2, lease_ttl=0.05)
    events: list[tuple[str, Any]] = []
    broker.subscribe(lambda kind, obj: events.append((kind, obj)))
    lease = await broker.acquire(cpu())
    assert in_use(broker) == 2
    await asyncio.sleep(0.15)  # nothing else happens meanwhile
    assert lease.state == "expired"
    assert ("expire", lease) in events
    assert in_use(broker) == 0
    with pytest.raises(LeaseExpired):
        broker.release(lease.id)


async def test_expiry_hands_the_units_to_a_waiter(make_broker):
    broker = make_broker(ONE, lease_ttl=0.05)
    first = await broker.acquire(api("a"))
    second = await asyncio.wait_for(broker.acquire(api("b")), 1.0)
    assert first.state == "expired"
    assert second.granted_at - first.granted_at == pytest.approx(0.05)
    assert second.allocation["api"].units == (0,)


async def test_rate_limited_action_is_granted_by_the_timer(make_broker):
    broker = make_broker({"api": {"kind": "quota", "rate": {"per_second": 20, "burst": 1}}})
    first = await broker.acquire(api("a"))
    second = await asyncio.wait_for(broker.acquire(api("b")), 1.0)
    gap = second.granted_at - first.granted_at
    assert gap == pytest.approx(0.05), gap  # one token per 1/20 s


async def test_window_limited_action_is_granted_by_the_timer(make_broker):
    broker = make_broker({"api": {"kind": "quota", "window": {"limit": 1, "seconds": 0.08}}})
    first = await broker.acquire(api("a"))
    broker.release(first.id)  # releasing does not refill a window
    second = await asyncio.wait_for(broker.acquire(api("b")), 1.0)
    gap = second.granted_at - first.granted_at
    assert gap == pytest.approx(0.08), gap


async def test_context_managed_leases_stay_alive_past_the_ttl(make_broker):
    broker = make_broker(CPU2, lease_ttl=0.09)
    events: list[str] = []
    broker.subscribe(lambda kind, obj: events.append(kind))
    async with broker.lease(cpu("a", 1)) as a, broker.lease(cpu("b", 1)) as b:
        await asyncio.sleep(0.25)  # more than two TTLs
        assert a.state == "granted" and b.state == "granted"
        now = broker.clock()
        assert a.expires_at > now and b.expires_at > now
        assert in_use(broker) == 2
    assert (a.state, a.outcome, b.state, b.outcome) == ("released", "ok", "released", "ok")
    assert "expire" not in events


async def test_plain_acquire_is_not_kept_alive_once_contexts_heartbeat(make_broker):
    broker = make_broker(CPU2, lease_ttl=0.06)
    plain = await broker.acquire(cpu("plain", 1))
    async with broker.lease(cpu("ctx", 1)) as ctx:
        await asyncio.sleep(0.15)
        assert ctx.state == "granted"
        assert plain.state == "expired"  # only leases held by a context are refreshed


async def test_short_ttl_lease_held_while_a_long_one_is_alive_stays_alive(make_broker):
    broker = make_broker(CPU2, lease_ttl=0.6)  # the refresher sleeps 0.2 s for this one
    async with broker.lease(cpu("long", 1)):
        await asyncio.sleep(0)
        async with broker.lease(cpu("short", 1, ttl=0.05)) as short:
            await asyncio.sleep(0.15)
            assert short.state == "granted"
