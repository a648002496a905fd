"""Inference engines behind one small interface, for the GPU service executor.

An ``Engine`` launches an ``Instance`` on one chunk of GPUs; the instance can be put to
sleep (its GPU memory given back, its process kept) and woken again, which is how a GPU
service is evicted and restored without paying a cold start each time.

- ``VllmEngine``: vLLM's OpenAI server in sleep mode (``POST /sleep?level=1|2``,
  ``POST /wake_up``, ``GET /is_sleeping``; these routes need ``VLLM_SERVER_DEV_MODE=1``).
- ``SglangEngine``: SGLang's server (``POST /release_memory_occupation``,
  ``POST /resume_memory_occupation``).
- ``InProcessEngine``: a service's ``loader``/``to_device``/``run`` in this process,
  the executor's original behaviour, as one backend among the others.

HTTP engines run a command template (placeholders ``{model}``, ``{tp}``, ``{port}``,
``{host}``, ``{gpus}``) with ``CUDA_VISIBLE_DEVICES`` set to every GPU of the chunk and
the tensor parallelism equal to the chunk's size. ``launch`` waits until ``/health``
answers 200; an engine that exits first, or is not healthy in time, raises
``EngineError`` with the last lines of its stderr. Each engine runs under a guard
(tangram/executors/engine_guard.py) that stops it if the executor dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import httpx

STDERR_LINES = 20  # how much of a dead engine's stderr an error quotes
# The guard between executor and engine, run as a file: it needs only the standard
# library, and -I -S keep its start (one per engine) free of site packages.
GUARD = [sys.executable, "-I", "-S", str(Path(__file__).with_name("engine_guard.py"))]


class EngineError(RuntimeError):
    """An engine that would not start, died, or refused a sleep, wake or call. (Not a
    ``TangramError``: those are the broker's errors, each with an HTTP problem type;
    this one is the executor's, like ``ServiceError``.)"""


@runtime_checkable
class Instance(Protocol):
    """One engine process (or in-process state) on one chunk of GPUs."""

    url: str
    gpus: tuple[int, ...]

    async def sleep(self, level: int = 1) -> None: ...
    async def wake(self) -> None: ...
    async def is_sleeping(self) -> bool: ...
    async def health(self) -> bool: ...
    async def call(self, payload: Any) -> Any: ...
    def stop(self) -> None: ...


@runtime_checkable
class Engine(Protocol):
    """Starts instances: ``launch`` blocks until the instance serves (awake)."""

    def launch(self, gpus: Sequence[int]) -> Instance: ...


def free_port(host: str = "127.0.0.1") -> int:
    # Another process may take it before the engine binds it; the engine then exits and
    # launch reports its stderr (address in use), which is rare on a GPU node.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def tail(path: str, lines: int = STDERR_LINES) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:]).rstrip()
    except OSError:
        return ""


# ---------------------------------------------------------------- HTTP engines
@dataclass(eq=False)
class HttpInstance:
    """An engine process serving HTTP on ``url``, pinned to ``gpus``.

    ``proc`` is the engine's guard, the leader of its process group: it exits when and
    as the engine does (its code, or killed by the same signal)."""

    url: str
    gpus: tuple[int, ...]
    proc: subprocess.Popen[bytes]
    log_path: str
    request_timeout: float = 600.0

    async def sleep(self, level: int = 1) -> None:
        raise NotImplementedError

    async def wake(self) -> None:
        raise NotImplementedError

    async def is_sleeping(self) -> bool:
        raise NotImplementedError

    async def health(self) -> bool:
        if self.proc.poll() is not None:
            return False
        try:
            return (await self._request("GET", "/health", check=False)).status_code == 200
        except EngineError:
            return False

    async def call(self, payload: Any) -> Any:
        """One OpenAI-style request: a body with ``messages`` goes to
        ``/v1/chat/completions``, one with ``prompt`` to ``/v1/completions``; returns
        the answer's JSON."""
        if not isinstance(payload, Mapping):
            raise EngineError(f"an engine call takes an OpenAI request body, got {payload!r:.80}")
        if "messages" in payload:
            path = "/v1/chat/completions"
        elif "prompt" in payload:
            path = "/v1/completions"
        else:
            raise EngineError("an engine call needs 'messages' (chat) or 'prompt' (completion)")
        if payload.get("stream"):
            raise EngineError("streaming is not supported through the service executor")
        return (await self._request("POST", path, json=dict(payload))).json()

    def stop(self) -> None:
        """Terminate the engine and everything it started (its process group)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        with contextlib.suppress(OSError):
            os.unlink(self.log_path)

    def died(self) -> str:
        """'' while the process runs, else what it left on stderr."""
        code = self.proc.poll()
        if code is None:
            return ""
        return f"; exit code {code}, last stderr lines:\n{tail(self.log_path)}"

    async def _died_soon(self, within: float = 1.0) -> str:
        """``died()``, giving the guard ``within`` seconds to follow an engine that may
        have just died (it exits a moment after the engine)."""
        deadline = time.monotonic() + within
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.died()

    async def _request(
        self, method: str, path: str, *, check: bool = True, **kw: Any
    ) -> httpx.Response:
        # A client per request: instances are used from more than one event loop (a
        # registration runs its own), and an httpx client is bound to one.
        try:
            async with httpx.AsyncClient(timeout=self.request_timeout) as client:
                r = await client.request(method, self.url + path, **kw)
        except httpx.HTTPError as exc:
            # Refused or cut off: the engine may have just died.
            died = await self._died_soon()
            raise EngineError(f"{method} {self.url}{path}: {exc!r}{died}") from exc
        if check and r.status_code >= 400:
            raise EngineError(
                f"{method} {self.url}{path}: HTTP {r.status_code}: {r.text[:500]}{self.died()}"
            )
        return r


class VllmInstance(HttpInstance):
    async def sleep(self, level: int = 1) -> None:
        # Level 1 moves the weights to host memory and drops the KV cache; level 2 drops
        # the weights too (they must be loaded again after waking).
        await self._request("POST", "/sleep", params={"level": str(level)})

    async def wake(self) -> None:
        await self._request("POST", "/wake_up")

    async def is_sleeping(self) -> bool:
        return bool((await self._request("GET", "/is_sleeping")).json()["is_sleeping"])


@dataclass(eq=False)
class SglangInstance(HttpInstance):
    # SGLang has no route that says whether memory is released; the instance remembers.
    sleeping: bool = False

    async def sleep(self, level: int = 1) -> None:
        # SGLang releases weights and KV cache together; the level does not apply.
        await self._request("POST", "/release_memory_occupation", json={})
        self.sleeping = True

    async def wake(self) -> None:
        await self._request("POST", "/resume_memory_occupation", json={})
        self.sleeping = False

    async def is_sleeping(self) -> bool:
        return self.sleeping


@dataclass
class HttpEngine:
    """An engine run as a command (argv template, or a string split like a shell).

    ``env`` is added to the executor's environment; ``CUDA_VISIBLE_DEVICES`` is set to
    the chunk's GPUs. ``startup_timeout`` bounds the wait for ``GET /health``."""

    model: str = ""
    command: Sequence[str] | str = ()
    env: Mapping[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    startup_timeout: float = 900.0
    request_timeout: float = 600.0
    instance_type: type[HttpInstance] = field(default=HttpInstance, repr=False)

    def argv(self, gpus: Sequence[int], port: int) -> list[str]:
        words = shlex.split(self.command) if isinstance(self.command, str) else list(self.command)
        if not words:
            raise EngineError(f"{type(self).__name__} has no command to launch")
        fields = {
            "model": self.model,
            "tp": str(len(gpus)),
            "port": str(port),
            "host": self.host,
            "gpus": ",".join(str(g) for g in gpus),
        }
        # Plain replacement, not str.format: other braces (a JSON flag) stay as written.
        out = []
        for w in words:
            for name, value in fields.items():
                w = w.replace("{" + name + "}", value)
            out.append(w)
        return out

    def launch(self, gpus: Sequence[int]) -> HttpInstance:
        if not gpus:
            raise EngineError("an engine needs at least one GPU")
        chunk = tuple(int(g) for g in gpus)
        port = free_port(self.host)
        argv = self.argv(chunk, port)
        env = {
            **os.environ,
            **self.env,
            "CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in chunk),
        }
        fd, log_path = tempfile.mkstemp(prefix="tangram-engine-", suffix=".stderr")
        try:
            # A session of its own: stop() ends the engine's workers (one per GPU) too. The
            # guard leads it and ends it all if this process dies.
            proc = subprocess.Popen(
                [*GUARD, str(os.getpid()), "--", *argv],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=fd,
                start_new_session=True,
            )
        except OSError as exc:
            os.unlink(log_path)
            raise EngineError(f"cannot start the guard of {argv[0]!r}: {exc}") from exc
        finally:
            os.close(fd)
        inst = self.instance_type(
            url=f"http://{self.host}:{port}",
            gpus=chunk,
            proc=proc,
            log_path=log_path,
            request_timeout=self.request_timeout,
        )
        self._wait_healthy(inst, argv)
        return inst

    def _wait_healthy(self, inst: HttpInstance, argv: list[str]) -> None:
        what = f"{shlex.join(argv[:3])}... on GPUs {list(inst.gpus)}"
        deadline = time.monotonic() + self.startup_timeout
        with httpx.Client(timeout=2.0) as client:
            while True:
                if inst.proc.poll() is not None:
                    msg = f"engine {what} exited before it was healthy{inst.died()}"
                    inst.stop()
                    raise EngineError(msg)
                try:
                    if client.get(inst.url + "/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    last = tail(inst.log_path)
                    inst.stop()
                    raise EngineError(
                        f"engine {what} was not healthy after {self.startup_timeout:g}s; "
                        f"last stderr lines:\n{last}"
                    )
                time.sleep(0.1)


@dataclass
class VllmEngine(HttpEngine):
    """vLLM in sleep mode. The default command needs ``vllm`` on PATH."""

    command: Sequence[str] | str = (
        "vllm", "serve", "{model}", "--enable-sleep-mode", "--tensor-parallel-size", "{tp}",
        "--host", "{host}", "--port", "{port}",
    )  # fmt: skip
    env: Mapping[str, str] = field(default_factory=lambda: {"VLLM_SERVER_DEV_MODE": "1"})
    instance_type: type[HttpInstance] = field(default=VllmInstance, repr=False)


@dataclass
class SglangEngine(HttpEngine):
    """SGLang with its memory saver, which ``release_memory_occupation`` needs."""

    command: Sequence[str] | str = (
        sys.executable, "-m", "sglang.launch_server", "--model-path", "{model}", "--tp", "{tp}",
        "--host", "{host}", "--port", "{port}", "--enable-memory-saver",
    )  # fmt: skip
    instance_type: type[HttpInstance] = field(default=SglangInstance, repr=False)


# ---------------------------------------------------------------- in process
@dataclass(eq=False)
class InProcessInstance:
    """The service's state copied onto the chunk's device in this process; asleep, the
    device copy is dropped (``evict`` is called on it first) and the host copy kept."""

    engine: InProcessEngine
    gpus: tuple[int, ...]
    url: str
    state: Any = None

    async def sleep(self, level: int = 1) -> None:
        if self.state is not None and self.engine.evict is not None:
            await asyncio.to_thread(self.engine.evict, self.state)
        self.state = None

    async def wake(self) -> None:
        if self.state is None:
            self.state = await asyncio.to_thread(self.engine.copy, self.gpus)

    async def is_sleeping(self) -> bool:
        return self.state is None

    async def health(self) -> bool:
        return True

    async def call(self, payload: Any) -> Any:
        if self.state is None:
            raise EngineError(f"{self.url} is asleep; wake it first")
        return await asyncio.to_thread(self.engine.run, self.state, payload)

    def stop(self) -> None:
        self.state = None


@dataclass(eq=False)
class InProcessEngine:
    """``loader()`` builds the host copy once (at the first launch); ``to_device`` (the
    service executor's by default) copies it onto ``cuda:<first GPU>``, or the CPU with
    ``device_kind="cpu"``; ``run(state, payload)`` serves a call."""

    loader: Callable[[], Any]
    run: Callable[[Any, Any], Any]
    to_device: Callable[[Any, str], Any] | None = None
    evict: Callable[[Any], Any] | None = None
    device_kind: str = "cpu"
    host_state: Any = field(default=None, repr=False)
    loaded: bool = field(default=False, repr=False)

    def device(self, gpus: Sequence[int]) -> str:
        return "cpu" if self.device_kind == "cpu" else f"cuda:{gpus[0]}"

    def copy(self, gpus: Sequence[int]) -> Any:
        from tangram.executors.service import to_device  # service.py imports this module

        if not self.loaded:
            self.host_state, self.loaded = self.loader(), True
        return (self.to_device or to_device)(self.host_state, self.device(gpus))

    def launch(self, gpus: Sequence[int]) -> InProcessInstance:
        if not gpus:
            raise EngineError("an engine needs at least one GPU")
        chunk = tuple(int(g) for g in gpus)
        url = f"inprocess://{self.device(chunk)}/{','.join(map(str, chunk))}"
        return InProcessInstance(self, chunk, url, self.copy(chunk))
