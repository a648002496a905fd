"""Safety under restarts, faults and hostile clients: no unit is ever held by two holders.

Real ``tangram serve`` processes killed with SIGKILL on real data directories, a real
small tmpfs filled up, a real journal whose WAL is thrown away; the core directly where
only time matters (fair queue bounds, idle trajectories)."""

from __future__ import annotations

import asyncio
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tangram.broker import RETRY_JOURNAL, Broker
from tangram.client.http import HttpClient
from tangram.config import parse_config
from tangram.core.state import Core
from tangram.journal import BLOCK, Journal, JournalUnavailable
from tangram.server.app import create_app
from tangram.server.run import LiveServer
from tangram.spec import Action, QueueFull, Unavailable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from crashload import Server

ONE_CORE = {
    "lease_ttl_seconds": 60,
    "pools": {"cpu": {"kind": "cpu", "nodes": [{"name": "n", "cores": 1, "memory_gb": 64}]}},
}
TWO_CORES = {
    "lease_ttl_seconds": 60,
    "pools": {"cpu": {"kind": "cpu", "nodes": [{"name": "n", "cores": 2, "memory_gb": 64}]}},
}
SEQUENTIAL = re.compile(r"[al]\d+")


def submit(
    url: str, traj: str, key: str | None = None, wait: float = 0.0, **extra: Any
) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key else {}
    body = {"trajectory": traj, "demands": {"cpu": 1}, **extra}
    return httpx.post(f"{url}/v1/actions?wait={wait}", json=body, headers=headers, timeout=10)


# --------------------------------------------------------------------------- identities
def test_a_queued_action_keeps_its_id_and_place_across_a_restart(tmp_path: Path) -> None:
    """The issue's reproduction: X holds the core, Y queues (202), the broker is killed;
    a new submit W must not get Y's id, Y's poll must find Y's own action, and Y is
    granted before W."""
    server = Server(tmp_path, ONE_CORE)
    server.start()
    try:
        x = submit(server.url, "X").json()
        assert x["state"] == "granted"
        y = submit(server.url, "Y")
        assert y.status_code == 202
        y_id = y.json()["id"]
        assert not SEQUENTIAL.fullmatch(y_id) and not SEQUENTIAL.fullmatch(x["lease"]["id"])
        server.kill()
        server.start()
        w = submit(server.url, "W").json()
        assert w["id"] not in (y_id, x["id"])
        got = httpx.get(f"{server.url}/v1/actions/{y_id}").json()
        assert (got["state"], got["trajectory"]) == ("queued", "Y")
        r = httpx.post(f"{server.url}/v1/leases/{x['lease']['id']}/release", json={})
        assert r.status_code == 200
        got = httpx.get(f"{server.url}/v1/actions/{y_id}?wait=5").json()
        assert (got["state"], got["trajectory"]) == ("granted", "Y")
        assert got["lease"]["fencing_token"] > x["lease"]["fencing_token"]
        assert httpx.get(f"{server.url}/v1/actions/{w['id']}").json()["state"] == "queued"
    finally:
        server.stop()


def test_an_idempotency_key_reused_with_another_body_after_a_restart_is_409(
    tmp_path: Path,
) -> None:
    server = Server(tmp_path, ONE_CORE)
    server.start()
    try:
        first = submit(server.url, "t", key="k-granted").json()
        queued = submit(server.url, "u", key="k-queued").json()
        server.kill()
        server.start()
        for key, traj, old in (("k-granted", "t", first), ("k-queued", "u", queued)):
            assert submit(server.url, traj, key=key).json()["id"] == old["id"]
            other = submit(server.url, traj, key=key, task="other")
            assert other.status_code == 409, other.text
            assert "different action" in other.json()["detail"]
    finally:
        server.stop()


# --------------------------------------------------------------------------- durability
def test_a_release_or_heartbeat_answered_survives_an_immediate_kill(tmp_path: Path) -> None:
    server = Server(tmp_path, TWO_CORES)
    server.start()
    try:
        a = submit(server.url, "a").json()["lease"]
        b = submit(server.url, "b").json()["lease"]
        beat = httpx.post(f"{server.url}/v1/leases/{a['id']}/heartbeat", json={"ttl": 3600})
        assert beat.status_code == 200
        assert httpx.post(f"{server.url}/v1/leases/{b['id']}/release").status_code == 200
        server.kill()  # at once: the answers above must already be durable
        server.start()
        pools = httpx.get(f"{server.url}/v1/pools").json()
        assert pools["leases"] == 1, "a released lease came back, or a held one was lost"
        again = httpx.post(f"{server.url}/v1/leases/{a['id']}/heartbeat").json()
        assert again["ttl"] == 3600
    finally:
        server.stop()


# --------------------------------------------------------------------------- holders
def test_a_caller_with_another_fencing_token_changes_nothing() -> None:
    app = create_app(parse_config(TWO_CORES))
    with LiveServer(app) as url:
        lease = submit(url, "a", wait=5).json()["lease"]
        token = lease["fencing_token"]
        for op in ("release", "heartbeat"):
            r = httpx.post(f"{url}/v1/leases/{lease['id']}/{op}", json={"fencing_token": token + 1})
            assert r.status_code == 409, r.text
            assert r.json()["type"].endswith("not-holder")
        assert httpx.get(f"{url}/v1/pools").json()["leases"] == 1
        r = httpx.post(f"{url}/v1/leases/{lease['id']}/release", json={"fencing_token": token})
        assert r.status_code == 200
        assert httpx.get(f"{url}/v1/pools").json()["leases"] == 0


# --------------------------------------------------------------------------- trajectory ids
@pytest.mark.parametrize("traj", ["a/b", "x?y#z", "..", "../..", "%2F", "sp ace/ü", "a" * 256])
def test_any_trajectory_id_can_be_closed_through_the_client(traj: str) -> None:
    cfg = parse_config(
        {"pools": {"cpu": {"kind": "cpu", "nodes": [{"name": "n", "cores": 1, "memory_gb": 8}]}}}
    )

    async def main(url: str) -> None:
        async with HttpClient(url) as c:
            # Granted and released, never closed: pinned with its memory reserved.
            lease = await c.acquire({"trajectory": traj, "demands": {"cpu": 1}, "memory_gb": 1})
            await c.release(lease.id)
            held = await c.acquire({"trajectory": "holder", "demands": {"cpu": 1}})
            await c.submit({"trajectory": traj, "demands": {"cpu": 1}})  # queued behind
            assert (await c.pools())["pools"]["cpu"]["trajectories"] == 2
            assert await c.close_trajectory(traj) == 1
            await c.release(held.id)
            assert await c.close_trajectory("holder") == 0
            pools = await c.pools()
            assert pools["queued"] == 0 and pools["pools"]["cpu"]["trajectories"] == 0

    with LiveServer(create_app(cfg)) as url:
        asyncio.run(main(url))


# --------------------------------------------------------------------------- queue bounds
def test_a_full_pool_still_takes_a_tenant_below_its_share() -> None:
    cfg = parse_config({"pools": {"api": {"kind": "quota", "concurrency": 1}}})
    core = Core(cfg.build_pools(), max_queued_per_pool=10)

    def add(tenant: str) -> None:
        core.submit(Action.build(f"{tenant}/t", {"api": 1}, tenant=tenant), 0.0)

    for _ in range(10):
        add("big")
    with pytest.raises(QueueFull):
        add("big")
    for _ in range(5):  # half the bound: two tenants now queue here
        add("small")
    with pytest.raises(QueueFull, match="its share"):
        add("small")
    with pytest.raises(QueueFull):
        add("big")


# --------------------------------------------------------------------------- idle trajectories
def test_a_trajectory_nobody_closes_is_closed_when_idle_and_frees_its_memory() -> None:
    cfg = parse_config(
        {"pools": {"cpu": {"kind": "cpu", "nodes": [{"name": "n", "cores": 4, "memory_gb": 8}]}}}
    )
    core = Core(cfg.build_pools(), trajectory_idle=600.0)
    core.submit(Action.build("old", {"cpu": 1}, memory_gb=8), 0.0)
    (g,) = core.step(0.0)
    core.release(g.lease.id, 1.0)  # never closed: its 8 GB stay reserved
    core.submit(Action.build("new", {"cpu": 1}, memory_gb=4), 2.0)
    assert core.step(2.0) == []  # every core is free, but the memory is not
    assert core.next_wakeup() == pytest.approx(601.0)
    events = core.step(601.0)
    assert [type(e).__name__ for e in events] == ["IdleClose", "Grant"]
    assert events[0].trajectory == "old" and events[0].pinned == {"cpu": "n"}  # type: ignore[union-attr]
    assert core.counts["idle_closed"] == 1
    assert core.active_trajectories == 1


@pytest.mark.looptime  # the broker's loop fast-forwards: its timers fire at once
async def test_the_broker_closes_idle_trajectories_on_its_timer() -> None:
    cfg = parse_config({"trajectory_idle_seconds": 0.2, **ONE_CORE})
    seen: list[tuple[str, float]] = []
    broker = Broker.from_config(cfg)
    broker.subscribe(lambda kind, obj: seen.append((kind, broker.clock())))
    async with broker.lease(Action.build("t", {"cpu": 1}, memory_gb=1)):
        pass
    ended = broker.clock()
    await asyncio.sleep(0.5)
    await broker.close()
    closed = [t for kind, t in seen if kind == "idle_close"]
    assert closed == [pytest.approx(ended + 0.2)]


# --------------------------------------------------------------------------- journal faults
@pytest.mark.looptime  # the retry and expiry timers fire at once, on the loop's clock
async def test_a_failing_journal_fails_closed_and_recovers_by_itself(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite3")
    real = journal._flush
    broken = [True]

    def flaky() -> None:
        if broken[0]:
            raise sqlite3.OperationalError("database or disk is full")
        real()

    journal._flush = flaky  # type: ignore[method-assign]
    cfg = parse_config(ONE_CORE)
    broker = Broker(cfg.build_pools(), lease_ttl=0.3, journal=journal)
    fut = broker.submit_nowait(Action.build("a", {"cpu": 1}))
    with pytest.raises(Unavailable):
        await broker.sync()
    assert broker.unavailable is not None
    with pytest.raises(Unavailable):
        broker.submit_nowait(Action.build("b", {"cpu": 1}))
    await asyncio.sleep(0.1)
    assert not fut.done(), "a grant was told before it was durable"
    broken[0] = False
    lease = await asyncio.wait_for(fut, 2.0)  # recovered by a timer alone
    assert broker.unavailable is None
    # Decided at once, told only once a timer's round (the retry's or the expiry's)
    # made it durable.
    assert lease.granted_at == 0.0
    assert 0.1 < asyncio.get_running_loop().time() <= RETRY_JOURNAL
    # The expiry timer kept running: the lease lapses with nobody calling in.
    await asyncio.sleep(0.6)
    assert broker.core.lease_state(lease.id) == "expired"
    await broker.close()
    assert Journal(tmp_path / "j.sqlite3").load().leases == []


def test_an_unwritable_data_dir_is_refused_at_start(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = subprocess.run(
        [sys.executable, "-m", "tangram.cli", "serve", "--port", "0", "--data-dir",
         str(blocker / "data")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "cannot use the journal" in proc.stderr


def _tmpfs(path: Path, size: str) -> None:
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")


def test_a_full_disk_answers_503_loses_nothing_and_recovers(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    _tmpfs(disk, "4m")
    try:
        server = Server(disk, {**ONE_CORE, "lease_ttl_seconds": 600})
        server.start()
        url = server.url
        try:
            held = submit(url, "holder").json()
            filler = disk / "filler"
            with open(filler, "wb") as f:  # every free block
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError:
                    pass
            acked: list[str] = []
            statuses: set[int] = set()
            for i in range(2000):
                r = submit(url, f"q{i}", memory_gb=0, task="x" * 200)
                statuses.add(r.status_code)
                if r.status_code == 202:
                    acked.append(r.json()["id"])
                elif r.status_code == 503:
                    assert int(r.headers["retry-after"]) >= 1
                    assert r.headers["content-type"].startswith("application/problem+json")
                    break
            assert 503 in statuses, f"the disk never filled: {statuses}"
            rel = httpx.post(f"{url}/v1/leases/{held['lease']['id']}/release")
            assert rel.status_code == 503  # not durable, so not acknowledged
            filler.unlink()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                rel = httpx.post(f"{url}/v1/leases/{held['lease']['id']}/release")
                if rel.status_code == 200:
                    break
                time.sleep(0.2)
            assert rel.status_code == 200, rel.text
            assert submit(url, "after").status_code == 202
            server.kill()
            server.start()
            # Every action acknowledged before the disk filled is still there.
            states = {httpx.get(f"{url}/v1/actions/{a}").json()["state"] for a in acked}
            assert states <= {"queued", "granted"}, states
        finally:
            server.stop()
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_losing_the_wal_never_sends_tokens_back_nor_holds_a_unit_twice(tmp_path: Path) -> None:
    """The newest transactions are lost (the -wal file thrown away after a crash): the
    mark beside the database keeps tokens going up, and grants wait until every lease
    the database forgot has lapsed."""
    path = tmp_path / "j.sqlite3"
    cfg = parse_config(ONE_CORE)
    mono = [0.0]
    journal = Journal(path, mono=lambda: mono[0], wall=lambda: 1000.0 + mono[0])
    core = Core(cfg.build_pools(), lease_ttl=30.0)
    core.observers.append(journal)
    core.submit(Action.build("a", {"cpu": 1}), 0.0)
    (first,) = core.schedule(0.0)
    journal.flush()
    core.release(first.lease.id, 1.0)
    journal.flush()
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    shutil.copy(path, tmp_path / "old.sqlite3")  # the database as it will be found
    core.submit(Action.build("b", {"cpu": 1}), 2.0)
    (second,) = core.schedule(2.0)  # told to its client: expires at 32
    journal.flush()
    # The crash: the newest transactions never reach the database file.
    journal._db.close()
    shutil.copy(tmp_path / "old.sqlite3", path)
    Path(f"{path}-wal").unlink(missing_ok=True)

    mono[0] = 5.0
    j2 = Journal(path, mono=lambda: mono[0], wall=lambda: 1000.0 + mono[0])
    fresh = Core(cfg.build_pools(), lease_ttl=30.0)
    restored = j2.restore_into(fresh, 5.0)
    assert restored.leases == []  # "b" was forgotten ...
    assert fresh.fencing >= second.lease.fencing_token  # ... but not its token
    assert restored.hold_until == pytest.approx(32.0)
    fresh.hold_until = restored.hold_until
    fresh.submit(Action.build("c", {"cpu": 1}), 5.0)
    assert fresh.schedule(5.0) == [], "the forgotten lease's core was granted again"
    assert fresh.next_wakeup() == pytest.approx(32.0)
    (third,) = fresh.schedule(32.0)
    assert third.lease.fencing_token > second.lease.fencing_token
    assert third.lease.id not in (first.lease.id, second.lease.id)


def test_a_truncated_wal_is_detected_too(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    cfg = parse_config(TWO_CORES)
    journal = Journal(path, mono=lambda: 0.0, wall=lambda: 1000.0)
    core = Core(cfg.build_pools())
    core.observers.append(journal)
    tokens = []
    for i in range(2):
        core.submit(Action.build(f"t{i}", {"cpu": 1}), 0.0)
        (g,) = core.schedule(0.0)
        journal.flush()
        tokens.append(g.lease.fencing_token)
    # The crash: the files as they are on disk now, the process gone.
    crash = tmp_path / "crash"
    crash.mkdir()
    for suffix in ("", "-wal", ".mark"):
        shutil.copy(f"{path}{suffix}", crash / f"j.sqlite3{suffix}")
    path = crash / "j.sqlite3"
    wal = Path(f"{path}-wal")
    with open(wal, "r+b") as f:
        f.truncate(wal.stat().st_size // 2)
    j2 = Journal(path, mono=lambda: 0.0, wall=lambda: 1000.0)
    fresh = Core(cfg.build_pools())
    restored = j2.restore_into(fresh, 0.0)
    assert len(restored.leases) < 2
    assert restored.hold_until == pytest.approx(60.0)  # the newest lease's expiry
    assert fresh.fencing >= max(tokens)


def test_tokens_continue_above_the_reserved_block_after_a_plain_restart(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    cfg = parse_config(ONE_CORE)
    journal = Journal(path)
    core = Core(cfg.build_pools())
    core.observers.append(journal)
    core.submit(Action.build("a", {"cpu": 1}), 0.0)
    (g,) = core.schedule(0.0)
    journal.flush()
    journal.close()
    fresh = Core(cfg.build_pools())
    restored = Journal(path).restore_into(fresh, 0.0)
    assert restored.hold_until is None  # nothing was lost: no hold
    assert g.lease.fencing_token < fresh.fencing <= g.lease.fencing_token + BLOCK


def test_unavailable_is_a_journal_error_the_doors_map_to_503() -> None:
    assert issubclass(JournalUnavailable, Unavailable)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
