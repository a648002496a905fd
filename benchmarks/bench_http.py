"""Lease cycles per second over HTTP: ``tangram serve`` against a do-nothing FastAPI app.

N concurrent clients, each its own ``httpx.AsyncClient`` with one keep-alive connection,
run lease cycles for a fixed time: ``POST /v1/actions?wait=10`` (submit and wait for the
grant, with an Idempotency-Key as ``HttpClient`` sends) and then
``POST /v1/leases/{id}/release``. The grant latency is the submit's round trip as the
client sees it. The pool has more permits than there are clients, so the figures are
the API's cost, not queueing.

The reference, in the same run, is the same clients doing the same two requests with the
same bodies against a FastAPI app whose endpoints do nothing, served by uvicorn with the
same settings (one worker, uvloop and httptools, no access log): the framework's ceiling
on this machine. Both servers are subprocesses; the clients may be spread over several
processes (``--procs``) since an httpx request costs the client more CPU than the server.
Rounds alternate (noop, tangram, noop, tangram, ...) and the best round of each counts.
The last line of output is JSON with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from starlette.responses import Response

TARGET_CYCLES = 2000.0
TARGET_RATIO = 0.5
BODY = {"trajectory": "bench", "demands": {"api": 1}}
POOLS_YAML = """\
pools:
  api:
    kind: quota
    concurrency: 4096
server:
  max_queued: 100000
"""


# --------------------------------------------------------------------------- servers


def noop_app() -> FastAPI:
    """The reference: the two endpoints a lease cycle calls, doing nothing."""
    app = FastAPI()
    granted = b'{"id":"a1","state":"granted","lease":{"id":"l1"}}'

    @app.post("/noop/actions")
    async def submit(request: Request) -> Response:
        return Response(granted, media_type="application/json")

    @app.post("/noop/leases/{lease_id}/release")
    async def release(lease_id: str) -> Response:
        return Response(b'{"state":"released"}', media_type="application/json")

    return app


def serve_noop(info: Path) -> None:
    """Run the reference server (in a subprocess): same uvicorn settings as tangram's."""
    import uvicorn

    from tangram.server.run import bind, url_of, uvicorn_config

    sock = bind("127.0.0.1", 0)
    info.write_text(json.dumps({"url": url_of(sock)}) + "\n")
    uvicorn.Server(uvicorn_config(noop_app())).run(sockets=[sock])


def start(cmd: list[str], info: Path) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    end = time.monotonic() + 120
    while time.monotonic() < end:
        if info.exists() and info.read_text().endswith("\n"):
            url = str(json.loads(info.read_text())["url"])
            try:  # bound before it serves: ask until it answers
                if httpx.get(url + "/openapi.json", timeout=30).status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                pass
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"server did not start: {cmd}")


# --------------------------------------------------------------------------- clients


async def clients(url: str, prefix: str, n: int, seconds: float, start_at: float) -> dict[str, Any]:
    body = json.dumps(BODY).encode()
    headers = {"content-type": "application/json"}
    release_body = b'{"outcome":"ok"}'
    submit_path = f"{prefix}/actions?wait=10"
    conns = [httpx.AsyncClient(base_url=url, timeout=30) for _ in range(n)]
    lat: list[float] = []
    cycles = 0

    async def one(c: httpx.AsyncClient, deadline: float) -> None:
        nonlocal cycles
        while True:
            t0 = time.perf_counter()
            if t0 >= deadline:
                return
            key = {**headers, "idempotency-key": uuid.uuid4().hex}
            r = await c.post(submit_path, content=body, headers=key)
            t1 = time.perf_counter()
            data = r.json()
            if data["state"] != "granted":
                raise RuntimeError(f"not granted: {r.status_code} {r.text}")
            r = await c.post(
                f"{prefix}/leases/{data['lease']['id']}/release",
                content=release_body,
                headers=headers,
            )
            if r.status_code != 200:
                raise RuntimeError(f"release failed: {r.status_code} {r.text}")
            if t1 < deadline:
                lat.append(t1 - t0)
                cycles += 1

    for c in conns:  # open every connection before the clock starts
        await c.get("/healthz" if prefix == "/v1" else "/docs")
    await asyncio.sleep(max(0.0, start_at - time.time()))
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    await asyncio.gather(*(one(c, t0 + seconds) for c in conns))
    cpu = time.process_time() - cpu0
    for c in conns:
        await c.aclose()
    return {"cycles": cycles, "seconds": seconds, "latencies": lat, "cpu": cpu}


async def _answer(r: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await r.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    return status, await r.readexactly(length)


async def raw_clients(
    url: str, prefix: str, n: int, seconds: float, start_at: float
) -> dict[str, Any]:
    """The same cycles over bare asyncio streams (HTTP/1.1 keep-alive, one connection per
    client): what the servers sustain when the client costs next to nothing."""
    host, port = url.rsplit("//", 1)[1].rsplit(":", 1)
    body = json.dumps(BODY).encode()
    release_body = b'{"outcome":"ok"}'
    lat: list[float] = []
    cycles = 0

    def request(path: str, payload: bytes, extra: bytes = b"") -> bytes:
        return (
            b"POST %s HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\n"
            b"%scontent-length: %d\r\n\r\n%s"
        ) % (path.encode(), host.encode(), extra, len(payload), payload)

    async def one(deadline: float) -> None:
        nonlocal cycles
        r, w = await asyncio.open_connection(host, int(port))
        await asyncio.sleep(max(0.0, start_at - time.time()))
        while (t0 := time.perf_counter()) < deadline:
            key = b"idempotency-key: %s\r\n" % uuid.uuid4().hex.encode()
            w.write(request(f"{prefix}/actions?wait=10", body, key))
            status, data = await _answer(r)
            t1 = time.perf_counter()
            lease = json.loads(data)["lease"]["id"]
            w.write(request(f"{prefix}/leases/{lease}/release", release_body))
            status2, _ = await _answer(r)
            if status != 200 or status2 != 200:
                raise RuntimeError(f"cycle failed: {status} {status2}")
            if t1 < deadline:
                lat.append(t1 - t0)
                cycles += 1
        w.close()

    wait = max(0.0, start_at - time.time())
    deadline = time.perf_counter() + wait + seconds
    cpu0 = time.process_time()
    await asyncio.gather(*(one(deadline) for _ in range(n)))
    cpu = time.process_time() - cpu0
    return {"cycles": cycles, "seconds": seconds, "latencies": lat, "cpu": cpu}


def client_process(args: tuple[str, str, str, int, float, float]) -> dict[str, Any]:
    kind, *rest = args
    run = raw_clients if kind == "raw" else clients
    try:
        import uvloop

        return uvloop.run(run(*rest))  # type: ignore[arg-type]
    except ImportError:
        return asyncio.run(run(*rest))  # type: ignore[arg-type]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    kind: str, url: str, prefix: str, n: int, procs: int, seconds: float, pid: int
) -> dict[str, float]:
    """Cycles/s and grant latency of ``n`` clients spread over ``procs`` processes, and
    the server's CPU time per cycle (steadier than cycles/s on a shared machine)."""
    per = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]
    start_at = time.time() + 1.0 + 0.02 * n  # every process connected by then
    jobs = [(kind, url, prefix, k, seconds, start_at) for k in per if k]
    with mp.get_context("spawn").Pool(len(jobs)) as pool:
        cpu0 = cpu_seconds(pid)
        parts = pool.map(client_process, jobs)
        cpu = cpu_seconds(pid) - cpu0  # includes connecting: a little over, for both
    lat = sorted(x for p in parts for x in p["latencies"])
    cycles = sum(p["cycles"] for p in parts)
    return {
        "cycles_per_s": cycles / seconds,
        "p50_ms": 1000 * lat[len(lat) // 2] if lat else float("nan"),
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan"),
        "mean_ms": 1000 * statistics.fmean(lat) if lat else float("nan"),
        "cycles": cycles,
        "server_cpu_us": 1e6 * cpu / cycles if cycles else float("nan"),
        "client_cpu_us": 1e6 * sum(p["cpu"] for p in parts) / cycles if cycles else float("nan"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    ap.add_argument("--procs", type=int, default=1, help="client processes (default 1)")
    ap.add_argument("--seconds", type=float, default=5.0, help="length of one round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per server (best counts)")
    ap.add_argument(
        "--client",
        choices=("httpx", "raw"),
        default="httpx",
        help="httpx.AsyncClient per client (default), or bare asyncio streams",
    )
    ap.add_argument("--serve-noop", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve_noop is not None:
        serve_noop(a.serve_noop)
        return

    tmp = Path(tempfile.mkdtemp(prefix="bench-http-"))
    (tmp / "pools.yaml").write_text(POOLS_YAML)
    py = sys.executable
    tangram_cmd = [py, "-m", "tangram.cli", "serve", "--port", "0"]
    tangram_cmd += ["--config", str(tmp / "pools.yaml"), "--data-dir", str(tmp / "t")]
    servers = {
        "tangram": start(tangram_cmd, tmp / "t" / "serve.json"),
        "noop": start([py, __file__, "--serve-noop", str(tmp / "noop.json")], tmp / "noop.json"),
    }
    prefix = {"tangram": "/v1", "noop": "/noop"}
    print(
        f"{a.clients} {a.client} clients in {a.procs} process(es), {a.rounds} rounds of "
        f"{a.seconds:g} s "
        f"each, {os.cpu_count()} CPUs",
        file=sys.stderr,
    )
    best: dict[str, dict[str, float]] = {}
    try:
        for r in range(a.rounds):
            for name in ("noop", "tangram"):
                proc, url = servers[name]
                m = measure(a.client, url, prefix[name], a.clients, a.procs, a.seconds, proc.pid)
                print(
                    f"round {r + 1} {name:8s} {m['cycles_per_s']:8.0f} cycles/s  "
                    f"p50 {m['p50_ms']:6.2f} ms  p99 {m['p99_ms']:6.2f} ms  "
                    f"CPU per cycle: server {m['server_cpu_us']:4.0f} us, "
                    f"clients {m['client_cpu_us']:4.0f} us",
                    file=sys.stderr,
                )
                if name not in best or m["cycles_per_s"] > best[name]["cycles_per_s"]:
                    best[name] = m
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(20)
    t, n = best["tangram"], best["noop"]
    ratio = t["cycles_per_s"] / n["cycles_per_s"]
    print()
    print("| server | cycles/s | grant p50 | grant p99 | server CPU per cycle |")
    print("|---|---|---|---|---|")
    for label, m in (("do-nothing FastAPI", n), ("tangram serve", t)):
        cps, p50, p99, us = m["cycles_per_s"], m["p50_ms"], m["p99_ms"], m["server_cpu_us"]
        print(f"| {label} | {cps:,.0f} | {p50:.2f} ms | {p99:.2f} ms | {us:.0f} us |")
    print(f"ratio tangram / do-nothing: {ratio:.2f} (target >= {TARGET_RATIO})")
    print(f"lease cycles/s: {t['cycles_per_s']:,.0f} (target >= {TARGET_CYCLES:,.0f})")
    out = {
        "bench": "http",
        "clients": a.clients,
        "client": a.client,
        "procs": a.procs,
        "seconds": a.seconds,
        "rounds": a.rounds,
        "cpus": os.cpu_count(),
        "lease_cycles_per_s": round(t["cycles_per_s"], 1),
        "lease_grant_p50_ms": round(t["p50_ms"], 3),
        "lease_grant_p99_ms": round(t["p99_ms"], 3),
        "noop_cycles_per_s": round(n["cycles_per_s"], 1),
        "noop_p50_ms": round(n["p50_ms"], 3),
        "noop_p99_ms": round(n["p99_ms"], 3),
        "ratio": round(ratio, 3),
        "lease_server_cpu_us_per_cycle": round(t["server_cpu_us"], 1),
        "noop_server_cpu_us_per_cycle": round(n["server_cpu_us"], 1),
        "lease_client_cpu_us_per_cycle": round(t["client_cpu_us"], 1),
        "noop_client_cpu_us_per_cycle": round(n["client_cpu_us"], 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "target_cycles_per_s": TARGET_CYCLES,
        "target_ratio": TARGET_RATIO,
        "met_cycles": t["cycles_per_s"] >= TARGET_CYCLES,
        "met_ratio": ratio >= TARGET_RATIO,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
