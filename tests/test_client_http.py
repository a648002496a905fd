"""``HttpClient`` and ``SyncHttpClient`` against a live server: the lease context manager
under errors, cancellation and timeouts, retries of transient errors, error mapping."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from tangram.client import (
    BrokerUnreachable,
    HttpClient,
    SyncHttpClient,
    TooManyQueued,
    Unauthorized,
)
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


# ---------------------------------------------------------------- errors a caller can act on
def test_every_error_class_imports_from_tangram_client():
    import tangram.client
    from tangram.client import BrokerUnreachable, HttpError, LeaseExpired  # noqa: F401
    from tangram.errors import CODES

    for code in CODES:
        assert getattr(tangram.client, code.name) is code.cls, code.name
        assert code.name in tangram.client.__all__
    for name in ("HttpError", "Unauthorized", "TooManyQueued", "ServerUnavailable"):
        assert name in tangram.client.__all__


async def test_each_404_is_its_own_error_naming_what_is_missing(client, url):
    from tangram.client import HttpError, UnknownAction, UnknownLease

    with pytest.raises(UnknownAction, match="no action 'a-none'"):
        await client.get("a-none")
    with pytest.raises(UnknownAction):
        await client.cancel("a-none")
    with pytest.raises(UnknownLease, match="no lease 'l-none'"):
        await client.heartbeat("l-none")
    with pytest.raises(UnknownLease, match="no lease 'l-none'"):
        await client.release("l-none")
    # A wrong base URL reaches the server but no endpoint: neither error, and the
    # message says which URL was asked.
    async with HttpClient(url + "/api", token=TOKEN) as wrong:
        with pytest.raises(HttpError) as info:
            await wrong.submit(api())
        with pytest.raises(HttpError) as info2:
            await wrong.get("a1")
    for err in (info.value, info2.value):
        assert not isinstance(err, (UnknownAction, UnknownLease))
        assert err.status == 404
        assert f"{url}/api/v1/actions" in str(err) and "base URL" in str(err)


class NotTangram(BaseHTTPRequestHandler):
    """Some other web server: a 404 page in HTML for every path."""

    def do_GET(self) -> None:
        body = b"<html><body>404 page not found</body></html>"
        self.send_response(404)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args: Any) -> None:
        pass


async def test_a_404_from_a_server_that_is_not_tangram_names_the_url():
    from tangram.client import HttpError, UnknownAction, UnknownLease

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotTangram)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        async with HttpClient(base) as other:
            with pytest.raises(HttpError) as info:
                await other.heartbeat("l1")
    finally:
        server.shutdown()
        server.server_close()
    err = info.value
    assert not isinstance(err, (UnknownAction, UnknownLease)) and err.status == 404
    assert f"POST {base}/v1/leases/l1/heartbeat" in str(err)
    assert "base URL" in str(err) and "404 page not found" in str(err)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_server_that_is_down_is_broker_unreachable_naming_the_url():
    from tangram.client import BrokerUnreachable, TangramError

    base = f"http://127.0.0.1:{closed_port()}"
    async with HttpClient(base, backoff=0.001, retries=2) as down:
        with pytest.raises(BrokerUnreachable) as info:
            await down.pools()
        with pytest.raises(BrokerUnreachable) as info2:
            await down.acquire(api(), timeout=5)
    err = info.value
    assert isinstance(err, TangramError) and isinstance(err.__cause__, httpx.ConnectError)
    assert err.url == f"{base}/v1/pools"
    assert f"GET {base}/v1/pools" in str(err) and "ConnectError" in str(err)
    assert "3 tries" in str(err)
    assert f"POST {base}/v1/actions" in str(info2.value)


def test_the_sync_client_says_the_same():
    from tangram.client import BrokerUnreachable

    base = f"http://127.0.0.1:{closed_port()}"
    with (
        SyncHttpClient(base, backoff=0.001, retries=1) as down,
        pytest.raises(BrokerUnreachable, match=f"at GET {base}/v1/pools"),
    ):
        down.pools()


async def test_a_heartbeat_that_gets_no_answer_does_not_lose_the_lease():
    # Unreachable is "not asked", not "lost": the keep-alive tries again next beat.
    from tangram.client import RemoteLease

    lease = RemoteLease("l1", "a1", 1, {}, 1, False, time.time() + 60, 60.0)
    async with HttpClient(f"http://127.0.0.1:{closed_port()}", backoff=0.001) as down:
        assert await down.heartbeat_many([lease]) == {}


async def test_retries_back_off_exponentially_with_jitter(monkeypatch):
    import tangram.client.http as http_module

    pauses: list[float] = []

    class Asyncio:
        """asyncio as the client module sees it, with a sleep that only takes notes."""

        def __getattr__(self, name: str) -> Any:
            return getattr(asyncio, name)

        @staticmethod
        async def sleep(seconds: float) -> None:
            pauses.append(seconds)

    monkeypatch.setattr(http_module, "asyncio", Asyncio())
    base = f"http://127.0.0.1:{closed_port()}"
    ratios: list[float] = []
    for _ in range(3):
        pauses.clear()
        async with HttpClient(base, retries=4, backoff=0.1, max_backoff=0.5) as down:
            with pytest.raises(BrokerUnreachable):
                await down.pools()
        nominal = [0.1, 0.2, 0.4, 0.5]  # doubling, capped at max_backoff
        assert len(pauses) == len(nominal)
        ratios += [p / n for p, n in zip(pauses, nominal, strict=True)]
    # Each pause is half to all of its nominal delay, and they are not in lockstep.
    assert all(0.5 <= r <= 1.0 for r in ratios), ratios
    assert len({round(r, 6) for r in ratios}) > len(ratios) // 2, ratios


async def test_an_expiry_message_tells_a_time_the_client_can_read(client):
    lease = await client.acquire(api(ttl=0.2))
    await asyncio.sleep(0.4)
    with pytest.raises(LeaseExpired) as info:
        await client.release(lease.id)
    message = str(info.value)
    # Seconds ago, not a time on the broker's own clock.
    assert re.search(r"expired \d+\.\d s ago", message), message
