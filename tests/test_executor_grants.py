"""The live broker signs what it grants (``Broker(signer=...)``), heartbeats re-sign with
the new expiry, and an executor holding the same key runs exactly those grants: the
in-process path, without Ray (tests/test_ray_fencing.py has the Ray one).

The broker-only tests run on a fast-forwarding loop (looptime); the one with a real
sandbox keeps real time, since its executor checks grants against the wall clock."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from tangram.broker import Broker
from tangram.config import parse_config
from tangram.executors import Command, ForgedGrant, GrantSigner, SandboxRunner, StaleLease
from tangram.executors.sandbox import isolation_problem
from tangram.spec import Action

CORES = sorted(os.sched_getaffinity(0))
KEY = b"k" * 32
CONFIG = parse_config(
    {
        "lease_ttl_seconds": 5,
        "pools": {
            "cpu": {"kind": "cpu", "nodes": [{"name": "n0", "cores": CORES, "memory_gb": 4}]},
            "api": {"kind": "quota", "concurrency": 2},
        },
    }
)


@pytest.mark.looptime
async def test_every_grant_is_signed_and_heartbeats_renew_it():
    signer = GrantSigner(KEY)
    broker = Broker.from_config(CONFIG, signer=signer)
    try:
        lease = await broker.acquire(Action.build("t", {"cpu": 1, "api": 1}))
        g = lease.grant
        assert signer.verify(g)
        assert (g.lease, g.token) == (lease.id, lease.fencing_token)
        assert g.of("cpu") == ("n0", lease.allocation["cpu"].units)
        assert g.of("api") == ("", lease.allocation["api"].units)  # a pool without nodes
        # The core's monotonic deadline, as wall time.
        assert abs(g.expires - (time.time() + 5)) < 0.5
        await asyncio.sleep(0.05)
        at = broker.heartbeat(lease.id, ttl=20)
        renewed = lease.grant
        assert signer.verify(renewed) and renewed.token == g.token
        assert renewed.expires > g.expires + 14
        assert abs(renewed.expires - (at - broker.clock() + time.time())) < 0.1
        broker.release(lease.id)
    finally:
        await broker.close()


@pytest.mark.looptime
async def test_a_broker_without_a_signer_signs_nothing():
    broker = Broker.from_config(CONFIG)
    try:
        lease = await broker.acquire(Action.build("t", {"api": 1}))
        assert lease.grant is None
        broker.heartbeat(lease.id)
        assert lease.grant is None
    finally:
        await broker.close()


async def test_a_sandbox_runs_the_brokers_grants_and_refuses_an_expired_one(tmp_path: Path):
    broker = Broker.from_config(CONFIG, signer=GrantSigner(KEY))
    runner = SandboxRunner(
        tmp_path / "sb",
        node="n0",
        pool="cpu",
        fencing_key=KEY,
        isolate=isolation_problem() is None,
    )
    n = len(CORES)
    try:
        stale = await broker.acquire(Action.build("old", {"cpu": n}, ttl=0.3))
        cores = stale.allocation["cpu"].units
        assert (await runner.run("old", Command("true"), cores, grant=stale.grant)).ok
        while broker.core.leases.get(stale.id) is not None:  # it expires: nobody beats
            await asyncio.sleep(0.01)
        fresh = await broker.acquire(Action.build("new", {"cpu": n}))
        assert set(fresh.allocation["cpu"].units) == set(cores)
        # The new holder has not run yet; the old grant's expiry alone refuses it.
        with pytest.raises(StaleLease, match="expired"):
            await runner.run("old", Command("touch ran.txt"), cores, grant=stale.grant)
        assert not (runner.workdir("old") / "ran.txt").exists()
        res = await runner.run(
            "new", Command("true"), fresh.allocation["cpu"].units, n, fresh.grant
        )
        assert res.ok
        # A broker with another key is not this executor's broker.
        other = Broker.from_config(CONFIG, signer=GrantSigner(b"o" * 32))
        try:
            alien = await other.acquire(Action.build("x", {"cpu": n}))
            with pytest.raises(ForgedGrant):
                await runner.run(
                    "x", Command("true"), alien.allocation["cpu"].units, n, alien.grant
                )
        finally:
            await other.close()
    finally:
        await broker.close()


@pytest.mark.looptime
async def test_the_lease_contexts_keep_alive_renews_the_grant_too():
    """``async with broker.lease(...)`` heartbeats by itself: the grant an executor sees
    must follow, or a lease held past its first TTL would be refused as expired."""
    signer = GrantSigner(KEY)
    # The wall clock executors read, moving with the loop's fast-forwarded time.
    loop = asyncio.get_running_loop()
    offset = time.time() - loop.time()

    def wall() -> float:
        return loop.time() + offset

    broker = Broker.from_config(CONFIG, signer=signer, wall=wall)
    try:
        action = Action.build("t", {"api": 1}, ttl=0.3)
        async with broker.lease(action) as lease:
            first = lease.grant
            await asyncio.sleep(0.5)  # past the first TTL: kept alive by the context
            assert lease.grant.expires > first.expires + 0.15
            assert lease.grant.expires > wall()
            assert signer.verify(lease.grant)
    finally:
        await broker.close()


@pytest.mark.looptime
async def test_leases_restored_from_the_journal_are_signed_at_once(tmp_path: Path):
    signer = GrantSigner(KEY)
    first = Broker.from_config(CONFIG, data_dir=tmp_path, signer=signer)
    lease = await first.acquire(Action.build("t", {"api": 1}))
    await first.close()
    again = Broker.from_config(CONFIG, data_dir=tmp_path, signer=signer)
    try:
        (restored,) = again.restored
        assert restored.id == lease.id and signer.verify(restored.grant)
    finally:
        await again.close()
