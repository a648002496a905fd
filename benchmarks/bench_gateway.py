"""The OpenAI-compatible gateway's overhead: calls through ``tangram serve`` against the
same calls straight to the engine emulator, in one run, with the same client.

The emulator (``python -m tangram.testing.engine``, zero latency unless
``--engine-latency``) and ``tangram serve``
(a quota pool with more permits than there are clients, so nothing queues; one gateway
model on the emulator) are subprocesses. One ``httpx.AsyncClient`` sends
``POST /v1/chat/completions`` (16 tokens out, not streamed; and streamed, read to the
end) to each in turn:

- latency: one call at a time, ``--calls`` per round, rounds alternating direct and
  gateway; p50 and p99 of all rounds. The added latency is the difference of the p50s.
- throughput: ``--clients`` concurrent callers for ``--seconds`` per round, rounds
  alternating; the best round of each counts. The ratio is gateway / direct.

Targets: added p50 under 2 ms, throughput at least 0.8 of direct. On a machine with few
cores the client, the broker and the emulator share them: a gateway call costs the
broker's process CPU that a direct call does not, so the ratio is a floor. With zero
engine latency the throughput measures CPU alone: the gateway's CPU per call against the
client's and the emulator's. With ``--engine-latency`` (a real engine answers in tens of
milliseconds or more) it measures what a caller sees. The last line of output is JSON
with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

MODEL = "bench-model"
TARGET_ADDED_P50_MS = 2.0
TARGET_RATIO = 0.8
BODY = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "score the answer of this rollout step"}],
    "max_tokens": 16,
}
STREAM = {**BODY, "stream": True, "stream_options": {"include_usage": True}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    end = time.monotonic() + 60
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with status {proc.returncode}: {proc.args}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"no answer from {url}")


def start_engine(latency: float = 0.0) -> tuple[subprocess.Popen[bytes], str]:
    cmd = [sys.executable, "-m", "tangram.testing.engine", "--port", "0", "--model", MODEL]
    cmd += ["--latency", str(latency)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith("engine: "):
        raise SystemExit(f"the engine did not start: {line!r}")
    url = line.split()[1]
    wait_ready(url + "/health", proc)
    return proc, url


def start_gateway(engine: str, tmp: Path, data_dir: bool) -> tuple[subprocess.Popen[bytes], str]:
    cfg = tmp / "pools.yaml"
    cfg.write_text(
        "pools:\n  judge: {kind: quota, concurrency: 4096}\n"
        "server:\n  max_queued: 100000\n"
        f"gateway:\n  models:\n    {MODEL}: {{pool: judge, upstream: {engine}/v1}}\n"
    )
    port = free_port()
    cmd = [sys.executable, "-m", "tangram.cli", "serve", "--config", str(cfg)]
    cmd += ["--port", str(port)]
    if data_dir:
        cmd += ["--data-dir", str(tmp / "data")]
    log = (tmp / "serve.log").open("wb")  # a file: a full pipe would stall the server
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url + "/readyz", proc)
    return proc, url


async def call(client: httpx.AsyncClient, base: str, stream: bool) -> None:
    if stream:
        async with client.stream("POST", base + "/v1/chat/completions", json=STREAM) as r:
            async for _ in r.aiter_raw():
                pass
            assert r.status_code == 200, r.status_code
    else:
        r = await client.post(base + "/v1/chat/completions", json=BODY)
        assert r.status_code == 200, r.status_code


async def latencies(client: httpx.AsyncClient, base: str, n: int, stream: bool) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await call(client, base, stream)
        out.append(time.perf_counter() - t0)
    return out


async def throughput(client: httpx.AsyncClient, base: str, clients: int, seconds: float) -> float:
    done = 0
    end = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < end:
            await call(client, base, False)
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return done / (time.perf_counter() - t0)


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] * 1000


async def measure(
    a: argparse.Namespace, urls: dict[str, str], pids: dict[str, int]
) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=a.clients * 2, max_keepalive_connections=a.clients * 2)
    lat: dict[tuple[str, bool], list[float]] = {}
    rps: dict[str, float] = {}
    cpu: dict[str, list[float]] = {}  # per process: CPU seconds per call in every round
    async with httpx.AsyncClient(limits=limits, timeout=30, trust_env=False) as client:
        for base in urls.values():  # warm up: connections, caches
            for stream in (False, True):
                await latencies(client, base, 50, stream)
        for _ in range(a.rounds):
            for name, base in urls.items():
                for stream in (False, True):
                    got = await latencies(client, base, a.calls, stream)
                    lat.setdefault((name, stream), []).extend(got)
        for _ in range(a.rounds):
            for name, base in urls.items():
                before = {p: cpu_seconds(pid) for p, pid in pids.items()}
                t0 = time.perf_counter()
                r = await throughput(client, base, a.clients, a.seconds)
                calls = r * (time.perf_counter() - t0)
                rps[name] = max(rps.get(name, 0.0), r)
                for p, pid in pids.items():
                    spent = cpu_seconds(pid) - before[p]
                    cpu.setdefault(f"{p}_cpu_us_per_{name}_call", []).append(spent / calls)
    out: dict[str, Any] = {}
    for (name, stream), xs in lat.items():
        key = f"{name}_{'stream' if stream else 'plain'}"
        out[f"{key}_p50_ms"] = round(pct(xs, 0.5), 3)
        out[f"{key}_p99_ms"] = round(pct(xs, 0.99), 3)
        out[f"{key}_mean_ms"] = round(statistics.fmean(xs) * 1000, 3)
    out["added_p50_ms"] = round(out["gateway_plain_p50_ms"] - out["direct_plain_p50_ms"], 3)
    out["added_stream_p50_ms"] = round(
        out["gateway_stream_p50_ms"] - out["direct_stream_p50_ms"], 3
    )
    out["direct_rps"] = round(rps["direct"], 1)
    out["gateway_rps"] = round(rps["gateway"], 1)
    out["ratio"] = round(rps["gateway"] / rps["direct"], 3)
    for key, xs in cpu.items():
        out[key] = round(min(xs) * 1e6, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=300, help="sequential calls per round")
    ap.add_argument("--clients", type=int, default=16, help="concurrent callers (throughput)")
    ap.add_argument("--seconds", type=float, default=3.0, help="length of a throughput round")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per target")
    ap.add_argument(
        "--data-dir", action="store_true", help="serve with a data directory (the journal)"
    )
    ap.add_argument(
        "--engine-latency",
        type=float,
        default=0.0,
        help="seconds the emulator takes per answer (0: none, so the figures measure CPU "
        "alone; a real engine takes tens of ms to seconds)",
    )
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    procs = []
    try:
        eng, engine_url = start_engine(a.engine_latency)
        procs.append(eng)
        gw, gateway_url = start_gateway(engine_url, tmp, a.data_dir)
        procs.append(gw)
        print(
            f"{a.rounds} rounds: {a.calls} sequential calls each (plain, streamed), then "
            f"{a.clients} callers for {a.seconds:g} s; {os.cpu_count()} CPUs; "
            f"{'with' if a.data_dir else 'without'} a data directory; engine latency "
            f"{a.engine_latency:g} s",
            file=sys.stderr,
        )
        urls = {"direct": engine_url, "gateway": gateway_url}
        res = asyncio.run(measure(a, urls, {"engine": eng.pid, "gateway": gw.pid}))
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
    res |= {
        "calls": a.calls,
        "clients": a.clients,
        "seconds": a.seconds,
        "rounds": a.rounds,
        "cpus": os.cpu_count(),
        "data_dir": a.data_dir,
        "engine_latency_s": a.engine_latency,
        "target_added_p50_ms": TARGET_ADDED_P50_MS,
        "target_ratio": TARGET_RATIO,
        "added_p50_ok": res["added_p50_ms"] < TARGET_ADDED_P50_MS,
        "ratio_ok": res["ratio"] >= TARGET_RATIO,
    }
    rows = [
        ("p50, one call (ms)", "direct_plain_p50_ms", "gateway_plain_p50_ms"),
        ("p99, one call (ms)", "direct_plain_p99_ms", "gateway_plain_p99_ms"),
        ("p50, one stream (ms)", "direct_stream_p50_ms", "gateway_stream_p50_ms"),
        ("p99, one stream (ms)", "direct_stream_p99_ms", "gateway_stream_p99_ms"),
        (f"calls/s, {a.clients} callers", "direct_rps", "gateway_rps"),
    ]
    print(f"{'':28} {'direct':>10} {'gateway':>10}")
    for label, d, g in rows:
        print(f"{label:28} {res[d]:>10} {res[g]:>10}")
    print(
        f"{'CPU per call: engine (us)':28} {res['engine_cpu_us_per_direct_call']:>10} "
        f"{res['engine_cpu_us_per_gateway_call']:>10}"
    )
    print(
        f"{'CPU per call: gateway (us)':28} {'':>10} {res['gateway_cpu_us_per_gateway_call']:>10}"
    )
    print(
        f"added p50: {res['added_p50_ms']} ms (target < {TARGET_ADDED_P50_MS}), streamed "
        f"{res['added_stream_p50_ms']} ms; throughput ratio {res['ratio']} "
        f"(target >= {TARGET_RATIO})"
    )
    print(json.dumps(res))


if __name__ == "__main__":
    main()
