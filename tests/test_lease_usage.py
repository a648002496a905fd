"""Usage reported from the body of a lease context (``ctx.report(tokens=n)``) goes with
the release at exit, so a tokens-per-minute pool charges what was used, not the estimate:
on the in-process broker and over HTTP (``HttpClient``, ``SyncHttpClient``). The Ray
door is tested in tests/test_ray_sync.py, which has the one local Ray cluster."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tangram.broker import Broker
from tangram.client import HttpClient, SyncHttpClient
from tangram.config import parse_config
from tangram.server import LiveServer, create_app
from tangram.spec import Action

# 6000 tokens a minute: 100 a second. An action estimated at the whole minute drains the
# bucket; reported at 10 tokens, it leaves 5990 and the next big call goes at once.
TPM = 6000
POOLS: dict[str, Any] = {
    name: {"kind": "quota", "concurrency": 4, "tokens_per_minute": TPM}
    for name in ("llm", "llm_sync", "llm_error", "llm_control")
}


def call(pool: str, tokens: int) -> Action:
    return Action.build("t", {pool: 1}, tokens=tokens)


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    b = Broker.from_config(parse_config({"pools": POOLS}))
    yield b
    await b.close()


def level(broker: Broker, pool: str = "llm") -> float:
    tpm = broker.core.pools[pool].tpm  # type: ignore[attr-defined]
    assert tpm is not None
    return float(tpm.refill(broker.clock()))


async def test_in_process_reported_tokens_replace_the_estimate(broker: Broker) -> None:
    ctx = broker.lease(call("llm", TPM))
    async with ctx:
        assert level(broker) < 100
        ctx.report(tokens=10)
    assert level(broker) == pytest.approx(TPM - 10, abs=50)
    assert broker.core.pools["llm"].tokens_used_total == 10  # type: ignore[attr-defined]
    # The bucket has room: the next big call is granted at once.
    async with broker.lease(call("llm", 5000), timeout=2.0):
        pass


async def test_in_process_without_a_report_the_estimate_stays_charged(broker: Broker) -> None:
    async with broker.lease(call("llm", TPM)):
        pass
    assert level(broker) < 100
    with pytest.raises(TimeoutError):
        async with broker.lease(call("llm", 5000), timeout=0.5):
            pass


async def test_in_process_usage_reported_before_an_error_is_charged(broker: Broker) -> None:
    ctx = broker.lease(call("llm", TPM))
    with pytest.raises(RuntimeError, match="boom"):
        async with ctx:
            ctx.report(tokens=20, prompt_tokens=5)
            raise RuntimeError("boom")
    assert ctx.usage == {"tokens": 20, "prompt_tokens": 5}
    assert level(broker) == pytest.approx(TPM - 20, abs=50)


def test_report_merges_and_replaces(broker: Broker) -> None:
    ctx = broker.lease(call("llm", 1))
    ctx.report(tokens=3)
    ctx.report(cached=1)
    ctx.report(tokens=4)
    assert ctx.usage == {"tokens": 4, "cached": 1}


# ---------------------------------------------------------------------- over HTTP
@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with LiveServer(create_app(parse_config({"pools": POOLS}))) as u:
        yield u


async def test_http_client_reported_tokens_replace_the_estimate(url: str) -> None:
    async with HttpClient(url) as client:
        ctx = client.lease(call("llm", TPM))
        async with ctx:
            ctx.report(tokens=10)
        # Estimated at the whole minute: without the report this waits about 50 s.
        async with client.lease(call("llm", 5000), timeout=3.0):
            pass


async def test_http_client_usage_reported_before_an_error_is_charged(url: str) -> None:
    async with HttpClient(url) as client:
        ctx = client.lease(call("llm_error", TPM))
        with pytest.raises(RuntimeError, match="boom"):
            async with ctx:
                ctx.report(tokens=10)
                raise RuntimeError("boom")
        async with client.lease(call("llm_error", 5000), timeout=3.0):
            pass


def test_sync_http_client_reported_tokens_replace_the_estimate(url: str) -> None:
    with SyncHttpClient(url) as client:
        ctx = client.lease(call("llm_sync", TPM))
        with ctx as lease:
            assert lease.allocation["llm_sync"].amount == 1
            ctx.report(tokens=10)
        with client.lease(call("llm_sync", 5000), timeout=3.0):
            pass
        assert client.pools()["pools"]["llm_sync"]["in_use"] == 0


async def test_the_http_control_without_a_report_waits(url: str) -> None:
    # The same calls without a report: the estimate stays charged and the next call
    # waits (what the tests above would see if the report were lost).
    async with HttpClient(url) as client:
        async with client.lease(call("llm_control", TPM), timeout=3.0):
            pass
        with pytest.raises(TimeoutError):
            async with client.lease(call("llm_control", 5000), timeout=0.5):
                pass
