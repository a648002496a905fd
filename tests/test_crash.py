"""Crashes: the broker killed with SIGKILL mid-load and restarted on its data directory,
and a client killed while it holds leases. Real processes on loopback throughout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import crashload
from crashload import Server


def test_no_unit_held_twice_and_no_id_reused_across_ten_kills(tmp_path: Path) -> None:
    """Ten SIGKILLs and restarts under eight lease loops that poll their action ids
    across the restarts (the issue's check; benchmarks/bench_crash.py runs fifty)."""
    out = crashload.run(tmp_path, kills=10, clients=8)
    print(out)
    assert out["kills"] == 10
    assert out["held_at_kills"] > 0, "no lease was held at any kill: the test proved nothing"
    # Leases really cycled between the kills. Not a rate: on a loaded 2-core machine a
    # restart takes seconds and CI saw 67 grants in one run (186 when idle).
    assert out["grants"] >= 3 * out["kills"], out
    assert out["held_leases_lost"] == 0, out
    assert out["double_held"] == 0, out
    assert out["ids_reused"] == 0, out
    assert out["token_regressions"] == 0, out
    assert out["leaked_units"] == 0, out
    assert out["queued_left"] == 0, out


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
    cfg = {"lease_ttl_seconds": ttl, "pools": crashload.CONFIG["pools"]}
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
