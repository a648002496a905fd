"""Crashes: the broker killed with SIGKILL mid-load and restarted on its data directory,
and a client killed while it holds leases. Real processes on loopback throughout."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tangram.client.http import HttpClient


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``tangram serve`` as a subprocess on a fixed port and data directory."""

    def __init__(self, tmp: Path, config: dict[str, Any]) -> None:
        self.cfg = tmp / "pools.yaml"
        self.cfg.write_text(yaml.safe_dump(config))
        self.data = tmp / "data"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tangram.cli", "serve", "--config", str(self.cfg),
             "--port", str(self.port), "--data-dir", str(self.data)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "/healthz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert self.proc.poll() is None, "the server exited at start-up"
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.05)

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
    lease_id: str
    fencing: int
    units: list[tuple[str, str | None, Any]]
    submitted: float
    acked: float
    release_sent: float = float("inf")


CRASH_CONFIG = {
    "lease_ttl_seconds": 60,
    "pools": {
        "cpu": {"kind": "cpu", "nodes": [{"name": "n", "cores": 6, "numa": 2, "memory_gb": 64}]},
        "api": {"kind": "quota", "concurrency": 3},
    },
}


async def client_loop(url: str, i: int, cycles: int, log: list[Held]) -> int:
    rng = random.Random(i)
    done = 0
    # Retries long enough to ride out a restart (about 2 s here).
    async with HttpClient(url, retries=12, backoff=0.05, timeout=5.0, poll=5.0) as c:
        for k in range(cycles):
            demands = {"cpu": {"min": 1, "max": 2}} if k % 3 else {"api": 1, "cpu": 1}
            submitted = time.monotonic()
            lease = await c.acquire({"trajectory": f"c{i}-{k}", "demands": demands}, timeout=120)
            held = Held(
                lease.id,
                lease.fencing_token,
                [(p, a.node, u) for p, a in lease.allocation.items() for u in a.units],
                submitted,
                time.monotonic(),
            )
            log.append(held)
            await asyncio.sleep(rng.uniform(0.005, 0.04))
            held.release_sent = time.monotonic()
            await c.release(lease.id)
            done += 1
    return done


def test_leases_survive_a_broker_killed_mid_load(tmp_path: Path) -> None:
    server = Server(tmp_path, CRASH_CONFIG)
    server.start()
    log: list[Held] = []
    restarts: list[tuple[float, float, int]] = []  # (killed at, back at, top fencing acked)
    present: list[tuple[str, int]] = []

    async def killer() -> None:
        for _ in range(3):
            await asyncio.sleep(0.8)
            holding = [h for h in log if h.release_sent == float("inf")]
            top = max((h.fencing for h in log), default=0)
            killed = time.monotonic()
            server.kill()
            await asyncio.to_thread(server.start)
            restarts.append((killed, time.monotonic(), top))
            # Every lease a client was told it holds is still there (200), or its holder
            # already released it again (409); never unknown (404) or expired (410).
            async with httpx.AsyncClient(base_url=server.url) as probe:
                for h in holding:
                    r = await probe.post(f"/v1/leases/{h.lease_id}/heartbeat")
                    present.append((h.lease_id, r.status_code))

    async def main() -> list[int]:
        kill = asyncio.create_task(killer())
        done = await asyncio.gather(*(client_loop(server.url, i, 60, log) for i in range(8)))
        await kill
        return list(done)

    try:
        done = asyncio.run(main())
    finally:
        server.stop()

    assert done == [60] * 8, "a client did not finish its work"
    assert len(restarts) == 3
    assert present, "no lease was held at any kill: the test proved nothing"
    assert all(code in (200, 409) for _, code in present), present
    # No unit was ever held by two leases: a holder surely holds its units from the
    # grant's answer until it sends its release.
    by_unit: dict[tuple[str, str | None, Any], list[tuple[float, float, str]]] = {}
    for h in log:
        for u in h.units:
            by_unit.setdefault(u, []).append((h.acked, h.release_sent, h.lease_id))
    for unit, spans in by_unit.items():
        spans.sort()
        for (_, end, a), (start, _, b) in itertools.pairwise(spans):
            assert start >= end, f"{unit} held by {a} and {b} at once"
    # Fencing tokens never repeat, and every action submitted after a restart gets a
    # token above every token acknowledged before the kill.
    tokens = [h.fencing for h in log]
    assert len(set(tokens)) == len(tokens)
    for _, back, top in restarts:
        after = [h.fencing for h in log if h.submitted > back]
        assert after and min(after) > top


HOLDER = textwrap.dedent(
    """
    import asyncio, sys
    from tangram.client.http import HttpClient

    async def main(url):
        async with HttpClient(url) as c:
            async with c.lease({"trajectory": "dying", "demands": {"cpu": 2}}):
                async with c.lease({"trajectory": "dying2", "demands": {"cpu": 1}}):
                    print("held", flush=True)
                    await asyncio.sleep(3600)

    asyncio.run(main(sys.argv[1]))
    """
)


def test_units_of_a_killed_client_come_back_within_ttl(tmp_path: Path) -> None:
    ttl = 2.0
    cfg = {"lease_ttl_seconds": ttl, "pools": CRASH_CONFIG["pools"]}
    server = Server(tmp_path, cfg)
    server.start()
    try:
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, server.url], stdout=subprocess.PIPE, text=True
        )
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"

        def in_use() -> int:
            pools = httpx.get(server.url + "/v1/pools").json()["pools"]
            return int(pools["cpu"]["in_use"])

        time.sleep(ttl * 1.5)  # heartbeats keep them alive past one TTL
        assert in_use() == 3
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        killed = time.monotonic()
        while in_use() and time.monotonic() - killed < 30:
            time.sleep(0.05)
        back = time.monotonic() - killed
        assert in_use() == 0
        # Within the TTL (plus one heartbeat interval, a third of it, and slack).
        assert back <= ttl + ttl / 3 + 0.5, f"units came back after {back:.2f} s"
        # Both leases were taken back by expiry, as the metrics say.
        expired = sum(
            sample.value
            for fam in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)
            if fam.name == "tangram_actions_expired"
            for sample in fam.samples
            if sample.name.endswith("_total")
        )
        assert expired == 2
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
