"""A crash load: ``tangram serve --data-dir`` killed with SIGKILL again and again while
clients lease, and what the clients saw, checked.

Clients loop ``HttpClient.acquire`` (which keeps polling its action's id across a
restart), hold the units a moment and release with the lease's fencing token. Every
grant is recorded on the client side: the lease and action ids, the fencing token, the
exact units and from when to when the client surely held them (from the answer that
granted it until it sent its release). The figures:

- ``double_held``: pairs of grants that held one unit at overlapping times;
- ``ids_reused``: action or lease ids that two grants share;
- ``token_regressions``: grants of actions submitted after a restart whose token is
  not above every token granted before the kill;
- ``leaked_units``: units still in use once every client has finished.

Used by ``tests/test_crash.py`` (ten kills) and ``benchmarks/bench_crash.py`` (fifty).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from tangram.client.http import HttpClient

CONFIG: dict[str, Any] = {
    "lease_ttl_seconds": 60,
    "pools": {
        "cpu": {"kind": "cpu", "nodes": [{"name": "n", "cores": 6, "numa": 2, "memory_gb": 64}]},
        "api": {"kind": "quota", "concurrency": 3},
    },
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``tangram serve`` as a subprocess on a fixed port and data directory."""

    def __init__(self, tmp: Path, config: dict[str, Any], *extra: str) -> None:
        self.cfg = tmp / "pools.yaml"
        self.cfg.write_text(yaml.safe_dump(config))
        self.data = tmp / "data"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tangram.cli", "serve", "--config", str(self.cfg),
             "--port", str(self.port), "--data-dir", str(self.data), *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "/healthz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("the server exited at start-up")
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not come up")
            time.sleep(0.02)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@dataclass
class Held:
    client: int
    action_id: str
    lease_id: str
    fencing: int
    units: list[tuple[str, str | None, Any]]
    submitted: float
    acked: float
    release_sent: float = float("inf")


async def client_loop(url: str, i: int, stop: asyncio.Event, log: list[Held]) -> int:
    rng = random.Random(i)
    done = 0
    # Retries long enough to ride out a restart (about a second here).
    async with HttpClient(url, retries=40, backoff=0.05, timeout=5.0, poll=5.0) as c:
        for k in itertools.count():
            if stop.is_set():
                break
            demands = {"cpu": {"min": 1, "max": 2}} if k % 3 else {"api": 1, "cpu": 1}
            submitted = time.monotonic()
            lease = await c.acquire({"trajectory": f"c{i}-{k}", "demands": demands}, timeout=120)
            held = Held(
                i,
                lease.action_id,
                lease.id,
                lease.fencing_token,
                [(p, a.node, u) for p, a in lease.allocation.items() for u in a.units],
                submitted,
                time.monotonic(),
            )
            log.append(held)
            await asyncio.sleep(rng.uniform(0.005, 0.04))
            held.release_sent = time.monotonic()
            await c.release(lease.id, fencing_token=lease.fencing_token)
            done += 1
    return done


def check(log: list[Held], restarts: list[tuple[float, float, int]]) -> dict[str, int]:
    """The figures of a run (see the module's docstring)."""
    by_unit: dict[tuple[str, str | None, Any], list[tuple[float, float, str]]] = {}
    for h in log:
        for u in h.units:
            by_unit.setdefault(u, []).append((h.acked, h.release_sent, h.lease_id))
    double = 0
    for spans in by_unit.values():
        spans.sort()
        for (_, end, _), (start, _, _) in itertools.pairwise(spans):
            double += start < end
    actions = [h.action_id for h in log]
    leases = [h.lease_id for h in log]
    reused = (len(actions) - len(set(actions))) + (len(leases) - len(set(leases)))
    regressions = 0
    for _, back, top in restarts:
        regressions += sum(1 for h in log if h.submitted > back and h.fencing <= top)
    tokens = [h.fencing for h in log]
    regressions += len(tokens) - len(set(tokens))
    return {"double_held": double, "ids_reused": reused, "token_regressions": regressions}


async def _run(
    server: Server, kills: int, clients: int, gap: tuple[float, float]
) -> dict[str, Any]:
    log: list[Held] = []
    restarts: list[tuple[float, float, int]] = []
    present: list[int] = []
    stop = asyncio.Event()
    rng = random.Random(0)

    async def killer() -> None:
        try:
            for _ in range(kills):
                await asyncio.sleep(rng.uniform(*gap))
                holding = [h for h in log if h.release_sent == float("inf")]
                top = max((h.fencing for h in log), default=0)
                killed = time.monotonic()
                server.kill()
                await asyncio.to_thread(server.start)
                restarts.append((killed, time.monotonic(), top))
                # Every lease a client was told it holds is still there (200), or its
                # holder released it meanwhile (409); never unknown (404) or expired.
                async with httpx.AsyncClient(base_url=server.url) as probe:
                    for h in holding:
                        r = await probe.post(f"/v1/leases/{h.lease_id}/heartbeat")
                        present.append(r.status_code)
        finally:
            stop.set()

    kill = asyncio.create_task(killer())
    done = await asyncio.gather(*(client_loop(server.url, i, stop, log) for i in range(clients)))
    await kill
    async with httpx.AsyncClient(base_url=server.url) as probe:
        pools = (await probe.get("/v1/pools")).json()
    leaked = sum(int(p["in_use"]) for p in pools["pools"].values())
    lost = sum(1 for code in present if code not in (200, 409))
    return {
        "kills": len(restarts),
        "grants": len(log),
        "cycles": sum(done),
        "held_at_kills": len(present),
        "held_leases_lost": lost,
        **check(log, restarts),
        "leaked_units": leaked,
        "queued_left": int(pools["queued"]),
    }


def run(
    tmp: Path,
    *,
    kills: int,
    clients: int = 8,
    gap: tuple[float, float] = (0.2, 0.6),
    config: dict[str, Any] | None = None,
    extra: tuple[str, ...] = (),
) -> dict[str, Any]:
    """``kills`` SIGKILLs and restarts under ``clients`` lease loops; the figures.
    ``extra``: more options for ``tangram serve``."""
    server = Server(tmp, config or CONFIG, *extra)
    server.start()
    try:
        return asyncio.run(_run(server, kills, clients, gap))
    finally:
        server.stop()
