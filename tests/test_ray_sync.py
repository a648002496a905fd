"""``tangram.ray.SyncClient`` from many threads, and usage reported through the Ray door's
lease context, on one real local Ray cluster shared by the module (as
tests/test_ray_broker.py starts it; no executors: only leases are tested here)."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import ray

import tangram.ray as tr
from tangram.spec import Action, TangramError

TPM = 6000
CONFIG: dict[str, Any] = {
    "lease_ttl_seconds": 30,
    "pools": {
        "permits": {"kind": "quota", "concurrency": 3},
        "llm": {"kind": "quota", "concurrency": 4, "tokens_per_minute": TPM},
        "llm_sync": {"kind": "quota", "concurrency": 4, "tokens_per_minute": TPM},
    },
}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    ray.init(num_cpus=2, include_dashboard=False)
    handle = tr.start_broker(CONFIG, detached=False, executors=False, data_dir=None)
    yield handle
    tr.stop_broker()
    ray.shutdown()


def in_use(client: tr.SyncClient, pool: str) -> int:
    return int(client.snapshot()["pools"][pool]["in_use"])


def call(pool: str, tokens: int) -> Action:
    return Action.build("t", {pool: 1}, tokens=tokens)


def test_sixteen_threads_share_a_small_pool_without_double_holding(cluster: Any) -> None:
    client = tr.SyncClient(cluster)
    lock = threading.Lock()
    holders: dict[int, str] = {}  # unit -> the lease holding it
    peak = 0
    done: Counter[str] = Counter()

    def step(i: int) -> None:
        for j in range(3):
            action = Action.build(f"traj-{i}", {"permits": 1})
            if j % 2 == 0:
                ctx = client.lease(action, timeout=60.0)
                with ctx as lease:
                    hold(lease)
                    ctx.report(steps=1)
                    unhold(lease)
            else:
                lease = client.acquire(action, timeout=60.0)
                hold(lease)
                unhold(lease)
                client.release(lease.id)
            with lock:
                done["steps"] += 1

    def hold(lease: Any) -> None:
        nonlocal peak
        (unit,) = lease.allocation["permits"].units
        with lock:
            assert unit not in holders, f"unit {unit} held by {holders[unit]} and {lease.id}"
            holders[unit] = lease.id
            peak = max(peak, len(holders))
        threading.Event().wait(0.01)

    def unhold(lease: Any) -> None:
        (unit,) = lease.allocation["permits"].units
        with lock:
            assert holders.pop(unit) == lease.id

    try:
        with ThreadPoolExecutor(16) as pool:
            for f in [pool.submit(step, i) for i in range(16)]:
                f.result()
        assert done["steps"] == 48
        assert not holders and 1 <= peak <= 3
        assert in_use(client, "permits") == 0
        assert client.snapshot()["leases"] == 0
    finally:
        client.close()


def test_closing_stops_the_thread_and_later_calls_fail(cluster: Any) -> None:
    client = tr.SyncClient(cluster)
    client.release(client.acquire(Action.build("t", {"permits": 1}), timeout=30.0).id)
    thread = client._thread
    assert thread.is_alive()
    client.close()
    client.close()  # idempotent
    assert client.closed and not thread.is_alive()
    with pytest.raises(TangramError, match="closed"):
        client.acquire(Action.build("t", {"permits": 1}))


async def test_ray_client_reported_tokens_replace_the_estimate(cluster: Any) -> None:
    async with tr.Client(cluster) as client:
        ctx = client.lease(call("llm", TPM), timeout=30.0)
        async with ctx:
            ctx.report(tokens=10)
        # Estimated at the whole minute: without the report this waits about 50 s.
        async with client.lease(call("llm", 5000), timeout=3.0):
            pass


def test_sync_client_reported_tokens_replace_the_estimate(cluster: Any) -> None:
    with tr.SyncClient(cluster) as client:
        ctx = client.lease(call("llm_sync", TPM), timeout=30.0)
        with ctx as lease:
            assert lease.allocation["llm_sync"].amount == 1
            ctx.report(tokens=10)
        with client.lease(call("llm_sync", 5000), timeout=3.0):
            pass
        # The control: no report, the estimate stays charged and the next call waits.
        with client.lease(call("llm_sync", 900), timeout=3.0):
            pass
        with pytest.raises(TimeoutError), client.lease(call("llm_sync", 5000), timeout=0.5):
            pass
