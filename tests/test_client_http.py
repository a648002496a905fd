"""``HttpClient`` and ``SyncHttpClient`` against a live server: the lease context manager
under errors, cancellation and timeouts, retries of transient errors, error mapping."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from tangram.client import HttpClient, SyncHttpClient, TooManyQueued, Unauthorized
from tangram.config import parse_config
from tangram.server import LiveServer, create_app
from tangram.spec import Action, InvalidAction, LeaseExpired

POOLS: dict[str, Any] = {"api": {"kind": "quota", "concurrency": 1}}
TOKEN = "client-test-token-0123456789"


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    cfg = parse_config(
        {
            "pools": POOLS,
            "server": {"tenants": {"t": {"token": TOKEN, "max_queued": 2}}},
        }
    )
    with LiveServer(create_app(cfg)) as u:
        yield u


@pytest.fixture
async def client(url: str) -> AsyncIterator[HttpClient]:
    async with HttpClient(url, token=TOKEN, poll=2.0) as c:
        yield c
    # Every test leaves the pool as it found it.
    async with HttpClient(url, token=TOKEN) as c:
        pools = await c.pools()
    assert pools["pools"]["api"]["in_use"] == 0 and pools["queued"] == 0


def api(traj: str = "t", **kw: Any) -> Action:
    return Action.build(traj, {"api": 1}, **kw)


async def in_use(client: HttpClient) -> int:
    return int((await client.pools())["pools"]["api"]["in_use"])


async def held_and_queued(client: HttpClient) -> tuple[int, int]:
    """(units held, actions queued) as the server reports them."""
    pools = await client.pools()
    return int(pools["pools"]["api"]["in_use"]), int(pools["queued"])


async def state_by_key(client: HttpClient, action: Action, key: str) -> str:
    """The server's state of the action submitted under ``key``: a submit with the same
    key returns that action and never queues another."""
    return (await client.submit(action, idempotency_key=key)).state


async def test_lease_holds_the_units_for_the_body_and_releases_them(client):
    async with client.lease(api()) as lease:
        assert lease.allocation["api"].amount == 1 and lease.fencing_token >= 1
        assert await in_use(client) == 1
    assert await in_use(client) == 0


async def test_heartbeats_keep_a_lease_alive_past_its_ttl(client):
    async with client.lease(api(ttl=0.6)) as lease:
        await asyncio.sleep(1.5)
        state = await client.get(lease.action_id)
        assert state.state == "granted"
    assert (await client.get(lease.action_id)).state == "released"


async def test_release_on_error_and_the_error_wins(client):
    with pytest.raises(RuntimeError, match="tool crashed"):
        async with client.lease(api()) as lease:
            raise RuntimeError("tool crashed")
    assert (await client.get(lease.action_id)).state == "released"


async def test_cancelling_the_body_releases_the_lease(client):
    entered = asyncio.Event()
    got: list[str] = []

    async def body() -> None:
        async with client.lease(api()) as lease:
            got.append(lease.action_id)
            entered.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(body())
    await entered.wait()
    assert await held_and_queued(client) == (1, 0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await client.get(got[0])).state == "released"
    assert await held_and_queued(client) == (0, 0)


async def test_cancelling_a_waiting_lease_cancels_the_queued_action(client, url):
    waiter, key = api("waiter"), uuid.uuid4().hex
    async with client.lease(api("holder")):
        task = asyncio.create_task(client.acquire(waiter, idempotency_key=key))
        await asyncio.sleep(0.3)
        assert await held_and_queued(client) == (1, 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await state_by_key(client, waiter, key) == "cancelled"
        assert await held_and_queued(client) == (1, 0)  # the holder's lease alone
    assert await held_and_queued(client) == (0, 0)


async def test_cancel_right_after_submit_leaves_nothing_behind(client):
    # Cancelled while the first request may be in flight: the client learns the action
    # through its idempotency key and cancels or releases it.
    for delay in (0.0, 0.001, 0.005, 0.02):
        action, key = api(), uuid.uuid4().hex
        task = asyncio.create_task(client.acquire(action, idempotency_key=key))
        await asyncio.sleep(delay)
        task.cancel()
        try:
            lease = await task
        except asyncio.CancelledError:
            pass
        else:
            await client.release(lease.id)  # granted before the cancel arrived
        # Cancelled while queued or released after its grant, never left behind.
        assert await state_by_key(client, action, key) in ("cancelled", "released"), delay
        assert await held_and_queued(client) == (0, 0), delay


async def test_acquire_timeout_cancels_the_action(client):
    late, key = api("late"), uuid.uuid4().hex
    async with client.lease(api("holder")):
        with pytest.raises(TimeoutError, match="not granted"):
            await client.acquire(late, timeout=0.3, idempotency_key=key)
        assert await state_by_key(client, late, key) == "cancelled"
        assert await held_and_queued(client) == (1, 0)


async def test_busy_server_429_within_a_deadline_is_a_timeout(client):
    async with client.lease(api("holder")):
        a = await client.submit(api("q1"))
        b = await client.submit(api("q2"))
        with pytest.raises(TooManyQueued) as info:
            await client.submit(api("q3"))
        assert info.value.retry_after == 1
        with pytest.raises(TimeoutError, match="server busy"):
            await client.acquire(api("q3"), timeout=0.5)
        await client.cancel(a.id)
        await client.cancel(b.id)


async def test_release_after_expiry_raises_lease_expired(client):
    lease = await client.acquire(api(ttl=0.2))
    await asyncio.sleep(0.4)
    with pytest.raises(LeaseExpired):
        await client.release(lease.id)
    with pytest.raises(LeaseExpired):
        await client.heartbeat(lease.id)


async def test_errors_map_to_tangram_errors(client, url):
    with pytest.raises(InvalidAction, match="unknown pool"):
        await client.submit(Action.build("t", {"gpu": 1}))
    async with HttpClient(url, token="not-a-tenant-token-000") as stranger:
        with pytest.raises(Unauthorized):
            await stranger.pools()


class Flaky(httpx.AsyncBaseTransport):
    """Fails the first ``before`` requests before sending them, and loses the answer of
    the next ``after`` requests after the server handled them."""

    def __init__(self, before: int, after: int) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.before, self.after = before, after

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.before > 0:
            self.before -= 1
            raise httpx.ConnectError("refused", request=request)
        response = await self.inner.handle_async_request(request)
        if self.after > 0:
            self.after -= 1
            await response.aread()
            raise httpx.ReadError("connection reset", request=request)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_transient_errors_are_retried_and_never_make_a_second_action(url, client):
    flaky = HttpClient(url, token=TOKEN, transport=Flaky(2, 2), backoff=0.01)
    async with flaky, flaky.lease(api("flaky")) as lease:
        # Two submits reached the server; the idempotency key made them one action.
        assert await in_use(client) == 1
        assert lease.allocation["api"].amount == 1
    assert await in_use(client) == 0


async def test_wire_dicts_are_accepted_as_actions(client):
    lease = await client.acquire({"trajectory": "d", "demands": {"api": 1}})
    await client.release(lease.id, usage={"tokens": 10})


def test_sync_client_lease_and_error(url):
    with SyncHttpClient(url, token=TOKEN) as client:
        with client.lease(api(ttl=0.6)) as lease:
            time.sleep(1.2)  # heartbeats run in the client's loop thread meanwhile
            assert client.get(lease.action_id).state == "granted"
        assert client.get(lease.action_id).state == "released"
        with pytest.raises(ValueError), client.lease(api()) as lease2:
            raise ValueError("boom")
        assert client.get(lease2.action_id).state == "released"
        assert client.pools()["pools"]["api"]["in_use"] == 0


async def test_a_proxys_html_502_is_retried_then_reported():
    from tangram.client import HttpError

    calls = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        return httpx.Response(502, text="<html>bad gateway</html>")

    client = HttpClient("http://proxy", transport=httpx.MockTransport(answer), backoff=0.001)
    async with client:
        with pytest.raises(HttpError) as info:
            await client.pools()
    assert info.value.status == 502 and "bad gateway" in info.value.detail
    assert len(calls) == 5  # the first try and 4 retries
