"""An emulator of an OpenAI-compatible inference server, for tests and benchmarks.

It answers the documented surface of vLLM's OpenAI server with made-up but deterministic
text: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (server-sent events with
``stream: true``, ending ``data: [DONE]``; usage in the answer, and in a final chunk of a
stream with ``stream_options.include_usage``), ``GET /v1/models``, ``GET /health``;
vLLM's sleep mode (``POST /sleep?level=1|2``, ``POST /wake_up``, ``GET /is_sleeping``) and
SGLang's (``POST /release_memory_occupation``, ``POST /resume_memory_occupation``), with
503 for completions while asleep. Beyond ``--max-concurrency`` completions in flight it
answers 429 with ``Retry-After``. ``GET /stats`` says how many it served and the most it
ever had in flight (``POST /stats/reset`` starts over): what tests check.

The text: ``max_tokens`` (default 16) words, each eight hex digits of a hash of the
prompt and the word's index; so whitespace tokens count exactly: ``prompt_tokens`` is the
prompt's whitespace-separated words (chat: of the messages' contents), and
``completion_tokens`` is ``max_tokens``. Ids and ``created`` come from the same hash, so
the same request gets the same bytes every time.

``GET /info`` says what it was launched with: the GPU ids of ``CUDA_VISIBLE_DEVICES``,
the tensor parallelism (``--tensor-parallel-size``, or SGLang's ``--tp``), whether it
sleeps. ``--wake-delay`` makes waking take that long, as a real engine's reload does.

GPU memory, emulated: with ``--memory-gb`` and the environment variable
``TANGRAM_EMULATOR_GPU_DIR`` (a directory shared by the emulators of one test), an
awake emulator holds that many GB on each of its GPUs, in an accounting file there;
starting or waking beyond ``--gpu-memory-gb`` per GPU fails with "CUDA out of memory"
(at start: the process exits 1), as a real engine's would. Sleeping gives the memory
back. Every start, wake and sleep is appended to ``events.jsonl`` there, in order.

Run it as ``python -m tangram.testing.engine --port 0``: it prints ``engine: URL`` on
one line of stdout when it serves (needs the ``server`` extra: uvicorn)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

GPU_DIR_ENV = "TANGRAM_EMULATOR_GPU_DIR"
CREATED_BASE = 1_700_000_000
DEFAULT_MAX_TOKENS = 16
JSON = [(b"content-type", b"application/json")]
SSE = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def words(prompt: str, n: int) -> list[str]:
    """The ``n`` words of the answer to ``prompt``."""
    out = []
    for i in range(n):
        out.append(hashlib.sha256(f"{prompt}\x00{i}".encode()).hexdigest()[:8])
    return out


def count_tokens(text: str) -> int:
    """Tokens as this emulator counts them: whitespace-separated words."""
    return len(text.split())


def prompt_of(kind: str, body: dict[str, Any]) -> str:
    if kind == "chat":
        parts = []
        for m in body.get("messages") or []:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts.extend(str(c.get("text", "")) for c in content if isinstance(c, dict))
        return "\n".join(parts)
    prompt = body.get("prompt", "")
    if isinstance(prompt, list):
        return "\n".join(str(p) for p in prompt)
    return str(prompt)


def error(message: str, kind: str, code: int, param: str | None = None) -> bytes:
    return dumps({"error": {"message": message, "type": kind, "param": param, "code": code}})


@dataclass
class Stats:
    in_flight: int = 0
    max_in_flight: int = 0
    requests: int = 0  # completions answered 200 (streams included)
    rejected: int = 0  # answered 429 for concurrency
    sleeping_refused: int = 0
    disconnects: int = 0  # streams the client left before the end


class OutOfMemory(Exception):
    pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class GpuMemory:
    """What the emulators sharing ``root`` hold on each GPU: ``gpus.json`` maps a GPU
    id to {pid: GB}, changed under a lock; entries of dead processes are dropped."""

    root: Path
    gpus: list[str]
    gb: float
    capacity: float
    pid: int = field(default_factory=os.getpid)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, dict[str, float]]]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            path = self.root / "gpus.json"
            text = path.read_text() if path.exists() else ""
            held: dict[str, dict[str, float]] = json.loads(text or "{}")
            for per in held.values():
                for pid in [p for p in per if not _alive(int(p))]:
                    del per[pid]
            yield held
            path.write_text(json.dumps(held))

    def _event(self, event: str) -> None:
        line = {"t": time.time(), "pid": self.pid, "gpus": self.gpus, "event": event}
        with open(self.root / "events.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")

    def claim(self, event: str) -> None:
        """Hold ``gb`` on each GPU, or raise OutOfMemory and hold nothing."""
        with self._locked() as held:
            for g in self.gpus:
                used = sum(v for p, v in held.get(g, {}).items() if p != str(self.pid))
                if used + self.gb > self.capacity:
                    raise OutOfMemory(
                        f"CUDA out of memory: GPU {g} has {used:g} of {self.capacity:g} GB "
                        f"in use; {self.gb:g} GB more do not fit"
                    )
            for g in self.gpus:
                held.setdefault(g, {})[str(self.pid)] = self.gb
            self._event(event)

    def free(self, event: str) -> None:
        with self._locked() as held:
            for g in self.gpus:
                held.get(g, {}).pop(str(self.pid), None)
            self._event(event)


@dataclass
class Engine:
    """The ASGI app. Latency before the first byte; ``token_delay`` between chunks."""

    models: list[str] = field(default_factory=lambda: ["emulated-model"])
    latency: float = 0.0
    token_delay: float = 0.0
    max_concurrency: int = 0  # 0: no limit
    retry_after: int = 1
    max_model_len: int = 4096
    stats: Stats = field(default_factory=Stats)
    sleep_level: int = 0  # 0: awake
    gpus: list[str] = field(default_factory=list)  # CUDA_VISIBLE_DEVICES
    tp: int = 1
    wake_delay: float = 0.0
    memory: GpuMemory | None = None  # None: no accounting

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        body = b""
        more = True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        method, path = scope["method"], scope["path"]
        route = _ROUTES.get((method, path))
        if route is None:
            status = 405 if any(p == path for _, p in _ROUTES) else 404
            await respond(send, status, error(f"no route {method} {path}", "NotFoundError", status))
            return
        await route(self, scope, body, receive, send)

    # ---- the OpenAI surface ----------------------------------------------------------
    async def chat(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        await self.complete("chat", body, receive, send)

    async def completions(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        await self.complete("text", body, receive, send)

    async def complete(self, kind: str, raw: bytes, receive: Receive, send: Send) -> None:
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            await respond(send, 400, error(f"invalid JSON body: {exc}", "BadRequestError", 400))
            return
        model = body.get("model")
        if model not in self.models:
            msg = f"The model `{model}` does not exist."
            await respond(send, 404, error(msg, "NotFoundError", 404, "model"))
            return
        if self.sleep_level:
            self.stats.sleeping_refused += 1
            msg = f"the engine is sleeping (level {self.sleep_level}); POST /wake_up first"
            await respond(send, 503, error(msg, "ServiceUnavailableError", 503))
            return
        st = self.stats
        if self.max_concurrency and st.in_flight >= self.max_concurrency:
            st.rejected += 1
            msg = f"more than {self.max_concurrency} requests at once; retry later"
            headers = [(b"retry-after", str(self.retry_after).encode())]
            await respond(send, 429, error(msg, "RateLimitError", 429), headers)
            return
        st.in_flight += 1
        st.max_in_flight = max(st.max_in_flight, st.in_flight)
        try:
            await self._answer(kind, body, receive, send)
        finally:
            st.in_flight -= 1

    async def _answer(self, kind: str, body: dict[str, Any], receive: Receive, send: Send) -> None:
        prompt = prompt_of(kind, body)
        n = body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS
        n = max(0, int(n))
        out = words(prompt, n)
        digest = hashlib.sha256(f"{kind}\x00{prompt}\x00{n}".encode()).hexdigest()
        ident = ("chatcmpl-" if kind == "chat" else "cmpl-") + digest[:24]
        created = CREATED_BASE + int(digest[24:30], 16) % 10_000_000
        p = count_tokens(prompt)
        usage = {"prompt_tokens": p, "total_tokens": p + n, "completion_tokens": n}
        model = body["model"]
        if self.latency > 0:
            # A client that leaves meanwhile aborts the request, as vLLM's server does.
            gone = asyncio.ensure_future(_disconnected(receive))
            try:
                await asyncio.wait((gone,), timeout=self.latency)
            finally:
                gone.cancel()
            if gone.done() and not gone.cancelled():
                self.stats.disconnects += 1
                return
        if not body.get("stream"):
            text = " ".join(out)
            if kind == "chat":
                choice: dict[str, Any] = {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": "length",
                }
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}
                obj = "text_completion"
            answer = {
                "id": ident,
                "object": obj,
                "created": created,
                "model": model,
                "choices": [choice],
                "usage": usage,
            }
            self.stats.requests += 1
            await respond(send, 200, dumps(answer))
            return
        opts = body.get("stream_options") or {}
        include_usage = bool(opts.get("include_usage")) if isinstance(opts, dict) else False
        events = _events(kind, ident, created, model, out, usage, include_usage)
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": SSE})
            first = True
            async for event in events:
                if gone.done():
                    self.stats.disconnects += 1
                    return
                if not first and self.token_delay > 0:
                    await asyncio.sleep(self.token_delay)
                    if gone.done():
                        self.stats.disconnects += 1
                        return
                first = False
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
            self.stats.requests += 1
        finally:
            gone.cancel()

    async def models_list(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        data = [
            {
                "id": m,
                "object": "model",
                "created": CREATED_BASE,
                "owned_by": "vllm",
                "root": m,
                "parent": None,
                "max_model_len": self.max_model_len,
            }
            for m in self.models
        ]
        await respond(send, 200, dumps({"object": "list", "data": data}))

    async def health(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        await respond(send, 200, b"", [])

    # ---- sleep mode ------------------------------------------------------------------
    async def sleep(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        query = parse_qs(scope.get("query_string", b"").decode())
        level = query.get("level", ["1"])[0]
        if level not in ("1", "2"):
            await respond(send, 400, error(f"level {level!r}: 1 or 2", "BadRequestError", 400))
            return
        self._to_sleep(int(level))
        await respond(send, 200, b"", [])

    async def wake_up(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        problem = await self._wake()
        if problem:
            await respond(send, 500, error(problem, "InternalServerError", 500))
            return
        await respond(send, 200, b"", [])

    def _to_sleep(self, level: int) -> None:
        if not self.sleep_level and self.memory is not None:
            self.memory.free("sleep")
        self.sleep_level = level

    async def _wake(self) -> str:
        """Wake up; '' or why not (the memory is taken: it stays asleep)."""
        if not self.sleep_level:
            return ""
        if self.wake_delay > 0:
            await asyncio.sleep(self.wake_delay)
        if self.memory is not None:
            try:
                self.memory.claim("wake")
            except OutOfMemory as exc:
                return str(exc)
        self.sleep_level = 0
        return ""

    async def is_sleeping(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        await respond(send, 200, dumps({"is_sleeping": bool(self.sleep_level)}))

    async def release_memory(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        self._to_sleep(2)  # SGLang frees weights and KV cache: vLLM's level 2
        await respond(send, 200, dumps({"success": True, "message": "memory released"}))

    async def resume_memory(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        problem = await self._wake()
        if problem:
            await respond(send, 500, dumps({"success": False, "message": problem}))
            return
        await respond(send, 200, dumps({"success": True, "message": "memory resumed"}))

    async def info(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        answer = {
            "gpus": [int(g) if g.isdigit() else g for g in self.gpus],
            "tp": self.tp,
            "sleeping": bool(self.sleep_level),
            "sleep_level": self.sleep_level,
            "memory_gb": self.memory.gb if self.memory else None,
            "models": self.models,
            "pid": os.getpid(),
        }
        await respond(send, 200, dumps(answer))

    # ---- what tests read -------------------------------------------------------------
    async def get_stats(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        st = self.stats
        await respond(send, 200, dumps({**st.__dict__, "sleeping": bool(self.sleep_level)}))

    async def reset_stats(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        in_flight = self.stats.in_flight
        self.stats = Stats(in_flight=in_flight, max_in_flight=in_flight)
        await respond(send, 200, dumps({"ok": True}))


Handler = Callable[[Engine, Scope, bytes, Receive, Send], Awaitable[None]]
_ROUTES: dict[tuple[str, str], Handler] = {
    ("POST", "/v1/chat/completions"): Engine.chat,
    ("POST", "/v1/completions"): Engine.completions,
    ("GET", "/v1/models"): Engine.models_list,
    ("GET", "/health"): Engine.health,
    ("POST", "/sleep"): Engine.sleep,
    ("POST", "/wake_up"): Engine.wake_up,
    ("GET", "/is_sleeping"): Engine.is_sleeping,
    ("POST", "/release_memory_occupation"): Engine.release_memory,
    ("POST", "/resume_memory_occupation"): Engine.resume_memory,
    ("GET", "/info"): Engine.info,
    ("GET", "/stats"): Engine.get_stats,
    ("POST", "/stats/reset"): Engine.reset_stats,
}


async def _events(
    kind: str,
    ident: str,
    created: int,
    model: str,
    out: list[str],
    usage: dict[str, int],
    include_usage: bool,
) -> AsyncIterator[bytes]:
    """The events of a stream, each ``data: {...}\\n\\n``; ``data: [DONE]`` is sent apart."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    extra: dict[str, Any] = {"usage": None} if include_usage else {}

    def chunk(choices: list[dict[str, Any]]) -> bytes:
        head = {"id": ident, "object": obj, "created": created, "model": model}
        return b"data: " + dumps({**head, "choices": choices, **extra}) + b"\n\n"

    if kind == "chat":
        yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])  # fmt: skip
    for i, w in enumerate(out):
        text = w if i == 0 else " " + w
        last = i == len(out) - 1
        reason = "length" if last and kind == "text" else None
        if kind == "chat":
            choice = {"index": 0, "delta": {"content": text}, "logprobs": None,
                      "finish_reason": reason}  # fmt: skip
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        yield chunk([choice])
    if kind == "chat" or not out:
        delta: dict[str, Any] = {"delta": {}} if kind == "chat" else {"text": ""}
        yield chunk([{"index": 0, **delta, "logprobs": None, "finish_reason": "length"}])
    if include_usage:
        head = {"id": ident, "object": obj, "created": created, "model": model}
        yield b"data: " + dumps({**head, "choices": [], "usage": usage}) + b"\n\n"


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    head = list(JSON if headers is None else headers)
    head.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tangram.testing.engine", description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0: a free port (printed)")
    ap.add_argument("--model", action="append", help="a served model name (repeatable)")
    ap.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    ap.add_argument("--token-delay", type=float, default=0.0, help="seconds between chunks")
    ap.add_argument("--max-concurrency", type=int, default=0, help="429 past this; 0: none")
    ap.add_argument("--retry-after", type=int, default=1, help="Retry-After of the 429")
    ap.add_argument(
        "--tensor-parallel-size", "--tp", dest="tp", type=int, default=1, help="reported only"
    )
    ap.add_argument("--wake-delay", type=float, default=0.0, help="seconds a wake takes")
    ap.add_argument(
        "--memory-gb", type=float, default=0.0, help=f"GB held per GPU awake, with ${GPU_DIR_ENV}"
    )
    ap.add_argument("--gpu-memory-gb", type=float, default=80.0, help="each GPU's memory")
    args = ap.parse_args(argv)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    gpus = [g.strip() for g in visible.split(",") if g.strip()]
    memory = None
    if args.memory_gb > 0 and os.environ.get(GPU_DIR_ENV):
        memory = GpuMemory(Path(os.environ[GPU_DIR_ENV]), gpus, args.memory_gb, args.gpu_memory_gb)
        try:
            memory.claim("start")  # an engine starts awake, its weights loaded
        except OutOfMemory as exc:
            sys.exit(f"engine failed to start: {exc}")
    try:
        import uvicorn
    except ImportError:
        sys.exit("the engine emulator needs uvicorn: pip install 'tangram-broker[server]'")
    engine = Engine(
        models=args.model or ["emulated-model"],
        latency=args.latency,
        token_delay=args.token_delay,
        max_concurrency=args.max_concurrency,
        retry_after=args.retry_after,
        gpus=gpus,
        tp=args.tp,
        wake_delay=args.wake_delay,
        memory=memory,
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(2048)
    sock.setblocking(False)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(
        engine, lifespan="off", log_level="warning", access_log=False, timeout_keep_alive=30
    )
    server = uvicorn.Server(config)
    # The socket listens already: a client that connects now waits in its backlog.
    print(f"engine: http://{host}:{port}", flush=True)
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
