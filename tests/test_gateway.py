"""The OpenAI-compatible gateway of ``tangram serve``: a real uvicorn server of the broker
on loopback, and the engine emulator (tangram.testing.engine) as a real subprocess
behind it, driven with the ``openai`` package and with httpx."""

from __future__ import annotations

import asyncio
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from tangram.config import ConfigError, parse_config
from tangram.server.app import create_app
from tangram.server.gateway import UsageScanner, retry_after_of, usage_tokens
from tangram.server.run import LiveServer
from tangram.testing.engine import count_tokens, words

MODEL = "judge-7b"
TOKEN = "rl-token-0123456789abcdef"
OTHER = "ev-token-0123456789abcdef"


@contextmanager
def engine(*args: str) -> Iterator[str]:
    """The emulator as a subprocess; yields its URL (without /v1)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tangram.testing.engine", "--port", "0", "--model", MODEL, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    out = proc.stdout
    threading.Thread(target=lambda: lines.put(out.readline()), daemon=True).start()
    try:
        try:
            line = lines.get(timeout=30)
        except queue.Empty:
            raise AssertionError("the engine emulator did not start") from None
        assert line.startswith("engine: http://"), (line, proc.poll())
        url = line.split()[1]
        for _ in range(200):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def gateway(
    upstream: str,
    *,
    pool: dict[str, Any] | None = None,
    tenants: bool = False,
    **gw: Any,
) -> Iterator[tuple[str, Any]]:
    """A live broker with one gateway model on ``upstream``; yields (url, app)."""
    data: dict[str, Any] = {
        "pools": {"api": pool or {"kind": "quota", "concurrency": 4}},
        "gateway": {"models": {MODEL: {"pool": "api", "upstream": upstream + "/v1"}}, **gw},
    }
    if tenants:
        data["server"] = {"tenants": {"rl": {"token": TOKEN}, "ev": {"token": OTHER}}}
    app = create_app(parse_config(data))
    with LiveServer(app) as url:
        yield url, app


def chat(prompt: str = "score this answer please", **kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], **kw}


def pools(url: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    r = httpx.get(url + "/v1/pools", headers=headers)
    r.raise_for_status()
    return dict(r.json()["pools"]["api"])


def wait_until(cond: Callable[[], bool], limit: float = 5.0) -> None:
    end = time.monotonic() + limit
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name) and 'pool="api"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} for pool api")


@pytest.fixture(scope="module")
def fast_engine() -> Iterator[str]:
    with engine() as url:
        yield url


# ---- pass-through ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", chat(max_tokens=7)),
        ("/v1/completions", {"model": MODEL, "prompt": "one two three", "max_tokens": 5}),
    ],
)
def test_non_streaming_answers_pass_through_byte_for_byte(
    fast_engine: str, path: str, body: dict[str, Any]
) -> None:
    direct = httpx.post(fast_engine + path, json=body)
    with gateway(fast_engine) as (url, _):
        via = httpx.post(url + path, json=body)
        assert via.status_code == direct.status_code == 200
        assert via.content == direct.content
        assert via.headers["content-type"] == direct.headers["content-type"]
        assert via.headers["x-tangram-lease"]
        assert pools(url)["in_use"] == 0


@pytest.mark.parametrize("include_usage", [True, False])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_streams_pass_through_byte_for_byte(fast_engine: str, path: str, include_usage: bool):
    body: dict[str, Any] = (
        chat(max_tokens=40) if "chat" in path else {"model": MODEL, "prompt": "a b c"}
    )
    body |= {"stream": True, "max_tokens": 40}
    if include_usage:
        body["stream_options"] = {"include_usage": True}

    def read(base: str) -> tuple[int, str, bytes]:
        with httpx.stream("POST", base + path, json=body) as r:
            return r.status_code, r.headers["content-type"], b"".join(r.iter_raw())

    direct = read(fast_engine)
    with gateway(fast_engine) as (url, _):
        via = read(url)
        assert pools(url)["in_use"] == 0
    assert via == direct
    assert direct[2].endswith(b"data: [DONE]\n\n")
    assert (b'"usage":{' in direct[2]) is include_usage


def test_the_openai_client_through_the_gateway(fast_engine: str) -> None:
    openai = pytest.importorskip("openai")
    with gateway(fast_engine) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list()] == [MODEL]
        prompt = "rate the proof on a scale of ten"
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=6
        )
        assert reply.choices[0].message.content == " ".join(words(prompt, 6))
        assert reply.usage is not None
        assert reply.usage.prompt_tokens == count_tokens(prompt)
        assert reply.usage.completion_tokens == 6
        stream = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=9,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage = "", None
        for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage is not None:
                usage = chunk.usage
        assert text == " ".join(words(prompt, 9))
        assert usage is not None and usage.total_tokens == count_tokens(prompt) + 9
        done = client.completions.create(model=MODEL, prompt="x y", max_tokens=3)
        assert done.choices[0].text == " ".join(words("x y", 3))
        with pytest.raises(openai.NotFoundError) as err:
            client.chat.completions.create(
                model="no-such-model", messages=[{"role": "user", "content": "hi"}]
            )
        assert err.value.status_code == 404
        assert pools(url)["in_use"] == 0


# ---- routing and errors ------------------------------------------------------------


def test_unknown_model_is_404_in_openai_error_shape(fast_engine: str) -> None:
    with gateway(fast_engine) as (url, _):
        r = httpx.post(url + "/v1/chat/completions", json={**chat(), "model": "gpt-9"})
        assert r.status_code == 404
        err = r.json()["error"]
        assert err["code"] == "model_not_found" and err["param"] == "model"
        assert err["type"] == "invalid_request_error" and "gpt-9" in err["message"]
        bad = httpx.post(url + "/v1/completions", content=b"{not json")
        assert bad.status_code == 400 and "error" in bad.json()
        long = httpx.post(
            url + "/v1/completions", json=chat(), headers={"X-Tangram-Trajectory": "t" * 300}
        )
        assert long.status_code == 400 and "X-Tangram-Trajectory" in long.json()["error"]["message"]
        assert pools(url)["in_use"] == 0


def test_models_lists_the_configured_models_and_none_by_default() -> None:
    app = create_app(parse_config({"pools": {"api": {"kind": "quota", "concurrency": 1}}}))
    with LiveServer(app) as url:
        assert httpx.get(url + "/v1/models").json() == {"object": "list", "data": []}
        r = httpx.post(url + "/v1/chat/completions", json=chat())
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    with gateway("http://127.0.0.1:9") as (url, _):
        data = httpx.get(url + "/v1/models").json()["data"]
        assert [(m["id"], m["object"], m["pool"]) for m in data] == [(MODEL, "model", "api")]


def test_config_errors_are_clear() -> None:
    base = {"pools": {"api": {"kind": "quota", "concurrency": 1}}}

    def check(model: dict[str, Any]) -> str:
        with pytest.raises(ConfigError) as err:
            parse_config({**base, "gateway": {"models": {"m": model}}})
        return str(err.value)

    assert "gateway.models.m.pool: unknown pool 'gpu'; the pools are api" in check(
        {"pool": "gpu", "upstream": "http://127.0.0.1:8001/v1"}
    )
    for url in ("127.0.0.1:8001/v1", "ftp://host/v1", "http:///v1", "http://h:99999/v1"):
        assert "gateway.models.m.upstream" in check({"pool": "api", "upstream": url}), url
    assert "gateway.models.m.demand" in check(
        {"pool": "api", "upstream": "http://h/v1", "demand": 0}
    )
    assert "has no service" in check({"pool": "api", "upstream": "http://h/v1", "service": "x"})
    cfg = parse_config(
        {**base, "gateway": {"models": {"m": {"pool": "api", "upstream": "http://h:1/v1/"}}}}
    )
    assert cfg.gateway.models["m"].upstream == "http://h:1/v1"


def test_an_upstream_that_is_down_is_502_and_the_lease_is_released() -> None:
    with gateway("http://127.0.0.1:9") as (url, _):
        r = httpx.post(url + "/v1/chat/completions", json=chat())
        assert r.status_code == 502 and r.json()["error"]["type"] == "upstream_error"
        assert pools(url)["in_use"] == 0


def test_an_upstream_timeout_is_504_and_the_lease_is_released() -> None:
    with engine("--latency", "2") as up:
        data: dict[str, Any] = {
            "pools": {"api": {"kind": "quota", "concurrency": 1}},
            "gateway": {
                "models": {MODEL: {"pool": "api", "upstream": up + "/v1", "timeout_seconds": 0.3}}
            },
        }
        with LiveServer(create_app(parse_config(data))) as url:
            r = httpx.post(url + "/v1/chat/completions", json=chat())
            assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"
            assert pools(url)["in_use"] == 0


# ---- leasing -----------------------------------------------------------------------


def test_the_pools_concurrency_bounds_what_the_upstream_sees() -> None:
    with engine("--latency", "0.15") as up, gateway(up) as (url, _):

        async def burst() -> list[int]:
            async with httpx.AsyncClient(base_url=url, timeout=30) as c:
                rs = await asyncio.gather(
                    *(c.post("/v1/chat/completions", json=chat(f"p {i}")) for i in range(12))
                )
                return [r.status_code for r in rs]

        t0 = time.monotonic()
        assert asyncio.run(burst()) == [200] * 12
        took = time.monotonic() - t0
        stats = httpx.get(up + "/stats").json()
        assert stats["max_in_flight"] == 4 and stats["requests"] == 12
        assert took >= 3 * 0.15  # 12 calls, 4 at a time
        assert pools(url)["in_use"] == 0


def test_usage_is_reported_on_release_for_answers_and_streams(fast_engine: str) -> None:
    pool = {"kind": "quota", "concurrency": 4, "tokens_per_minute": 100_000}
    with gateway(fast_engine, pool=pool) as (url, _):
        used = "tangram_quota_tokens_used_total"
        prompt = "one two three four"
        httpx.post(url + "/v1/chat/completions", json=chat(prompt, max_tokens=10))
        assert metric(url, used) == 4 + 10
        body = chat(prompt, max_tokens=20, stream=True, stream_options={"include_usage": True})
        with httpx.stream("POST", url + "/v1/chat/completions", json=body) as r:
            r.read()
        assert metric(url, used) == 14 + 24
        # The estimate charged at grant: max_tokens plus a quarter of the body's bytes.
        est = metric(url, "tangram_quota_tokens_estimated_total")
        assert 10 + 20 < est < 10 + 20 + 200


def test_an_upstream_429_is_answered_429_and_holds_the_units() -> None:
    args = ("--latency", "0.5", "--max-concurrency", "1", "--retry-after", "2")
    with engine(*args) as up, gateway(up, max_hold_seconds=2.0) as (url, _):

        async def two() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=30) as c:
                first = asyncio.create_task(c.post("/v1/chat/completions", json=chat("a")))
                await asyncio.sleep(0.2)  # the first is in the engine by now
                second = await c.post("/v1/chat/completions", json=chat("b"))
                in_use = (await c.get("/v1/pools")).json()["pools"]["api"]["in_use"]
                assert in_use == 2  # the first's, and the second's held back
                return [await first, second]

        ok, limited = asyncio.run(two())
        assert ok.status_code == 200
        assert limited.status_code == 429 and limited.headers["retry-after"] == "2"
        assert limited.json()["error"]["type"] == "RateLimitError"  # the engine's body
        assert pools(url)["in_use"] == 1  # held for Retry-After
        wait_until(lambda: pools(url)["in_use"] == 0, 3)


def test_an_upstream_429_without_hold_releases_at_once() -> None:
    args = ("--latency", "0.5", "--max-concurrency", "1", "--retry-after", "7")
    with engine(*args) as up, gateway(up, max_hold_seconds=0) as (url, _):

        async def two() -> httpx.Response:
            async with httpx.AsyncClient(base_url=url, timeout=30) as c:
                first = asyncio.create_task(c.post("/v1/chat/completions", json=chat("a")))
                await asyncio.sleep(0.2)
                second = await c.post("/v1/chat/completions", json=chat("b"))
                assert (await c.get("/v1/pools")).json()["pools"]["api"]["in_use"] == 1
                await first
                return second

        limited = asyncio.run(two())
        assert limited.status_code == 429 and limited.headers["retry-after"] == "7"


def test_a_client_that_leaves_mid_stream_frees_the_pool() -> None:
    with engine("--token-delay", "0.05") as up, gateway(up) as (url, _):
        body = chat(max_tokens=400, stream=True)
        with httpx.stream("POST", url + "/v1/chat/completions", json=body) as r:
            it = r.iter_raw()
            assert next(it).startswith(b"data: ")
            assert pools(url)["in_use"] == 1
        # Closed after the first chunk, 20 s before the stream's end.
        wait_until(lambda: pools(url)["in_use"] == 0, 3)
        wait_until(lambda: httpx.get(up + "/stats").json()["in_flight"] == 0, 3)
        assert httpx.get(up + "/stats").json()["disconnects"] == 1


def test_a_client_that_leaves_while_queued_leaves_the_queue() -> None:
    pool = {"kind": "quota", "concurrency": 1}
    with engine("--token-delay", "0.05") as up, gateway(up, pool=pool) as (url, _):
        body = chat(max_tokens=400, stream=True)
        with httpx.stream("POST", url + "/v1/chat/completions", json=body) as r:
            it = r.iter_raw()  # kept: a dropped iterator closes the stream
            next(it)
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(url + "/v1/chat/completions", json=chat(), timeout=0.5)
            wait_until(lambda: pools(url)["queued"] == 0)  # the second call left the queue
        wait_until(lambda: pools(url)["in_use"] == 0, 3)
        assert httpx.get(up + "/stats").json()["requests"] == 0


def test_a_call_that_waits_past_the_queue_timeout_is_429() -> None:
    pool = {"kind": "quota", "concurrency": 1}
    with (
        engine("--token-delay", "0.05") as up,
        gateway(up, pool=pool, queue_timeout_seconds=0.3) as (url, _),
    ):
        body = chat(max_tokens=400, stream=True)
        with httpx.stream("POST", url + "/v1/chat/completions", json=body) as r:
            it = r.iter_raw()
            next(it)
            late = httpx.post(url + "/v1/chat/completions", json=chat())
            assert late.status_code == 429 and late.headers["retry-after"] == "1"
            assert "queue of pool 'api'" in late.json()["error"]["message"]


# ---- tenants -----------------------------------------------------------------------


def test_tenants_and_auth_as_for_the_lease_api(fast_engine: str) -> None:
    openai = pytest.importorskip("openai")
    with gateway(fast_engine, tenants=True) as (url, app):
        granted: list[Any] = []
        app.state.service.broker.subscribe(
            lambda kind, obj: granted.append(obj) if kind == "grant" else None
        )
        r = httpx.post(url + "/v1/chat/completions", json=chat())
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert httpx.get(url + "/v1/models").status_code == 401
        wrong = openai.OpenAI(base_url=url + "/v1", api_key="x" * 20, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        client = openai.OpenAI(base_url=url + "/v1", api_key=TOKEN, max_retries=0)
        reply = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=2,
            extra_headers={"X-Tangram-Trajectory": "traj-7"},
        )
        assert reply.usage is not None and reply.usage.completion_tokens == 2
        (lease,) = granted
        assert lease.action.tenant == "rl" and lease.action.trajectory == "rl/traj-7"
        assert lease.action.task == MODEL


# ---- the pieces --------------------------------------------------------------------


def test_the_usage_scanner_finds_usage_across_chunk_boundaries() -> None:
    stream = (
        b'data: {"choices":[{"delta":{"content":"x"}}],"usage":null}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,'
        b'"total_tokens":7}}\n\ndata: [DONE]\n\n'
    )
    for size in (1, 5, 64, len(stream)):
        s = UsageScanner()
        for i in range(0, len(stream), size):
            s.feed(stream[i : i + size])
        assert usage_tokens(s.usage) == {
            "prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7, "tokens": 7
        }  # fmt: skip
    assert usage_tokens(None) is None
    assert usage_tokens({"prompt_tokens": 2, "completion_tokens": 3})["tokens"] == 5  # type: ignore[index]
    assert retry_after_of("3", 1.0) == 3.0 and retry_after_of(None, 1.0) == 1.0
    assert retry_after_of("soon", 2.0) == 2.0
    assert retry_after_of("Wed, 21 Oct 2015 07:28:00 GMT", 1.0) == 0.0


def test_the_emulator_sleeps_and_wakes(fast_engine: str) -> None:
    c = httpx.Client(base_url=fast_engine)
    assert c.get("/is_sleeping").json() == {"is_sleeping": False}
    assert c.post("/sleep", params={"level": 2}).status_code == 200
    assert c.get("/is_sleeping").json() == {"is_sleeping": True}
    r = c.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert r.status_code == 503
    assert c.post("/wake_up").status_code == 200
    assert c.post("/v1/completions", json={"model": MODEL, "prompt": "x"}).status_code == 200
    assert c.post("/release_memory_occupation", json={}).status_code == 200
    assert c.post("/v1/chat/completions", json=chat()).status_code == 503
    assert c.post("/resume_memory_occupation", json={}).status_code == 200
    assert c.get("/is_sleeping").json() == {"is_sleeping": False}
    assert c.get("/v1/models").json()["data"][0]["id"] == MODEL


def test_a_gpu_service_pool_bounds_calls_by_its_gpus() -> None:
    pool = {
        "kind": "gpu",
        "nodes": [{"name": "g0", "gpus": 2, "memory_gb": 80}],
        "services": {MODEL: {"memory_gb": 16, "restore_seconds": 0.01}},
    }
    data: dict[str, Any] = {"pools": {"gpu": pool}}
    with engine("--latency", "0.1") as up:
        data["gateway"] = {
            "models": {MODEL: {"pool": "gpu", "upstream": up + "/v1", "service": MODEL}}
        }
        with LiveServer(create_app(parse_config(data))) as url:

            async def burst() -> list[int]:
                async with httpx.AsyncClient(base_url=url, timeout=30) as c:
                    rs = await asyncio.gather(
                        *(c.post("/v1/completions", json={"model": MODEL, "prompt": f"{i}"})
                          for i in range(6))
                    )  # fmt: skip
                    return [r.status_code for r in rs]

            assert asyncio.run(burst()) == [200] * 6
            assert httpx.get(up + "/stats").json()["max_in_flight"] == 2
            assert httpx.get(url + "/v1/pools").json()["pools"]["gpu"]["in_use"] == 0


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"pool": "judge", "upstream": "http://127.0.0.1:8001/v1"}, "unknown pool 'judge'"),
        ({"pool": "api", "upstream": "127.0.0.1:8001/v1"}, "is not an http(s) URL"),
    ],
)
def test_serve_refuses_a_bad_gateway_section_at_start(
    tmp_path: Any, model: dict[str, Any], message: str
) -> None:
    import yaml

    cfg = tmp_path / "pools.yaml"
    data = {
        "pools": {"api": {"kind": "quota", "concurrency": 1}},
        "gateway": {"models": {"m": model}},
    }
    cfg.write_text(yaml.safe_dump(data))
    run = subprocess.run(
        [sys.executable, "-m", "tangram.cli", "serve", "--config", str(cfg), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert "gateway.models.m." in run.stderr and message in run.stderr


def test_a_client_that_leaves_a_plain_call_frees_the_pool() -> None:
    with engine("--latency", "3") as up, gateway(up) as (url, _):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/chat/completions", json=chat(), timeout=0.5)
        wait_until(lambda: pools(url)["in_use"] == 0, 3)
        # The upstream connection was closed too: the engine saw the call end early.
        wait_until(lambda: httpx.get(up + "/stats").json()["disconnects"] == 1, 1.5)
        stats = httpx.get(up + "/stats").json()
        assert stats["in_flight"] == 0 and stats["requests"] == 0


def test_completed_calls_release_ok_and_reuse_upstream_connections(fast_engine: str) -> None:
    with gateway(fast_engine) as (url, app):
        released: list[Any] = []
        app.state.service.broker.subscribe(
            lambda kind, obj: released.append(obj) if kind == "release" else None
        )
        body = {"model": MODEL, "prompt": "a", "stream": True}
        with httpx.Client(base_url=url) as c:
            for i in range(20):
                if i % 2:
                    with c.stream("POST", "/v1/completions", json=body) as r:
                        r.read()
                else:
                    assert c.post("/v1/chat/completions", json=chat()).status_code == 200
        wait_until(lambda: len(released) == 20)
        assert {lease.outcome for lease in released} == {"ok"}
        gw = app.state.gateway
        # One connection to the engine, kept alive across the 20 sequential calls.
        assert gw.connections() == 1
