"""Authenticated executor fencing through Ray, on a real local cluster: the broker actor
signs every grant with the key ``start_broker`` handed it and its executors, heartbeats
bring re-signed grants, and executors refuse expired, forged and unsigned grants with
errors the client raises as themselves."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
import ray
from ray.exceptions import RayTaskError

import tangram.ray as tr
from tangram.executors import Command, GrantSigner, ServiceCall, ServiceSpec
from tangram.executors.fencing import key_id
from tangram.executors.sandbox import isolation_problem
from tangram.spec import Action

NAME = "fence"
KEY = os.urandom(32)
CORES = sorted(os.sched_getaffinity(0))
CONFIG: dict[str, Any] = {
    "lease_ttl_seconds": 30,
    "pools": {
        "cpu": {"kind": "cpu", "nodes": [{"name": "local", "cores": CORES, "memory_gb": 8}]},
        "gpu": {
            "kind": "gpu",
            "nodes": [{"name": "g0", "gpus": 1, "memory_gb": 10}],
            "services": {"rm": {"memory_gb": 2, "restore_seconds": 0.5}},
        },
    },
}


def tiny_model() -> dict[str, Any]:
    return {"w": np.ones(4)}


def total(state: dict[str, Any], x: Any) -> float:
    return float(state["w"].sum())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False)
    handle = tr.start_broker(
        CONFIG,
        name=NAME,
        detached=False,
        services=[ServiceSpec("rm", tiny_model, total)],
        sandbox_root=str(tmp_path_factory.mktemp("sandboxes")),
        sandbox_isolate=isolation_problem() is None,
        fencing_key=KEY,
    )
    yield handle
    tr.stop_broker(NAME)
    ray.shutdown()


@pytest_asyncio.fixture
async def client(cluster: Any) -> AsyncIterator[tr.Client]:
    c = tr.Client(name=NAME)
    yield c
    await c.aclose()


def sandbox() -> Any:
    return tr.find_executor(NAME, "tangram", "sandbox", "cpu", "local")


def cpu(traj: str, n: int = 1, **kw: Any) -> Action:
    return Action.build(traj, {"cpu": n}, **kw)


async def until(c: tr.Client, ok: Any, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not ok(await c.snapshot()):
        assert time.monotonic() < deadline, "the broker did not settle"
        await asyncio.sleep(0.02)


async def test_grants_are_signed_with_the_key_start_broker_handed_out(client: tr.Client):
    async with client.lease(cpu("t-sig")) as lease:
        assert GrantSigner(KEY).verify(lease.grant)
        assert lease.grant.of("cpu") == ("local", lease.allocation["cpu"].units)
        assert (lease.grant.lease, lease.grant.token) == (lease.id, lease.fencing_token)
    for info in (await sandbox().info.remote(),):
        assert info["key_id"] == key_id(KEY)


async def test_an_expired_holder_is_refused_before_the_new_holder_runs(client: tr.Client):
    n = len(CORES)
    # Acquired but never held: no heartbeats, so it expires like a stalled client's.
    stale = await client.acquire(cpu("t-stale", n, ttl=0.5))
    await until(client, lambda s: s["pools"]["cpu"]["in_use"] == 0)
    fresh = await client.acquire(cpu("t-fresh", n))
    assert set(fresh.allocation["cpu"].units) == set(stale.allocation["cpu"].units)
    # The new holder has not run anything yet: no newer token was seen for the cores.
    with pytest.raises(tr.StaleLease, match=rf"expired .*lease {stale.id}") as refused:
        await client.run_on(stale, Command("echo stale > ran.txt"))
    assert refused.value.token == stale.fencing_token
    root = Path((await sandbox().info.remote())["root"])
    assert not (root / "t-stale" / "ran.txt").exists()  # nothing ran
    assert (await client.run_on(fresh, Command("echo fresh"))).stdout == "fresh\n"
    await client.release(fresh.id)
    for t in ("t-stale", "t-fresh"):
        await client.close_trajectory(t)


async def test_heartbeats_renew_the_grant_past_the_first_ttl(client: tr.Client):
    async with client.lease(cpu("t-long", ttl=1.0)) as lease:
        first = lease.grant
        await asyncio.sleep(2.5)  # well past the first grant's expiry
        assert lease.grant.expires > first.expires + 1.0
        assert (await client.run_on(lease, Command("echo still mine"))).ok
        # The first grant itself is expired now: only the renewed one is good.
        units = lease.allocation["cpu"].units
        with pytest.raises(RayTaskError) as err:
            await sandbox().run.remote("t-long", Command("true"), units, len(units), first)
        assert isinstance(err.value.cause, tr.StaleLease)
    await client.close_trajectory("t-long")


async def test_forged_and_unsigned_grants_are_refused_and_lock_nobody_out(client: tr.Client):
    async with client.lease(cpu("t-forge")) as lease:
        real = lease.grant
        units = lease.allocation["cpu"].units
        alloc = {"cpu": lease.allocation["cpu"]}
        forged = (
            dataclasses.replace(real, token=10**18),  # tampered with
            GrantSigner(b"not the broker's key at all").sign(
                "l-evil", 10**18, alloc, time.time() + 60
            ),
            None,
        )
        for g in forged:
            lease.grant = g
            with pytest.raises(tr.ForgedGrant, match=rf"lease {lease.id}, action"):
                await client.run_on(lease, Command("echo forged > ran.txt"))
        lease.grant = real
        assert (await client.run_on(lease, Command("ls"))).stdout == ""  # nothing ran
        # A genuine grant for other cores is no grant for these.
        if len(CORES) > 1:
            other = [c for c in CORES if c not in units][:1]
            with pytest.raises(RayTaskError) as err:
                await sandbox().run.remote("t-forge", Command("true"), other, 1, real)
            assert isinstance(err.value.cause, tr.GrantMismatch)
    # The next real holder of these cores runs: a forged 10^18 was never recorded.
    res = await client.run(cpu("t-forge"), Command("echo next"))
    assert res.stdout == "next\n"
    await client.close_trajectory("t-forge")


async def test_the_service_executor_checks_grants_too(client: tr.Client):
    act = Action.build("t-gpu", {"gpu": 1}, service="rm", duration=0.1)
    assert (await client.run(act, ServiceCall(None))).output == 4.0
    async with client.lease(Action.build("t-gpu", {"gpu": 1}, service="rm")) as lease:
        lease.grant = dataclasses.replace(lease.grant, expires=lease.grant.expires + 3600)
        with pytest.raises(tr.ForgedGrant):
            await client.run_on(lease, ServiceCall(None))


async def test_executors_that_outlive_their_broker_keep_its_key(cluster: Any, tmp_path: Path):
    """Last in the module: it replaces the module's broker. Executors left by a broker
    that is gone work for a new broker with the same key, and refuse to be adopted by
    one with another key."""
    ray.kill(tr.get_broker(NAME), no_restart=True)  # the executors stay
    deadline = time.monotonic() + 20
    while True:
        try:
            tr.get_broker(NAME)
        except tr.BrokerNotFound:
            break
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    with pytest.raises(tr.FencingKeyMismatch, match="another fencing key"):
        tr.start_broker(CONFIG, name=NAME, detached=False, fencing_key=os.urandom(32))
    with pytest.raises(tr.BrokerNotFound):  # the mismatched broker did not stay behind
        tr.get_broker(NAME)
    # The deployment's key again (here from the environment): the executors run its grants.
    os.environ[tr.KEY_ENV] = KEY.hex()
    try:
        tr.start_broker(CONFIG, name=NAME, detached=False, services=[])
    finally:
        del os.environ[tr.KEY_ENV]
    async with tr.Client(name=NAME) as c:
        res = await c.run(cpu("t-again"), Command("echo again"))
        assert res.stdout == "again\n"
        await c.close_trajectory("t-again")


def test_the_key_comes_from_the_argument_the_environment_or_chance(
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.delenv(tr.KEY_ENV, raising=False)
    assert tr.resolve_fencing_key(KEY) == KEY
    a, b = tr.resolve_fencing_key(), tr.resolve_fencing_key()
    assert len(a) == 32 and a != b
    monkeypatch.setenv(tr.KEY_ENV, KEY.hex())
    assert tr.resolve_fencing_key() == KEY
    monkeypatch.setenv(tr.KEY_ENV, "zz")
    with pytest.raises(ValueError, match="must be hex"):
        tr.resolve_fencing_key()
    monkeypatch.setenv(tr.KEY_ENV, "00ff")
    with pytest.raises(ValueError, match="needs 16 or more"):
        tr.resolve_fencing_key()
