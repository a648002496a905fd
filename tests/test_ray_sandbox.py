"""The sandbox handle (``client.sandbox(trajectory)``: exec, upload, download, status,
close) on a real local Ray cluster, with the broker actor and its sandbox executors:
pool ``cpu`` runs bubblewrap working directories, pool ``box`` a runc container per
trajectory from the test image (deploy/image/sandbox-image.sh), where runc can run."""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import ray

import tangram.ray as tr
from tangram.executors.container import runc_problem
from tangram.executors.fencing import FencingError
from tangram.executors.images import tool_problem
from tangram.executors.sandbox import SandboxError, isolation_problem

CORES = sorted(os.sched_getaffinity(0))
ROOT = Path(__file__).resolve().parents[1]
CONFIG: dict[str, Any] = {
    "lease_ttl_seconds": 30,
    "pools": {
        "cpu": {
            "kind": "cpu",
            "nodes": [{"name": "local", "cores": CORES, "memory_gb": 8}],
            "sandbox": {"memory_mb": 512, "tmp_mb": 64},
        },
    },
}


def _image() -> tuple[str | None, str]:
    """The test image's reference, or None and why there is none."""
    problem = runc_problem() or tool_problem()
    if problem is not None:
        return None, problem
    done = subprocess.run(
        [str(ROOT / "deploy/image/sandbox-image.sh")],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if done.returncode != 0:
        return None, "deploy/image/sandbox-image.sh failed: " + done.stderr[-1000:]
    return done.stdout.strip().splitlines()[-1], ""


IMAGE: dict[str, Any] = {"ref": None, "why": "not built yet"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    IMAGE["ref"], IMAGE["why"] = _image()
    config = {**CONFIG, "pools": dict(CONFIG["pools"])}
    if IMAGE["ref"] is not None:
        config["pools"]["box"] = {
            "kind": "cpu",
            "nodes": [{"name": "local", "cores": CORES, "memory_gb": 8}],
            "sandbox": {"backend": "container", "image": IMAGE["ref"], "memory_mb": 512},
        }
    ray.init(num_cpus=2, include_dashboard=False)
    root = tmp_path_factory.mktemp("sandboxes")
    tr.start_broker(
        config,
        name="sbx",
        detached=False,
        sandbox_root=str(root),
        sandbox_isolate=isolation_problem() is None,
        data_dir=None,
    )
    yield root
    tr.stop_broker("sbx")
    ray.shutdown()


@pytest_asyncio.fixture
async def client(cluster: Path) -> AsyncIterator[tr.Client]:
    c = tr.Client(name="sbx")
    yield c
    await c.aclose()


@pytest.fixture(params=["cpu", "box"])
def pool(request: pytest.FixtureRequest, cluster: Path) -> str:
    if request.param == "box" and IMAGE["ref"] is None:
        pytest.skip(f"CONTAINER EXECUTOR NOT TESTED: {IMAGE['why']}")
    return str(request.param)


async def test_files_and_commands_of_one_trajectory(client: tr.Client, cluster: Path, pool: str):
    box = client.sandbox("traj-1", pool)
    assert (await box.status())["exists"] is False
    await box.upload("src/solution.py", "def f():\n    return 42\n")
    res = await box.exec(
        '{python} -c \'import sys; sys.path.insert(0, "src"); import solution; '
        "print(solution.f())' > out.txt; echo dop={dop}",
        cores=(1, len(CORES)),
    )
    assert res.ok, res.stderr
    assert res.stdout.startswith("dop=") and 1 <= res.dop <= len(CORES)
    assert await box.download("out.txt") == b"42\n"
    status = await box.status()
    assert status["exists"] is True and status["node"] == "local"
    await box.close()
    assert (await box.status())["exists"] is False
    assert not any(p.name == "traj-1" for p in cluster.rglob("traj-1"))


async def test_a_planted_link_is_not_followed(client: tr.Client, pool: str):
    async with client.sandbox("traj-link", pool) as box:
        res = await box.exec("ln -s /etc/hostname leak; mkdir d; ln -s /etc d/etc")
        assert res.ok, res.stderr
        with pytest.raises(SandboxError, match="symbolic link"):
            await box.download("leak")
        with pytest.raises(SandboxError, match="symbolic link"):
            await box.upload("d/etc/evil", "x")
        with pytest.raises(SandboxError, match=r"relative|inside|outside"):
            await box.download("../other/x")
    snap = await client.snapshot()
    assert snap["pools"][pool]["in_use"] == 0  # every operation's lease went back


async def test_trajectories_do_not_see_each_other(client: tr.Client, pool: str):
    async with client.sandbox("traj-a", pool) as a, client.sandbox("traj-b", pool) as b:
        await a.upload("secret.txt", "a's")
        with pytest.raises(SandboxError):
            await b.download("secret.txt")
        res = await b.exec("cat ../traj-a/secret.txt; cat /work/../traj-a/secret.txt")
        assert res.exit_code != 0 and "a's" not in res.stdout


async def test_files_move_only_under_a_valid_grant(client: tr.Client, cluster: Path):
    """The executor checks the grant on uploads as on commands: a call without one,
    made straight at the actor, is refused."""
    handle = ray.get_actor("sbx.sandbox.cpu.local", namespace="tangram")
    with pytest.raises(ray.exceptions.RayTaskError) as err:
        await handle.upload.remote("traj-x", "f.txt", b"x", CORES[:1], None)
    assert isinstance(err.value.cause, FencingError)


async def test_why_an_action_waits_and_the_status(client: tr.Client):
    """The Ray door answers what the HTTP one does: why a queued action waits, and the
    operator view (queue per tenant, oldest waiters, leases by age)."""
    import asyncio

    from tangram.spec import Action

    held = await client.acquire(Action.build("hog", {"cpu": len(CORES)}), timeout=10)
    waiter = Action.build("late", {"cpu": 1})
    task = asyncio.ensure_future(client.acquire(waiter, timeout=30))
    try:
        why = None
        for _ in range(100):
            why = await client.why_waiting(waiter.id) if waiter.id else None
            if why is not None:
                break
            await asyncio.sleep(0.05)
        assert why is not None and why["pool"] == "cpu"
        assert why["reason"] == "insufficient_units", why
        status = await client.status()
        assert [w["action"] for w in status["oldest_waiting"]] == [waiter.id]
        assert status["leases_by_age"]["<10s"] >= 1
        assert status["queued_by_tenant"] == {"cpu": {"": 1}}
    finally:
        await client.release(held.id)
    lease = await task
    assert await client.why_waiting(waiter.id) is None
    await client.release(lease.id)


async def test_stopping_the_broker_removes_its_containers(cluster: Path):
    """``stop_broker`` kills the executor actors, which cannot clean up after that: each
    removes its containers first, so none is left running (frozen) on the host."""
    if IMAGE["ref"] is None:
        pytest.skip(f"CONTAINER EXECUTOR NOT TESTED: {IMAGE['why']}")
    root = cluster / "second"
    config = {
        "pools": {
            "box": {
                "kind": "cpu",
                "nodes": [{"name": "local", "cores": CORES, "memory_gb": 8}],
                "sandbox": {"backend": "container", "image": IMAGE["ref"]},
            }
        }
    }
    tr.start_broker(config, name="sbx2", detached=False, sandbox_root=str(root), data_dir=None)
    client = tr.Client(name="sbx2")
    try:
        res = await client.sandbox("t", "box").exec("echo hi > f")
        assert res.ok, res.stderr
    finally:
        await client.aclose()
    state = root / "box" / "local" / "runc"
    listed = subprocess.run(["runc", "--root", str(state), "list", "-q"], capture_output=True)
    assert listed.stdout.split() != []  # the trajectory's container, before the stop
    tr.stop_broker("sbx2")
    listed = subprocess.run(["runc", "--root", str(state), "list", "-q"], capture_output=True)
    assert listed.stdout.split() == []
    assert str(root) not in Path("/proc/self/mounts").read_text()
