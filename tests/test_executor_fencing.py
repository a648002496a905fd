"""Executor fencing: executors run work only under a grant the broker signed, for exactly
the units asked for, unexpired, and not older than the newest fencing token seen for
them; on the fence itself, on the sandbox (real child processes, per core) and on the
GPU service host (per GPU). The broker's signing is in tests/test_executor_grants.py,
the end-to-end cases through Ray in tests/test_ray_fencing.py."""

from __future__ import annotations

import dataclasses
import os
import pickle
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tangram.executors import (
    Command,
    Fence,
    FencingError,
    ForgedGrant,
    GrantMismatch,
    GrantSigner,
    ServiceHost,
    ServiceSpec,
    SignedGrant,
    StaleLease,
)
from tangram.executors.sandbox import SandboxRunner, isolation_problem
from tangram.spec import Allocation, Resident, TangramError

CORES = sorted(os.sched_getaffinity(0))
KEY = bytes(range(32))
OTHER_KEY = b"an attacker's key, not the broker's"
SIGNER = GrantSigner(KEY)


def grant(
    token: int,
    units: tuple[int, ...] = (0, 1),
    *,
    node: str = "n0",
    pool: str = "cpu",
    lease: str | None = None,
    ttl: float = 60.0,
    signer: GrantSigner = SIGNER,
) -> SignedGrant:
    alloc = {pool: Allocation(len(units), node, units)}
    return signer.sign(lease or f"l{token}", token, alloc, time.time() + ttl)


def fence(**kw: Any) -> Fence:
    return Fence(KEY, **kw)


# ---------------------------------------------------------------- signatures
def test_a_signed_grant_verifies_and_any_change_breaks_it():
    g = grant(5)
    assert SIGNER.verify(g)
    assert g.of("cpu") == ("n0", (0, 1)) and g.of("gpu") is None
    back = pickle.loads(pickle.dumps(g))  # how it travels through Ray
    assert back == g and SIGNER.verify(back)
    for change in (
        {"token": 10**18},
        {"lease": "l6"},
        {"units": (("cpu", "n0", (0, 1, 2)),)},
        {"units": (("cpu", "n1", (0, 1)),)},
        {"expires": g.expires + 3600},
        {"signature": bytes(32)},
        {"signature": "not bytes"},
    ):
        assert not SIGNER.verify(dataclasses.replace(g, **change)), change
    assert not GrantSigner(OTHER_KEY).verify(g)
    assert not SIGNER.verify(5)  # type: ignore[arg-type]
    # The multi-pool encoding does not depend on the allocation's order.
    a = {"gpu": Allocation(1, "g0", (3,)), "cpu": Allocation(2, "n0", (0, 1))}
    b = dict(reversed(list(a.items())))
    assert SIGNER.sign("l1", 1, a, 100.0) == SIGNER.sign("l1", 1, b, 100.0)


def test_keys_must_be_bytes_of_some_length():
    with pytest.raises(ValueError, match="at least 16 bytes"):
        GrantSigner(b"short")
    with pytest.raises(TypeError, match="fencing key is bytes"):
        GrantSigner("0" * 64)  # type: ignore[arg-type]
    assert GrantSigner(KEY).key_id == GrantSigner(bytearray(KEY)).key_id
    assert GrantSigner(KEY).key_id != GrantSigner(OTHER_KEY).key_id


# ---------------------------------------------------------------- the fence
def test_fence_keeps_the_newest_token_per_unit():
    f = fence()
    f.admit([0, 1], grant(5), node="n0")
    f.admit([0, 1], grant(5), node="n0")  # the same lease again (run_on): fine
    f.admit([2], grant(3, (2,)), node="n0")  # other units have their own history
    f.admit([1, 2], grant(7, (1, 2)), node="n0")  # a newer lease took unit 1
    with pytest.raises(StaleLease, match="fencing token 5 is older than token 7") as err:
        f.admit([0, 1], grant(5), node="n0")
    assert (err.value.token, err.value.newest) == (5, 7)
    f.admit([0], grant(6, (0,)), node="n0")  # unit 0 alone only saw 5
    assert f.newest == {0: 6, 1: 7, 2: 7}


def test_forged_grants_are_refused_and_lock_nobody_out():
    f = fence()
    f.admit([0, 1], grant(5), node="n0")
    # A real grant with its token raised: the signature no longer matches.
    tampered = dataclasses.replace(grant(5), token=10**18)
    # A grant for 10^18 signed, but with a key that is not the broker's.
    foreign = grant(10**18, signer=GrantSigner(OTHER_KEY))
    # A signature lifted from a real grant onto made-up fields.
    lifted = dataclasses.replace(grant(10**18), signature=grant(5).signature)
    for forged in (tampered, foreign, lifted):
        with pytest.raises(ForgedGrant, match=r"forged grant on node n0: .* does not verify"):
            f.admit([0, 1], forged, "node n0", node="n0")
    assert f.newest == {0: 5, 1: 5}  # nothing recorded
    f.admit([0, 1], grant(6), node="n0")  # the real next holder runs


def test_calls_without_a_grant_are_refused():
    f = fence()
    with pytest.raises(ForgedGrant, match=r"unsigned call on node n0: no grant was given"):
        f.admit([0], None, "node n0", node="n0")
    with pytest.raises(ForgedGrant, match="bare fencing tokens are not accepted"):
        f.admit([0], 5, node="n0")  # type: ignore[arg-type]
    assert f.newest == {}


def test_an_expired_grant_is_refused_before_any_newer_holder_ran():
    now = [time.time()]
    f = fence(clock=lambda: now[0])
    g = grant(9, ttl=1.0)
    f.admit([0, 1], g, node="n0")  # valid until its expiry
    now[0] = g.expires + 0.01
    # No newer token was ever seen here: only the expiry tells that the lease is over.
    with pytest.raises(StaleLease, match=r"grant of lease 'l9' \(fencing token 9\) expired"):
        f.admit([0, 1], g, node="n0")
    # An allowance for clock offset between broker and executor hosts.
    skewed = fence(clock=lambda: now[0], skew=0.5)
    skewed.admit([0, 1], g, node="n0")
    now[0] = g.expires + 0.6
    with pytest.raises(StaleLease, match=r"expired 0\.6"):
        skewed.admit([0, 1], g, node="n0")
    with pytest.raises(ValueError, match="skew"):
        fence(skew=-1)


def test_a_genuine_grant_for_other_units_is_refused():
    f = fence()
    g = grant(4, (0, 1))
    for units, node, pool in (
        ([0], "n0", "cpu"),  # fewer cores than granted
        ([0, 1, 2], "n0", "cpu"),  # more
        ([2, 3], "n0", "cpu"),  # others
        ([0, 0], "n0", "cpu"),  # a repeated id is not two cores
        ([0, 1], "n1", "cpu"),  # the same ids on another node
        ([0, 1], "n0", "gpu"),  # the same ids in another pool
    ):
        with pytest.raises(GrantMismatch, match=r"lease 'l4' was granted cpu@n0\[0, 1\]"):
            f.admit(units, g, node=node, pool=pool)
    assert f.newest == {}
    f.admit([1, 0], g, node="n0", pool="cpu")  # order does not matter
    f.admit([0, 1], g, node="n0")  # a fence that does not know its pool


def test_fences_need_the_key_unless_trusted():
    with pytest.raises(ValueError, match="needs the broker's fencing key"):
        Fence(None)
    trusted = Fence(None, verify=False)
    trusted.admit([0], None)  # direct trusted use: not fenced
    with pytest.raises(ForgedGrant, match="no fencing key"):
        trusted.admit([0], grant(1))  # a grant it cannot check is not taken on faith
    keyed = Fence(KEY, verify=False)
    keyed.admit([0], None)
    with pytest.raises(ForgedGrant):
        keyed.admit([0, 1], grant(1, signer=GrantSigner(OTHER_KEY)), node="n0")
    keyed.admit([0, 1], grant(1), node="n0")


def test_refusals_survive_pickling_and_are_tangram_errors():
    err = pickle.loads(pickle.dumps(StaleLease("stale lease: x", 3, 9)))
    assert isinstance(err, StaleLease) and (str(err), err.token, err.newest) == (
        "stale lease: x",
        3,
        9,
    )
    for cls in (ForgedGrant, GrantMismatch):
        back = pickle.loads(pickle.dumps(cls("why")))
        assert type(back) is cls and str(back) == "why"
        assert issubclass(cls, FencingError) and issubclass(cls, TangramError)
    assert issubclass(StaleLease, FencingError)


# ---------------------------------------------------------------- the sandbox
@pytest.fixture
def runner(tmp_path: Path) -> SandboxRunner:
    return SandboxRunner(
        tmp_path / "sb",
        node="n0",
        pool="cpu",
        fencing_key=KEY,
        isolate=isolation_problem() is None,
    )


def on(token: int, cores: list[int], **kw: Any) -> SignedGrant:
    return grant(token, tuple(cores), **kw)


async def test_sandbox_refuses_a_stale_grant_and_runs_nothing(runner: SandboxRunner):
    core = CORES[:1]
    assert (await runner.run("old", Command("true"), core, grant=on(10, core))).ok
    assert (await runner.run("new", Command("true"), core, grant=on(11, core))).ok
    with pytest.raises(StaleLease, match=r"token 10 is older than token 11 .* on node n0"):
        await runner.run("old", Command("touch ran.txt"), core, grant=on(10, core))
    assert not (runner.workdir("old") / "ran.txt").exists()
    # Other cores did not see token 11.
    if len(CORES) > 1:
        assert (await runner.run("old", Command("true"), CORES[1:2], grant=on(10, CORES[1:2]))).ok
    assert (await runner.run("new", Command("true"), core, grant=on(11, core))).ok


async def test_sandbox_refuses_forged_unsigned_expired_and_misfit_grants(runner: SandboxRunner):
    core = CORES[:1]
    touch = Command("touch ran.txt")
    assert (await runner.run("real", Command("true"), core, grant=on(5, core))).ok
    refused: list[tuple[Any, type[Exception]]] = [
        (on(10**18, core, signer=GrantSigner(OTHER_KEY)), ForgedGrant),
        (dataclasses.replace(on(5, core), token=10**18), ForgedGrant),
        (None, ForgedGrant),
        (on(6, core, ttl=-1.0), StaleLease),  # expired; nobody newer has run here
        (on(6, core, node="n1"), GrantMismatch),
        (on(6, CORES[-1:], pool="gpu"), GrantMismatch),
    ]
    for g, cls in refused:
        with pytest.raises(cls):
            await runner.run("evil", touch, core, grant=g)
    assert not runner.workdir("evil").exists()  # nothing ran, not even a mkdir
    assert runner.fence.newest == {core[0]: 5}  # no refused token was recorded
    # The real holder, and the next real one, still run.
    assert (await runner.run("real", Command("true"), core, grant=on(5, core))).ok
    assert (await runner.run("real", Command("true"), core, grant=on(6, core))).ok


def test_runners_without_a_key_must_say_they_are_trusted(tmp_path: Path):
    with pytest.raises(ValueError, match="needs the broker's fencing key"):
        SandboxRunner(tmp_path / "a", isolate=False)
    with pytest.raises(ValueError, match="needs the broker's fencing key"):
        ServiceHost("g0")
    assert not (tmp_path / "a").exists()  # refused before it made anything


async def test_a_trusted_runner_runs_without_a_grant(tmp_path: Path):
    plain = SandboxRunner(tmp_path / "t", isolate=False, trusted=True)
    assert (await plain.run("t", Command("true"), CORES[:1])).ok


# ---------------------------------------------------------------- the service host
def _host() -> ServiceHost:
    host = ServiceHost("g0", pool="gpu", fencing_key=KEY)
    host.register(ServiceSpec("rm", lambda: {"w": np.ones(4)}, lambda s, x: float(s["w"].sum())))
    return host


def gpus(token: int, units: tuple[int, ...], **kw: Any) -> SignedGrant:
    return grant(token, units, node="g0", pool="gpu", **kw)


async def test_service_host_refuses_a_stale_grant_before_evicting():
    host = _host()
    res: Any = await host.run("rm", [0], [], None, gpus(4, (0,)))
    assert res.output == 4.0 and res.restored
    await host.run("rm", [0, 1], [], None, gpus(6, (0, 1)))
    with pytest.raises(StaleLease, match=r"token 4 is older than token 6 .* GPU node g0"):
        await host.run("rm", [0], [Resident("rm", 1, "g0", 0)], None, gpus(4, (0,)))
    assert ("rm", 1, 0) in host.resident  # the stale call evicted nothing


async def test_service_host_refuses_forged_and_expired_grants_before_evicting():
    host = _host()
    await host.run("rm", [0], [], None, gpus(4, (0,)))
    for g, cls in (
        (None, ForgedGrant),
        (gpus(10**18, (0,), signer=GrantSigner(OTHER_KEY)), ForgedGrant),
        (gpus(5, (0,), ttl=-1.0), StaleLease),
        (grant(5, (0,), node="g0", pool="cpu"), GrantMismatch),
    ):
        with pytest.raises(cls):
            await host.run("rm", [0], [Resident("rm", 1, "g0", 0)], None, g)
    assert ("rm", 1, 0) in host.resident and host.fence.newest == {0: 4}
    assert (await host.run("rm", [0], [], None, gpus(5, (0,)))).output == 4.0


async def test_commands_never_see_the_key_in_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("TANGRAM_FENCING_KEY", KEY.hex())
    modes = [False] + ([True] if isolation_problem() is None else [])
    for isolate in modes:
        r = SandboxRunner(tmp_path / f"e{isolate}", isolate=isolate, trusted=True)
        res = await r.run("t", Command("env"), CORES[:1])
        assert res.ok and "TANGRAM_TRAJECTORY=t" in res.stdout
        assert KEY.hex() not in res.stdout
