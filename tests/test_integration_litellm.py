"""``tangram.integrations.litellm`` with the real LiteLLM: ``litellm.acompletion`` against
a fake OpenAI-compatible upstream on loopback, the hook leasing from a live Tangram
server. The upstream enforces what a provider would (at most ``LIMIT`` calls in any
1-second window) and counts the calls over it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

# No fetch of LiteLLM's model price list at import (the tests run offline).
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
litellm = pytest.importorskip(
    "litellm", reason="litellm is not installed (pip install 'tangram-broker[litellm]')"
)

from tangram.config import parse_config  # noqa: E402
from tangram.integrations.litellm import TangramQuota, estimate_tokens  # noqa: E402
from tangram.server import LiveServer, create_app  # noqa: E402

LIMIT = 4  # calls the upstream accepts in any 1-second window
TOKENS = 30  # total_tokens in each answer
POOLS: dict[str, Any] = {
    # The pool's window is longer than the provider's: the margin covers the time
    # between a grant and the call's arrival upstream. With four LiteLLM processes on
    # two cores that time reached a quarter second and more (a 1.25 s window let 6
    # calls into one provider second in about one run in four), so a full second.
    "llm": {
        "kind": "quota",
        "window": {"limit": LIMIT, "seconds": 2.0},
        "tokens_per_minute": 1_000_000,
    },
    "tiny": {"kind": "quota", "concurrency": 1, "tokens_per_minute": 50},
}


class Upstream:
    """``POST /chat/completions``: an answer with a usage block, after ``delay`` s.
    ``arrivals`` holds each call's arrival time."""

    def __init__(self, delay: float = 0.05, fail: bool = False) -> None:
        self.arrivals: list[float] = []
        self.lock = threading.Lock()
        up = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                model = json.loads(body).get("model", "m")
                if model != "warmup":
                    with up.lock:
                        up.arrivals.append(time.monotonic())
                time.sleep(delay)
                if fail:
                    self._send(500, {"error": {"message": "upstream broke", "type": "server"}})
                    return
                self._send(
                    200,
                    {
                        "id": "chatcmpl-1",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": model,
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": "ok"},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {
                            "prompt_tokens": 10,
                            "completion_tokens": TOKENS - 10,
                            "total_tokens": TOKENS,
                        },
                    },
                )

            def _send(self, status: int, data: Any) -> None:
                raw = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def most_in_a_window(self, seconds: float = 1.0) -> int:
        """The most calls that arrived within any ``seconds``-long window."""
        times = sorted(self.arrivals)
        return max(
            (sum(1 for u in times[i:] if u < t + seconds) for i, t in enumerate(times)),
            default=0,
        )


@pytest.fixture(scope="module")
def broker() -> Iterator[str]:
    with LiveServer(create_app(parse_config({"pools": POOLS}))) as url:
        yield url


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    up = Upstream()
    yield up
    up.close()


@contextlib.asynccontextmanager
async def registered(h: TangramQuota) -> AsyncIterator[TangramQuota]:
    """``h`` as LiteLLM's only callback, then out of every list LiteLLM copies it into
    (its success and failure lists keep the instance of the first call otherwise)."""
    litellm.callbacks = [h]
    try:
        yield h
    finally:
        litellm.logging_callback_manager.remove_callback_from_all_lists(h)
        await h.aclose()


@pytest.fixture
async def hook(broker: str) -> AsyncIterator[TangramQuota]:
    async with registered(TangramQuota(broker, pool="llm", timeout=30.0)) as h:
        yield h


async def call(upstream: Upstream, model: str = "openai/fake-model", **kw: Any) -> Any:
    return await litellm.acompletion(
        model=model,
        messages=[{"role": "user", "content": "hello"}],
        api_base=upstream.url,
        api_key="sk-dummy",
        num_retries=0,
        **kw,
    )


async def pool(broker: str, name: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=broker) as c:
        return dict((await c.get("/v1/pools")).json()["pools"][name])


async def tokens_used(broker: str, name: str) -> float:
    async with httpx.AsyncClient(base_url=broker) as c:
        text = (await c.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith("tangram_quota_tokens_used_total") and f'pool="{name}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def settled(hook: TangramQuota, broker: str, name: str) -> None:
    """Until every lease is released (LiteLLM runs success callbacks after returning)."""
    for _ in range(200):
        if hook.held == 0 and (await pool(broker, name))["in_use"] == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"leases still held: {hook.held}")


async def test_the_upstream_never_sees_more_than_the_window_and_tokens_reach_the_pool(
    broker: str, upstream: Upstream, hook: TangramQuota
) -> None:
    # LiteLLM's first call in a process sets up its clients: slow enough to bunch the
    # calls granted after it. Made first, and not counted upstream.
    await call(upstream, model="openai/warmup")
    await settled(hook, broker, "llm")
    before = await tokens_used(broker, "llm")
    n = 3 * LIMIT
    answers = await asyncio.gather(*(call(upstream) for _ in range(n)))
    assert all(a.usage.total_tokens == TOKENS for a in answers)
    await settled(hook, broker, "llm")
    assert len(upstream.arrivals) == n
    assert upstream.most_in_a_window(1.0) <= LIMIT, upstream.arrivals
    # The real usage was reported at release: n calls of TOKENS each.
    assert await tokens_used(broker, "llm") - before == n * TOKENS


async def test_the_trajectory_comes_from_the_metadata(
    broker: str, upstream: Upstream, hook: TangramQuota
) -> None:
    seen: list[str] = []
    build = hook.estimate

    def spy(kwargs: Any) -> int:
        seen.append(kwargs["metadata"]["tangram_trajectory"])
        return build(kwargs)

    hook.estimate = spy
    await call(upstream, metadata={"tangram_trajectory": "traj-7"})
    await settled(hook, broker, "llm")
    assert seen == ["traj-7"]


async def test_a_failed_call_releases_its_lease(broker: str, hook: TangramQuota) -> None:
    broken = Upstream(fail=True)
    try:
        with pytest.raises(litellm.InternalServerError):
            await call(broken)
    finally:
        broken.close()
    assert len(broken.arrivals) == 1
    await settled(hook, broker, "llm")


async def test_a_call_not_granted_in_time_is_a_rate_limit_error(
    broker: str, upstream: Upstream
) -> None:
    async with registered(TangramQuota(broker, pool="tiny", timeout=0.3)) as h:
        lease = await h._client().acquire({"trajectory": "holder", "demands": {"tiny": 1}})
        with pytest.raises(litellm.RateLimitError, match="Tangram quota pool 'tiny'"):
            await call(upstream)
        await h._client().release(lease.id)
        assert upstream.arrivals == []


async def test_a_call_too_big_for_the_pool_is_refused(broker: str, upstream: Upstream) -> None:
    async with registered(TangramQuota(broker, pool="tiny", timeout=5.0)):
        with pytest.raises(litellm.BadRequestError, match="tokens per minute"):
            await call(upstream, max_tokens=1000)
        assert upstream.arrivals == []


def test_the_estimate_counts_the_messages_and_the_completion_budget() -> None:
    msgs = [{"role": "user", "content": "hello there"}]
    base = estimate_tokens({"model": "gpt-4o", "messages": msgs})
    assert base > 0
    assert estimate_tokens({"model": "gpt-4o", "messages": msgs, "max_tokens": 100}) == base + 100


# ---- several proxy processes sharing one pool ------------------------------------------

WORKER = """
import asyncio, os, sys, time
import litellm
from tangram.integrations.litellm import TangramQuota

broker, upstream, calls, hooked, limit = sys.argv[1:6]
calls, limit = int(calls), int(limit)

async def main():
    # A first call, not counted upstream: LiteLLM's first call in a process is slow (it
    # sets up its clients), which would bunch the calls after it.
    await litellm.acompletion(
        model="openai/warmup", messages=[{"role": "user", "content": "hi"}],
        api_base=upstream, api_key="sk-dummy", num_retries=0,
    )
    if hooked == "1":
        litellm.callbacks = [TangramQuota(broker, pool="llm", timeout=60.0)]
    # Without the hook, the replica's own limiter: `limit` calls per window, as a
    # per-instance rpm limit would allow (it knows nothing of the other replicas).
    sent = []

    async def one():
        if hooked != "1":
            while True:
                now = time.monotonic()
                recent = [t for t in sent if now - t < 1.15]
                if len(recent) < limit:
                    sent.append(now)
                    break
                await asyncio.sleep(min(recent) + 1.15 - now)
        await litellm.acompletion(
            model="openai/fake-model", messages=[{"role": "user", "content": "hi"}],
            api_base=upstream, api_key="sk-dummy", num_retries=0,
        )

    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await asyncio.gather(*(one() for _ in range(calls)))
    await asyncio.sleep(0.5)  # the success callbacks release the leases

asyncio.run(main())
"""


def windows_over(arrivals: list[float], limit: int) -> tuple[int, int]:
    """(1-second windows from the first arrival holding more than ``limit`` calls, the
    most calls in one of them)."""
    if not arrivals:
        return 0, 0
    first = min(arrivals)
    counts: dict[int, int] = {}
    for t in arrivals:
        counts[int(t - first)] = counts.get(int(t - first), 0) + 1
    return sum(1 for c in counts.values() if c > limit), max(counts.values())


def test_four_proxy_processes_share_one_pool(broker: str) -> None:
    """4 processes running LiteLLM, each with a per-process limit of LIMIT calls a
    window: without the hook the upstream gets up to 4 x LIMIT in a second; with it, the
    shared pool keeps every second at LIMIT or under."""
    procs, calls = 4, 2 * LIMIT
    figures: dict[bool, tuple[int, int, int]] = {}
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    for hooked in (True, False):
        up = Upstream()
        try:
            args = [broker, up.url, str(calls), "1" if hooked else "0", str(LIMIT)]
            running = [
                subprocess.Popen(
                    [sys.executable, "-c", WORKER, *args],
                    env=env,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
                for _ in range(procs)
            ]
            # Every process has imported LiteLLM and made its warm-up call: all start.
            for p in running:
                assert p.stdout is not None
                line = p.stdout.readline()
                assert line == "ready\n", line + p.stdout.read()
            for p in running:
                assert p.stdin is not None
                p.stdin.write("go\n")
                p.stdin.close()
            for p in running:
                out = p.stdout.read() if p.stdout else ""
                p.wait(timeout=120)
                assert p.returncode == 0, out
            over, most = windows_over(up.arrivals, LIMIT)
            figures[hooked] = (len(up.arrivals), over, most)
        finally:
            up.close()
    print(
        f"\n{procs} processes x {calls} calls, provider limit {LIMIT}/s: "
        f"with the hook {figures[True][0]} calls, {figures[True][1]} windows over the "
        f"limit, at most {figures[True][2]} in one; without it {figures[False][0]} calls, "
        f"{figures[False][1]} windows over, at most {figures[False][2]} in one"
    )
    assert figures[True][0] == figures[False][0] == procs * calls
    assert figures[True][1] == 0 and figures[True][2] <= LIMIT
    assert figures[False][2] > LIMIT
