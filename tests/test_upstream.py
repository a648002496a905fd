"""The gateway's upstream client (tangram/server/upstream.py) against a raw asyncio
server on loopback that answers with exactly the bytes each test gives it: framing by
length, by chunks and by closing, keep-alive reuse, a server that closes an idle
connection, timeouts and refused connections."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tangram.server.upstream import UpstreamError, Upstreams, UpstreamTimeout

Reply = Callable[[bytes], bytes | None]  # request bytes -> answer bytes (None: no answer)


class Server:
    """Answers each request on a connection with ``reply(request)``; closes after the
    answer when it says so (``close_after``); counts connections."""

    def __init__(self, reply: Reply, close_after: bool = False) -> None:
        self.reply = reply
        self.close_after = close_after
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                answer = self.reply(head + body)
                if answer is None:
                    await asyncio.sleep(3600)
                writer.write(answer or b"")
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def serve(server: Server) -> tuple[asyncio.AbstractServer, str]:
    srv = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    return srv, f"http://127.0.0.1:{port}/v1/completions"


def fixed(body: bytes, extra: bytes = b"") -> Reply:
    return lambda _: (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        + extra
        + b"Content-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


async def read(answer) -> bytes:  # type: ignore[no-untyped-def]
    try:
        return b"".join([c async for c in answer.chunks()])
    finally:
        answer.close()  # as the gateway does: the connection goes back or is closed


@pytest.fixture
async def pool() -> AsyncIterator[Upstreams]:
    u = Upstreams(max_connections=4)
    yield u
    await u.aclose()


async def test_a_length_framed_answer_and_its_connection_is_kept(pool: Upstreams) -> None:
    seen: list[bytes] = []

    def reply(req: bytes) -> bytes:
        seen.append(req)
        return fixed(b'{"ok": 1}')(req)

    server = Server(reply)
    srv, url = await serve(server)
    async with srv:
        for _ in range(3):
            a = await pool.post(url, b'{"x": 1}', {"content-type": "application/json"})
            assert a.status == 200 and a.header(b"content-type") == "application/json"
            assert await read(a) == b'{"ok": 1}'
        assert server.connections == 1 and pool.connections() == 1
    head = seen[0].split(b"\r\n")
    assert head[0] == b"POST /v1/completions HTTP/1.1"
    assert b"content-type: application/json" in head and seen[0].endswith(b'{"x": 1}')


async def test_chunked_answers_are_undone_chunk_by_chunk(pool: Upstreams) -> None:
    events = [b"data: one\n\n", b"data: two\n\n", b"data: [DONE]\n\n"]
    body = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"
    srv, url = await serve(
        Server(
            lambda _: (
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n" + body
            )
        )
    )
    async with srv:
        a = await pool.post(url, b"{}", {})
        assert await read(a) == b"".join(events)
        assert pool.connections() == 1  # complete and keep-alive: kept


async def test_an_answer_without_length_ends_with_the_connection(pool: Upstreams) -> None:
    srv, url = await serve(
        Server(lambda _: b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it", True)
    )
    async with srv:
        a = await pool.post(url, b"{}", {})
        assert await read(a) == b"all of it"
        assert pool.connections() == 0  # not reusable


async def test_an_idle_connection_the_server_closed_is_replaced_once(pool: Upstreams) -> None:
    server = Server(fixed(b"x"))
    srv, url = await serve(server)
    async with srv:
        assert await read(await pool.post(url, b"{}", {})) == b"x"
        for w in server.writers:  # the server drops the idle connection
            w.close()
        await asyncio.sleep(0.05)
        assert await read(await pool.post(url, b"{}", {})) == b"x"
        assert server.connections == 2


async def test_a_connection_lost_mid_answer_is_an_error(pool: Upstreams) -> None:
    srv, url = await serve(
        Server(lambda _: b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial", True)
    )
    async with srv:
        a = await pool.post(url, b"{}", {})
        with pytest.raises(UpstreamError, match="closed the connection"):
            await read(a)
        assert pool.connections() == 0


async def test_timeouts_and_refusals(pool: Upstreams) -> None:
    srv, url = await serve(Server(lambda _: None))  # never answers
    async with srv:
        with pytest.raises(UpstreamTimeout, match=r"no answer within 0\.2 s"):
            await pool.post(url, b"{}", {}, read_timeout=0.2)
        assert pool.connections() == 0
    with pytest.raises(UpstreamError, match="could not connect"):
        await pool.post(url, b"{}", {})  # the server is gone
    # Every slot came back: four more calls do not wait for one.
    assert not pool._slots.locked()


async def test_a_malformed_answer_is_an_error(pool: Upstreams) -> None:
    srv, url = await serve(Server(lambda _: b"NOT HTTP AT ALL\r\n\r\n"))
    async with srv:
        with pytest.raises(UpstreamError, match="malformed"):
            await pool.post(url, b"{}", {})


async def test_https_upstreams_are_verified(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An API provider behind TLS: the answer comes through when its certificate is
    trusted (here through SSL_CERT_FILE), and the call is refused when it is not."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl (the command) makes the test's certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    server = Server(fixed(b"secret"))
    srv = await asyncio.start_server(server.handle, "127.0.0.1", 0, ssl=tls)
    port = srv.sockets[0].getsockname()[1]
    url = f"https://localhost:{port}/v1/completions"
    async with srv:
        untrusted = Upstreams()
        with pytest.raises(UpstreamError, match="could not connect"):
            await untrusted.post(url, b"{}", {})
        await untrusted.aclose()
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        trusted = Upstreams()
        try:
            assert await read(await trusted.post(url, b"{}", {})) == b"secret"
        finally:
            await trusted.aclose()
