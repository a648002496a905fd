"""LiteLLM: calls under a Tangram quota pool with the ``TangramQuota`` callback.

The broker runs as the Ray actor and serves its HTTP lease API from the same actor
(``serve_http``), which is what ``TangramQuota`` leases from. A fake OpenAI-compatible
upstream on 127.0.0.1 (started here) answers ``/chat/completions`` with a usage block
and counts the calls in flight. Eight concurrent ``litellm.acompletion`` calls go
through a pool of ``concurrency: 2``: the upstream never sees more than 2 at once, and
the pool is charged the tokens each call really used (estimated at the lease, reported
at the release).

    pip install 'tangram-broker[litellm,ray]'
    python examples/litellm_quota.py
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# No download of LiteLLM's model price list at import: everything here is on loopback.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import ray

import tangram.ray as tr

try:
    import litellm

    from tangram.integrations.litellm import TangramQuota
except ImportError as exc:
    sys.exit(f"litellm is not installed ({exc}): pip install 'tangram-broker[litellm,ray]'")

CALLS = 8
CONCURRENCY = 2
TOKENS = 30  # total_tokens in each of the upstream's answers
CONFIG: dict[str, Any] = {
    "pools": {
        "llm": {"kind": "quota", "concurrency": CONCURRENCY, "tokens_per_minute": 100_000},
    },
}


class Upstream:
    """An OpenAI-compatible ``POST /chat/completions`` on 127.0.0.1."""

    def __init__(self, delay: float = 0.1) -> None:
        self.lock = threading.Lock()
        self.in_flight = self.peak = self.calls = 0
        up = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
                with up.lock:
                    up.calls += 1
                    up.in_flight += 1
                    up.peak = max(up.peak, up.in_flight)
                time.sleep(delay)
                with up.lock:
                    up.in_flight -= 1
                answer = {
                    "id": f"chatcmpl-{up.calls}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body.get("model", "fake"),
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "42"},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {
                        "prompt_tokens": 12,
                        "completion_tokens": TOKENS - 12,
                        "total_tokens": TOKENS,
                    },
                }
                raw = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


async def calls(broker_url: str, upstream: Upstream) -> list[Any]:
    quota = TangramQuota(broker_url, pool="llm", timeout=30)
    litellm.callbacks = [quota]
    try:
        answers = await asyncio.gather(
            *(
                litellm.acompletion(
                    model="openai/fake-model",
                    messages=[{"role": "user", "content": f"question {i}"}],
                    max_tokens=64,
                    api_base=upstream.url,
                    api_key="sk-fake",
                    num_retries=0,
                    metadata={"tangram_trajectory": f"agent-{i % 4}"},
                )
                for i in range(CALLS)
            )
        )
        # LiteLLM runs its success callbacks (the releases) just after a call returns.
        for _ in range(100):
            if quota.held == 0:
                break
            await asyncio.sleep(0.05)
        return answers
    finally:
        litellm.logging_callback_manager.remove_callback_from_all_lists(quota)
        await quota.aclose()


def main() -> int:
    t0 = time.monotonic()
    upstream = Upstream()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        broker = tr.start_broker(CONFIG, detached=False, data_dir=None)
        port = ray.get(broker.serve_http.remote(host="127.0.0.1", port=0))
        answers = asyncio.run(calls(f"http://127.0.0.1:{port}", upstream))
        counters = ray.get(broker.counters.remote("llm"))
        snap = ray.get(broker.snapshot.remote())
        ray.get(broker.stop_http.remote())
    finally:
        tr.stop_broker()
        ray.shutdown()
        upstream.close()

    used = counters["tokens_used_total"]
    print(f"calls: {len(answers)} answered, upstream saw {upstream.calls}")
    print(f"most calls in flight upstream: {upstream.peak} (pool concurrency {CONCURRENCY})")
    print(
        f"pool llm tokens: estimated {counters['tokens_estimated_total']:.0f}, "
        f"used {used:.0f} ({CALLS} x {TOKENS}); leases left: {snap['leases']}"
    )
    print(f"litellm example: {len(answers)} calls in {time.monotonic() - t0:.1f} s")
    ok = (
        len(answers) == CALLS
        and upstream.peak <= CONCURRENCY
        and used == CALLS * TOKENS
        and snap["leases"] == 0
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
