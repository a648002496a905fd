"""The broker as a Ray actor, the Ray client and the executors, on one real local Ray
cluster shared by the whole module (Ray start-up is the slow part)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
import ray

import tangram
import tangram.ray as tr
from tangram.executors import Command, HttpCall, ServiceCall, ServiceSpec
from tangram.executors.sandbox import isolation_problem
from tangram.spec import Action, ActionCancelled, InvalidAction, LeaseExpired, Resident

CORES = sorted(os.sched_getaffinity(0))
PY = sys.executable
CONFIG: dict[str, Any] = {
    "lease_ttl_seconds": 30,
    "pools": {
        "cpu": {"kind": "cpu", "nodes": [{"name": "local", "cores": CORES, "memory_gb": 8}]},
        "gpu": {
            "kind": "gpu",
            "nodes": [{"name": "g0", "gpus": 1, "memory_gb": 10}],
            # Both do not fit on the one GPU at once: running one evicts the other.
            "services": {
                "rm": {"memory_gb": 8, "restore_seconds": 5.0},
                "judge": {"memory_gb": 8, "restore_seconds": 5.0},
            },
        },
        "api": {"kind": "quota", "concurrency": 4, "tokens_per_minute": 100_000},
        "permits": {"kind": "quota", "concurrency": 4},
    },
}


def tiny_model() -> dict[str, Any]:
    return {"w": np.arange(64.0).reshape(8, 8)}


def apply_model(state: dict[str, Any], x: list[float]) -> list[float]:
    return [float(v) for v in np.asarray(x) @ state["w"]]


SERVICES = [
    ServiceSpec("rm", tiny_model, apply_model),
    ServiceSpec("judge", tiny_model, lambda s, x: "judged"),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    # Ray workers cannot import this test module: ship its functions by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, resources={"sandbox": 4}, include_dashboard=False)
    root = str(tmp_path_factory.mktemp("sandboxes"))
    handle = tr.start_broker(
        CONFIG,
        detached=False,
        services=SERVICES,
        sandbox_root=root,
        # Isolated wherever bubblewrap is there (tests/test_sandbox_isolation.py says
        # loudly where it is not); the behaviour under test is the same either way.
        sandbox_isolate=isolation_problem() is None,
    )
    yield handle
    tr.stop_broker()
    ray.shutdown()


@pytest_asyncio.fixture
async def client(cluster: Any) -> AsyncIterator[tr.Client]:
    c = tr.Client()
    yield c
    await c.aclose()


async def in_use(c: tr.Client, pool: str) -> int:
    snap = await c.snapshot()
    return int(snap["pools"][pool]["in_use"])


async def until(c: tr.Client, ok: Any, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not ok(await c.snapshot()):
        assert time.monotonic() < deadline, "the broker did not settle"
        await asyncio.sleep(0.02)


def cpu(traj: str, lo: int = 1, hi: int = 1, **kw: Any) -> Action:
    return Action.build(traj, {"cpu": (lo, hi)}, **kw)


# ---------------------------------------------------------------- the actor
def test_actor_is_found_by_name(cluster: Any):
    assert ray.get(tr.get_broker().ping.remote())["name"] == "tangram"
    with pytest.raises(tr.BrokerNotFound, match="no Tangram broker named 'other'"):
        tr.get_broker("other")
    with pytest.raises(ValueError, match="already runs"):
        tr.start_broker(CONFIG, detached=False)
    with pytest.raises(ValueError, match="device_kind must be"):
        tr.start_broker(CONFIG, name="other", device_kind="tpu", detached=False)
    with pytest.raises(ValueError, match="invalid configuration"):
        tr.start_broker({"pools": {}}, name="other", detached=False)
    assert tr.stop_broker("other") is False


def test_pool_nodes_must_map_to_ray_nodes():
    from tangram.ray.executors import PlacementError, resolve_node

    nodes = [{"NodeID": "aa"}, {"NodeID": "bb"}]
    assert resolve_node("bb", None, nodes) == "bb"
    assert resolve_node("n0", {"n0": "aa"}, nodes) == "aa"
    assert resolve_node("n0", None, nodes[:1]) == "aa"  # one node: everything goes there
    with pytest.raises(PlacementError, match="pass placement="):
        resolve_node("n0", None, nodes)
    with pytest.raises(PlacementError, match="not an alive Ray node"):
        resolve_node("n0", {"n0": "cc"}, nodes)


# ---------------------------------------------------------------- leases
async def test_lease_holds_exact_units_and_releases(client: tr.Client):
    async with client.lease(cpu("t-lease")) as lease:
        alloc = lease.allocation["cpu"]
        assert alloc.node == "local" and set(alloc.units) <= set(CORES)
        assert await in_use(client, "cpu") == 1
    assert await in_use(client, "cpu") == 0


async def test_many_concurrent_actions_respect_the_cap(client: tr.Client):
    live = peak = 0

    async def one(i: int) -> None:
        nonlocal live, peak
        async with client.lease(Action.build(f"t{i}", {"permits": 1})):
            live += 1
            peak = max(peak, live)
            await asyncio.sleep(0.001)
            live -= 1

    before = sum(client.calls.values())
    await asyncio.gather(*(one(i) for i in range(300)))
    assert peak == 4
    # 600 submissions and releases; batched, far fewer Ray calls than that.
    assert sum(client.calls.values()) - before < 300
    snap = await client.snapshot()
    assert snap["pools"]["permits"]["in_use"] == 0 and snap["queued"] == 0


async def test_timeout_leaves_the_queue_and_leaks_nothing(client: tr.Client):
    holders = [await client.acquire(cpu(f"hold{i}")) for i in range(len(CORES))]
    with pytest.raises(TimeoutError):
        await client.acquire(cpu("late"), timeout=0.3)
    for lease in holders:
        await client.release(lease.id)
    # A grant that raced with the cancel is given back as abandoned: nothing leaks.
    await until(client, lambda s: s["queued"] == 0 and s["pools"]["cpu"]["in_use"] == 0)


async def test_closing_a_client_cancels_its_queued_actions(client: tr.Client):
    holders = [await client.acquire(Action.build("full", {"permits": 1})) for _ in range(4)]
    other = tr.Client()
    waiting = asyncio.ensure_future(other.acquire(Action.build("w", {"permits": 1})))
    await until(client, lambda s: s["queued"] == 1)
    await other.aclose()
    with pytest.raises(ActionCancelled):
        await waiting
    await until(client, lambda s: s["queued"] == 0)
    for lease in holders:
        await client.release(lease.id)
    assert await in_use(client, "permits") == 0


async def test_bad_actions_get_clear_errors(client: tr.Client):
    with pytest.raises(InvalidAction, match="unknown pool 'nope'"):
        await client.acquire(Action.build("t", {"nope": 1}))
    with pytest.raises(InvalidAction, match="needs trajectory"):
        await client.run(tangram.action(cpu=1)(lambda: Command("true"))())
    with pytest.raises(InvalidAction, match="give a Command"):
        await client.run(cpu("t"), "echo hi")
    with pytest.raises(ValueError, match="timeout must be a positive"):
        await client.run(cpu("t"), Command("true", timeout=-1))
    assert await in_use(client, "cpu") == 0


def test_usable_from_a_plain_ray_task(cluster: Any):
    @ray.remote(num_cpus=0)
    def task() -> list[int]:
        async def body() -> list[int]:
            async with tr.Client() as c, c.lease(Action.build("t-task", {"cpu": 1})) as lease:
                return list(lease.allocation["cpu"].units)

        return asyncio.run(body())

    assert set(ray.get(task.remote())) <= set(CORES)


async def test_dead_client_leases_expire(cluster: Any, client: tr.Client):
    @ray.remote(num_cpus=0)
    class Worker:
        async def grab(self) -> str:
            self.c = tr.Client()
            lease = await self.c.acquire(Action.build("doomed", {"permits": 1}, ttl=1.0))
            return lease.id

    w = Worker.remote()  # type: ignore[attr-defined]
    await w.grab.remote()
    assert await in_use(client, "permits") == 1
    ray.kill(w)  # SIGKILL: no release, no heartbeat
    deadline = time.monotonic() + 5
    while await in_use(client, "permits") and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert await in_use(client, "permits") == 0


async def test_heartbeats_keep_a_short_lease_alive(client: tr.Client):
    async with client.lease(Action.build("hb", {"permits": 1}, ttl=30)):
        await asyncio.sleep(0.05)  # the heartbeat task now sleeps 10 s
        async with client.lease(Action.build("hb", {"permits": 1}, ttl=1.0)):
            await asyncio.sleep(2.5)  # longer than the TTL: only heartbeats keep it
    lease = await client.acquire(Action.build("hb2", {"permits": 1}, ttl=0.3))
    await asyncio.sleep(0.6)  # not held by a context: nobody heartbeats it
    with pytest.raises(LeaseExpired):
        await client.release(lease.id)


# ---------------------------------------------------------------- sandbox executor
AFFINITY = f"{PY} -c 'import os; print(sorted(os.sched_getaffinity(0)))'; echo dop={{dop}}"


@tangram.action(cpu=(1, len(CORES)), key="cpu", duration=2.0, efficiency={"amdahl": 0.99})
def affinity_probe() -> Command:
    return Command(AFFINITY)


async def test_run_sees_exactly_the_granted_cores(client: tr.Client):
    res = await client.run(affinity_probe(), trajectory="t-aff")
    # Idle pool, elastic and profiled: the scheduler gives it every core.
    assert res.stdout == f"{CORES}\ndop={len(CORES)}\n"
    assert res.cores == tuple(CORES) and res.dop == len(CORES)
    one = await client.run(cpu("t-aff"), Command(AFFINITY))
    assert len(one.cores) == 1 and one.stdout == f"{list(one.cores)}\ndop=1\n"
    await client.close_trajectory("t-aff")


async def test_timeout_kills_the_child_and_releases_the_cores(client: tr.Client):
    t0 = time.monotonic()
    res = await client.run(cpu("t-slow"), Command("sleep 30", timeout=0.5))
    assert res.timed_out and res.exit_code < 0 and time.monotonic() - t0 < 10
    assert await in_use(client, "cpu") == 0
    await client.close_trajectory("t-slow")


async def test_workdir_persists_and_closing_removes_it(client: tr.Client):
    await client.run(cpu("t-dir"), Command("echo kept > f.txt"))
    res = await client.run(cpu("t-dir"), Command("cat f.txt"))
    assert res.stdout == "kept\n"
    executor = tr.find_executor("tangram", "tangram", "sandbox", "cpu", "local")
    assert "t-dir" in await executor.trajectories.remote()
    await client.close_trajectory("t-dir")
    assert "t-dir" not in await executor.trajectories.remote()
    assert not Path(res.workdir).exists()


async def test_a_stale_lease_holder_cannot_run_on_regranted_cores(client: tr.Client):
    n = len(CORES)
    # Acquired but never held: no heartbeats, so it expires like a stalled client's.
    stale = await client.acquire(cpu("t-stale", n, n, ttl=0.5))
    await until(client, lambda s: s["pools"]["cpu"]["in_use"] == 0)
    fresh = await client.run(cpu("t-fresh", n, n), Command("echo fresh"))
    assert fresh.ok and set(fresh.cores) == set(stale.allocation["cpu"].units)
    with pytest.raises(
        tr.StaleLease,
        match=rf"fencing token {stale.fencing_token} is older than token \d+ .*lease {stale.id}",
    ) as refused:
        await client.run_on(stale, Command("echo stale > ran.txt"))
    assert refused.value.token == stale.fencing_token
    assert refused.value.newest > stale.fencing_token
    executor = tr.find_executor("tangram", "tangram", "sandbox", "cpu", "local")
    root = (await executor.info.remote())["root"]
    assert not (Path(root) / "t-stale" / "ran.txt").exists()  # nothing ran
    # The newer holder keeps running on those cores.
    assert (await client.run(cpu("t-fresh", n, n), Command("echo again"))).ok
    for t in ("t-stale", "t-fresh"):
        await client.close_trajectory(t)


async def test_killed_executor_fails_the_action_and_returns_units(client: tr.Client):
    executor = tr.find_executor("tangram", "tangram", "sandbox", "cpu", "local")
    task = asyncio.ensure_future(client.run(cpu("t-kill"), Command("sleep 20", timeout=60)))
    deadline = time.monotonic() + 10
    while (await executor.info.remote())["running"] == 0:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    ray.kill(executor, no_restart=False)  # dies now; Ray restarts it (max_restarts)
    with pytest.raises(
        tr.ExecutorError,
        match=r"(died while running|unavailable \(restarting\) for) action .* units returned",
    ):
        await task
    assert await in_use(client, "cpu") == 0
    # Ray restarts it (slowly under load); an action sent meanwhile fails the same way.
    while True:
        try:
            await executor.info.remote()
            break
        except ray.exceptions.RayActorError:
            assert time.monotonic() < deadline + 30, "the executor did not come back"
            await asyncio.sleep(0.2)
    # The restarted executor serves the next action.
    res = await client.run(cpu("t-kill"), Command("echo back"))
    assert res.stdout == "back\n"
    await client.close_trajectory("t-kill")


# ---------------------------------------------------------------- GPU service executor
def gpu(traj: str, service: str) -> Action:
    return Action.build(traj, {"gpu": 1}, service=service, duration=0.1)


async def test_service_restores_runs_and_evicts_on_the_cpu_device(client: tr.Client):
    broker = tr.get_broker()
    before = await broker.counters.remote("gpu")
    x = [1.0] * 8
    first = await client.run(gpu("t-g", "rm"), ServiceCall(x))
    assert first.restored and first.device == "cpu"
    assert first.output == apply_model(tiny_model(), x)
    warm = await client.run(gpu("t-g", "rm"), ServiceCall(x))
    assert not warm.restored
    other = await client.run(gpu("t-g", "judge"), ServiceCall(x))
    assert other.output == "judged" and other.restored
    rm, judge = Resident("rm", 1, "g0", 0), Resident("judge", 1, "g0", 0)
    assert other.evicted == [rm] and other.resident == [judge]
    back = await client.run(gpu("t-g", "rm"), ServiceCall(x))
    assert back.restored and back.evicted == [judge]
    await asyncio.sleep(0.2)  # the measured restore times are reported fire-and-forget
    after = await broker.counters.remote("gpu")
    assert after["evictions"] - before["evictions"] == 2
    # Measured copies of a tiny model take far less than the configured 5 s.
    assert after["restore_seconds:rm"] < 5.0 * 0.8 + 0.01
    assert await in_use(client, "gpu") == 0


# ---------------------------------------------------------------- API calls
class _Api(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        data = json.dumps({"usage": {"total_tokens": body["n"]}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


async def test_http_call_under_quota_reports_tokens(client: tr.Client):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    broker = tr.get_broker()
    before = await broker.counters.remote("api")
    try:
        act = Action.build("t-api", {"api": 1}, tokens=500)
        res = await client.run(act, HttpCall(url, json={"n": 123}))
    finally:
        server.shutdown()
    assert res.ok and res.tokens == 123
    after = await broker.counters.remote("api")
    assert after["tokens_used_total"] - before["tokens_used_total"] == 123
    assert after["tokens_estimated_total"] - before["tokens_estimated_total"] == 500


# ---------------------------------------------------------------- one state, two doors
def _app_factory(broker: Any) -> Any:
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/snapshot")
    def snapshot() -> dict[str, Any]:
        return broker.snapshot()  # type: ignore[no-any-return]

    return app


async def test_http_app_served_from_the_actor_shares_its_broker(client: tr.Client):
    import httpx

    broker = tr.get_broker()
    port = await broker.serve_http.remote(_app_factory)
    try:
        async with client.lease(Action.build("t-http", {"permits": 2})), httpx.AsyncClient() as h:
            snap = (await h.get(f"http://127.0.0.1:{port}/snapshot")).json()
        assert snap["pools"]["permits"]["in_use"] == 2
    finally:
        await broker.stop_http.remote()


async def test_sandboxed_code_cannot_reach_the_brokers_port(client: tr.Client):
    if (problem := isolation_problem()) is not None:
        pytest.skip(f"SANDBOX ISOLATION NOT TESTED: {problem}")
    import httpx

    broker = tr.get_broker()
    port = await broker.serve_http.remote(_app_factory)
    code = (
        "import socket\n"
        "try:\n"
        f"    socket.create_connection(('127.0.0.1', {port}), timeout=3)\n"
        "except OSError as exc:\n"
        "    print('refused', exc)\n"
        "    raise SystemExit(7)\n"
    )
    try:
        res = await client.run(cpu("t-esc"), Command([PY, "-c", code]))
        assert res.exit_code == 7, res.stdout + res.stderr
        # The broker keeps serving, over HTTP and to the Ray client.
        async with httpx.AsyncClient() as h:
            snap = (await h.get(f"http://127.0.0.1:{port}/snapshot")).json()
        assert snap["pools"]["cpu"]["in_use"] == 0
        assert (await client.run(cpu("t-esc"), Command("echo ok"))).stdout == "ok\n"
    finally:
        await broker.stop_http.remote()
        await client.close_trajectory("t-esc")


async def test_the_lease_api_and_the_ray_client_share_one_broker(client: tr.Client):
    import httpx

    broker = tr.get_broker()
    port = await broker.serve_http.remote()  # tangram.server's app, over this broker
    base = f"http://127.0.0.1:{port}/v1"
    try:
        async with httpx.AsyncClient() as http:
            body = {"trajectory": "t-door", "demands": {"permits": 3}}
            got = (await http.post(f"{base}/actions", params={"wait": 5}, json=body)).json()
            assert got["state"] == "granted"
            assert await in_use(client, "permits") == 3  # granted over HTTP, seen over Ray
            with pytest.raises(TimeoutError):  # 1 of 4 permits left
                await client.acquire(Action.build("t-door", {"permits": 2}), timeout=0.3)
            # The cancel of the timed-out action and the HTTP release below race; a grant
            # that wins goes back as abandoned. Let the cancel land first.
            await until(client, lambda snap: snap["queued"] == 0)
            lease_id = got["lease"]["id"]
            assert (await http.post(f"{base}/leases/{lease_id}/release")).status_code == 200
        assert await in_use(client, "permits") == 0
    finally:
        await broker.stop_http.remote()


# ---------------------------------------------------------------- the example
async def test_rollout_example_runs(client: tr.Client):
    sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
    try:
        import ray_rollout
    finally:
        sys.path.pop(0)
    ray.cloudpickle.register_pickle_by_value(ray_rollout)
    report = await ray_rollout.rollout(trajectories=2, turns=2)
    assert report["actions"] == 4 and report["failed"] == 0
    assert await in_use(client, "cpu") == 0


# ---------------------------------------------------------------- the live benchmark
def test_live_benchmark_runs_both_modes(cluster: Any):
    from tangram.ray.live import format_report, live

    out = live(trajectories=2, steps=1, gap=0.05, xdist=False)
    for mode in ("tangram", "reservation"):
        assert out[mode]["actions"] == 6 and out[mode]["failures"] == 0
        assert set(out[mode]["act_by_label_seconds"]) == {"write", "snippet", "suite"}
    assert out["act_speedup"] > 0 and "reservation / tangram" in format_report(out)
    # Its broker is gone again; the module's broker is untouched.
    assert ray.get(tr.get_broker().ping.remote())["name"] == "tangram"
    with pytest.raises(ValueError, match="at least 1"):
        live(trajectories=0)
