"""Engine backends (tangram/executors/engines.py) driven by the GPU service executor.

The engines are emulated: every instance is a real subprocess of the engine emulator
(tangram.testing.engine) on a loopback port, launched through ``VllmEngine`` and
``SglangEngine`` with the emulator as their command, because the test machines have no
GPU and no model weights to run vLLM or SGLang. The emulator answers their sleep, wake,
health and OpenAI routes, reports the GPUs it was given (``CUDA_VISIBLE_DEVICES``) and
its tensor parallelism, and, with ``TANGRAM_EMULATOR_GPU_DIR``, accounts "GPU memory"
in a shared directory so that two awake engines on one GPU over-commit and the second
fails to start or wake ("CUDA out of memory"), as a real one would. Each engine runs
under its guard (tangram/executors/engine_guard.py), which ends it if the executor dies:
tested by killing real executor processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

pytest.importorskip("uvicorn")

from tangram.executors import (
    EngineError,
    GrantSigner,
    InProcessEngine,
    ServiceHost,
    ServiceSpec,
    SglangEngine,
    SignedGrant,
    StaleLease,
    VllmEngine,
)
from tangram.executors.engines import GUARD, HttpInstance, Instance
from tangram.spec import Allocation, Resident
from tangram.testing.engine import GPU_DIR_ENV

MODEL = "emulated-model"
WAKE = 0.3  # seconds the emulator takes to wake
KEY = bytes(range(32))


def emulator(*extra: str) -> list[str]:
    """The emulator as an engine command: the launcher fills in port and tp."""
    return [
        sys.executable, "-m", "tangram.testing.engine", "--port", "{port}", "--host", "{host}",
        "--model", "{model}", "--tensor-parallel-size", "{tp}", "--wake-delay", str(WAKE),
        *extra,
    ]  # fmt: skip


def vllm(*extra: str) -> VllmEngine:
    return VllmEngine(model=MODEL, command=emulator(*extra), startup_timeout=60)


def prompt(text: str = "score this") -> dict[str, Any]:
    return {"model": MODEL, "prompt": text, "max_tokens": 4}


def info(inst: Instance) -> dict[str, Any]:
    return dict(httpx.get(inst.url + "/info").json())


@pytest.fixture
def gpu_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Shared emulated GPU memory: 80 GB per GPU; engines below hold 60 GB each."""
    monkeypatch.setenv(GPU_DIR_ENV, str(tmp_path / "gpus"))
    return tmp_path / "gpus"


@pytest.fixture
def hosts() -> Iterator[list[ServiceHost]]:
    made: list[ServiceHost] = []
    yield made
    for h in made:
        h.close()  # every engine process ends with the test


def host(hosts: list[ServiceHost], *specs: ServiceSpec, **kw: Any) -> ServiceHost:
    kw.setdefault("trusted", True)
    h = ServiceHost("g0", **kw)
    hosts.append(h)
    for spec in specs:
        h.register(spec)
    return h


def never_two_awake(gpu_dir: Path) -> list[tuple[int, str]]:
    """Replay the emulators' event log; fail if a GPU ever had two awake engines."""
    awake: dict[str, set[int]] = {}
    seen = []
    for line in (gpu_dir / "events.jsonl").read_text().splitlines():
        e = json.loads(line)
        seen.append((e["pid"], e["event"]))
        for g in e["gpus"]:
            on = awake.setdefault(g, set())
            if e["event"] == "sleep":
                on.discard(e["pid"])
            else:
                on.add(e["pid"])
            assert len(on) <= 1, f"GPU {g} had engines {sorted(on)} awake at once"
    return seen


# ---------------------------------------------------------------- the engines alone
async def test_a_tensor_parallel_chunk_is_passed_whole():
    inst = vllm().launch([4, 5, 6, 7])
    try:
        assert inst.gpus == (4, 5, 6, 7)
        got = info(inst)
        assert got["gpus"] == [4, 5, 6, 7] and got["tp"] == 4
        assert await inst.health() and not await inst.is_sleeping()
        await inst.sleep(1)
        assert await inst.is_sleeping() and info(inst)["sleep_level"] == 1
        await inst.wake()
        assert not await inst.is_sleeping()
        answer = await inst.call({"model": MODEL, "messages": [{"role": "user", "content": "a"}]})
        assert answer["object"] == "chat.completion"
    finally:
        inst.stop()
    assert not await inst.health()


async def test_sglang_releases_and_resumes_memory():
    cmd = emulator()
    cmd[cmd.index("--tensor-parallel-size")] = "--tp"  # SGLang's spelling
    inst = SglangEngine(model=MODEL, command=cmd, startup_timeout=60).launch([2, 3])
    try:
        assert info(inst)["gpus"] == [2, 3] and info(inst)["tp"] == 2
        await inst.sleep()
        assert await inst.is_sleeping() and info(inst)["sleeping"]
        with pytest.raises(EngineError, match="HTTP 503"):
            await inst.call(prompt())  # asleep: refused, as SGLang would
        await inst.wake()
        assert not info(inst)["sleeping"]
        assert (await inst.call(prompt()))["usage"]["completion_tokens"] == 4
    finally:
        inst.stop()


def test_an_engine_that_dies_is_reported_with_its_stderr():
    crash = [sys.executable, "-c", "import sys; print('loading', file=sys.stderr); "
             "sys.exit('RuntimeError: CUDA error: no kernel image is available')"]  # fmt: skip
    with pytest.raises(EngineError, match=r"(?s)healthy; exit code 1.*loading.*no kernel image"):
        VllmEngine(command=crash).launch([0])
    hang = [sys.executable, "-c", "import sys, time; print('stuck', file=sys.stderr); "
            "sys.stderr.flush(); time.sleep(60)"]  # fmt: skip
    t0 = time.monotonic()
    with pytest.raises(EngineError, match=r"(?s)not healthy after 1s.*stuck"):
        VllmEngine(command=hang, startup_timeout=1).launch([0])
    assert time.monotonic() - t0 < 20  # and the hung process was stopped, not waited for


def test_an_engine_out_of_gpu_memory_at_start_dies_with_the_reason(gpu_dir: Path):
    first = vllm("--memory-gb", "60").launch([0])
    try:
        with pytest.raises(EngineError, match=r"(?s)healthy; exit code 1.*CUDA out of memory"):
            vllm("--memory-gb", "60").launch([0, 1])
    finally:
        first.stop()


# ---------------------------------------------------------------- the guard
def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: it may wait for a reaper that never
    comes, in a container whose init does not reap)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in "ZX"
    except FileNotFoundError:
        return False


def listening(url: str) -> bool:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return False
    return True


def gone(pid: int, url: str | None = None, within: float = 10.0) -> float:
    """Poll until ``pid`` has exited (and nothing listens on ``url``); the seconds it took."""
    t0 = time.monotonic()
    while alive(pid) or (url is not None and listening(url)):
        assert time.monotonic() - t0 < within, f"process {pid} still runs after {within:g}s"
        time.sleep(0.05)
    return time.monotonic() - t0


EXECUTOR = textwrap.dedent(
    """
    import json, sys, time
    import httpx
    from tangram.executors import VllmEngine

    inst = VllmEngine(model="m", command=json.loads(sys.argv[1]), startup_timeout=60).launch([0])
    pid = httpx.get(inst.url + "/info").json()["pid"]
    print(json.dumps({"url": inst.url, "pid": pid, "guard": inst.proc.pid}), flush=True)
    time.sleep(600)
    """
)


def test_an_engine_ends_when_its_executor_is_killed():
    executor = subprocess.Popen(
        [sys.executable, "-c", EXECUTOR, json.dumps(emulator())], stdout=subprocess.PIPE, text=True
    )
    assert executor.stdout is not None
    started: dict[str, Any] = {}
    try:
        started = json.loads(executor.stdout.readline())
        assert httpx.get(started["url"] + "/health").status_code == 200
        executor.kill()  # SIGKILL: nothing of the executor runs to stop its engines
        executor.wait(10)
        gone(started["pid"], started["url"])
        gone(started["guard"])
    finally:
        executor.kill()
        executor.wait()
        if started:  # what a failure left: the engine's group, led by guard or engine
            with contextlib.suppress(ProcessLookupError):
                os.killpg(started["guard"], signal.SIGKILL)


HANG_ON = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time

    cmd = [sys.executable, "-c", "import os, signal, time; signal.signal(signal.SIGTERM, "
           "signal.SIG_IGN); print('engine', os.getpid(), flush=True); time.sleep(600)"]
    guard = subprocess.Popen([*sys.argv[1:], str(os.getpid()), "--grace", "1", "--", *cmd],
                             start_new_session=True)
    print("guard", guard.pid, flush=True)
    time.sleep(600)
    """
)


def test_an_engine_deaf_to_sigterm_is_killed_after_the_grace_period():
    executor = subprocess.Popen(
        [sys.executable, "-c", HANG_ON, *GUARD], stdout=subprocess.PIPE, text=True
    )
    assert executor.stdout is not None
    pids: dict[str, int] = {}
    try:
        for _ in range(2):  # the engine (which ignores SIGTERM by then) and the guard
            name, pid = executor.stdout.readline().split()
            pids[name] = int(pid)
        executor.kill()
        executor.wait(10)
        took = gone(pids["engine"])
        assert 0.8 <= took < 6, took  # SIGTERM ignored, SIGKILL after the 1 s grace
        gone(pids["guard"])
    finally:
        executor.kill()
        executor.wait()
        if "guard" in pids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pids["guard"], signal.SIGKILL)


async def test_stop_ends_guard_and_engine_together():
    inst = vllm().launch([0])
    assert isinstance(inst, HttpInstance)
    engine = info(inst)["pid"]
    try:
        assert os.getpgid(engine) == inst.proc.pid != engine  # the guard leads the group
    finally:
        inst.stop()
    assert inst.proc.returncode is not None
    assert not alive(engine) and not listening(inst.url)  # ended before stop() returned
    assert not await inst.health()


def test_a_killed_guard_takes_its_engine_along():
    inst = vllm().launch([0])
    try:
        engine = info(inst)["pid"]
        inst.proc.kill()
        gone(engine, inst.url)
    finally:
        inst.stop()


def test_the_guard_exits_as_its_engine_did():
    inst = vllm().launch([0])
    try:
        os.kill(info(inst)["pid"], signal.SIGKILL)
        assert inst.proc.wait(10) == -signal.SIGKILL  # killed by the same signal
    finally:
        inst.stop()


def test_a_guard_whose_executor_is_gone_starts_nothing(tmp_path: Path):
    marker = tmp_path / "started"
    touch = [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]
    # Pid 1 is not this guard's parent: its executor is taken for dead already.
    assert subprocess.run([*GUARD, "1", "--", *touch], timeout=30).returncode == 1
    assert not marker.exists()
    assert subprocess.run([*GUARD, str(os.getpid()), "--", *touch], timeout=30).returncode == 0
    assert marker.exists()


# ---------------------------------------------------------------- driven by the host
async def test_evictions_sleep_before_the_granted_engine_wakes(gpu_dir, hosts):
    a = ServiceSpec("a", engine=vllm("--memory-gb", "60"))
    b = ServiceSpec("b", engine=vllm("--memory-gb", "60"))
    h = host(hosts, a, b)
    on0 = {s: Resident(s, 1, "g0", 0) for s in "ab"}
    first = await h.run("a", [0], [], prompt())
    assert first.launched and first.resident == [on0["a"]]
    # Two services alternating on GPU 0, each granted with the other evicted.
    for service, other in ("b", "a"), ("a", "b"), ("b", "a"):
        res = await h.run(service, [0], [on0[other]], prompt())
        assert res.evicted == [on0[other]] and res.resident == [on0[service]]
        assert res.output["choices"][0]["text"]
    events = never_two_awake(gpu_dir)
    assert [e for _, e in events] == ["start", "sleep", "start"] + ["sleep", "wake"] * 2
    # The wrong order: waking "a" while "b" still holds GPU 0 fails as a real engine
    # would, and nothing is believed awake that is not.
    with pytest.raises(EngineError, match="CUDA out of memory"):
        await h.run("a", [0], [], prompt())
    assert h.residents() == [on0["b"]]
    assert (await h.run("a", [0], [on0["b"]], prompt())).restored


async def test_pre_launched_sleeps_on_every_chunk_and_wakes_only_the_granted(gpu_dir, hosts):
    # parallelism 1 and 2 on two GPUs: chunks [0], [1], [0, 1]. Each 60 GB engine starts
    # awake, so they can only all start because each sleeps before the next.
    spec = ServiceSpec(
        "rm", engine=vllm("--memory-gb", "60"), launch="pre-launched", parallelism=(1, 2)
    )
    h = host(hosts, spec, gpus=2)
    assert sorted(h.instances) == [("rm", 1, 0), ("rm", 1, 1), ("rm", 2, 0)]
    for (_, k, start), inst in h.instances.items():
        assert info(inst)["gpus"] == list(range(start, start + k)) and info(inst)["tp"] == k
        assert await inst.is_sleeping()
    assert h.residents() == []
    res = await h.run("rm", [1], [], prompt())
    assert res.restored and not res.launched and res.url == h.instances[("rm", 1, 1)].url
    assert WAKE <= res.restore_seconds < WAKE + 10  # the wake, measured
    asleep = {key: await inst.is_sleeping() for key, inst in h.instances.items()}
    assert asleep == {("rm", 1, 0): True, ("rm", 1, 1): False, ("rm", 2, 0): True}
    # The tp-2 variant needs GPU 1: the broker evicts the tp-1 one there first.
    res = await h.run("rm", [0, 1], [Resident("rm", 1, "g0", 1)], prompt())
    assert res.restored and res.resident == [Resident("rm", 2, "g0", 0)]
    never_two_awake(gpu_dir)


def test_pre_launched_needs_the_hosts_gpus(hosts):
    spec = ServiceSpec("rm", engine=vllm(), launch="pre-launched", parallelism=(2,))
    with pytest.raises(ValueError, match=r"no chunk of \(2,\) GPUs fits this host's 1"):
        host(hosts, spec, gpus=1)


async def test_on_demand_launches_at_first_use_and_keeps_the_instance_asleep(hosts):
    h = host(hosts, ServiceSpec("rm", engine=vllm()))
    assert h.instances == {}
    first = await h.run("rm", [2, 3], [], prompt())
    assert first.launched and not first.restored and first.restore_seconds == 0.0
    assert first.launch_seconds > 0 and info(h.instances[("rm", 2, 2)])["tp"] == 2
    again = await h.run("rm", [2, 3], [], prompt())
    assert not again.launched and not again.restored  # awake already: nothing to do
    out = await h.run("rm", [2, 3], [Resident("rm", 2, "g0", 2)], prompt())
    # Evicted (put to sleep, not stopped) and woken again by the same call: a wake, the
    # restore the broker's cost model learns, not a second launch.
    assert out.evicted == [Resident("rm", 2, "g0", 2)]
    assert out.restored and not out.launched and out.url == first.url
    assert WAKE <= out.restore_seconds < WAKE + 10


async def test_a_dead_instance_is_reported_and_replaced_at_the_next_call(hosts):
    h = host(hosts, ServiceSpec("rm", engine=vllm()))
    first = await h.run("rm", [0], [], prompt())
    await h.run("rm", [1], [Resident("rm", 1, "g0", 0)], prompt())
    os.kill(info(h.instances[("rm", 1, 0)])["pid"], signal.SIGKILL)  # it dies asleep
    with pytest.raises(EngineError, match=r"POST .*/wake_up: .*exit code -9"):
        await h.run("rm", [0], [], prompt())
    assert ("rm", 1, 0) not in h.instances
    again = await h.run("rm", [0], [], prompt())
    assert again.launched and again.url != first.url


async def test_engine_calls_are_fenced_before_anything_sleeps(hosts):
    signer = GrantSigner(KEY)

    def grant(token: int, units: tuple[int, ...]) -> SignedGrant:
        alloc = {"gpu": Allocation(len(units), "g0", units)}
        return signer.sign(f"l{token}", token, alloc, time.time() + 60)

    h = host(hosts, ServiceSpec("rm", engine=vllm()), pool="gpu", fencing_key=KEY, trusted=False)
    await h.run("rm", [0], [], prompt(), grant(4, (0,)))
    await h.run("rm", [0], [], prompt(), grant(7, (0,)))
    with pytest.raises(StaleLease):
        await h.run("rm", [0], [Resident("rm", 1, "g0", 0)], prompt(), grant(5, (0,)))
    assert not await h.instances[("rm", 1, 0)].is_sleeping()  # the stale call evicted nothing


async def test_bad_engine_payloads_are_refused(hosts):
    h = host(hosts, ServiceSpec("rm", engine=vllm()))
    for payload, msg in (("text", "OpenAI request body"), ({"model": MODEL}, "'messages'")):
        with pytest.raises(EngineError, match=msg):
            await h.run("rm", [0], [], payload)


# ---------------------------------------------------------------- in process
def tiny() -> dict[str, Any]:
    return {"w": np.arange(4.0)}


async def test_the_in_process_backend_and_the_evict_hook(hosts):
    dropped: list[Any] = []
    engine = InProcessEngine(tiny, lambda s, x: float(s["w"].sum()) * x, evict=dropped.append)
    legacy = ServiceSpec("old", tiny, lambda s, x: x, evict=dropped.append)
    h = host(hosts, ServiceSpec("rm", engine=engine), legacy)
    assert (await h.run("rm", [0], [], 2.0)).output == 12.0
    await h.run("old", [0], [Resident("rm", 1, "g0", 0)], None)
    assert len(dropped) == 1 and dropped[0]["w"].tolist() == [0, 1, 2, 3]
    res = await h.run("rm", [0], [Resident("old", 1, "g0", 0)], 1.0)
    assert res.restored and res.output == 6.0 and len(dropped) == 2
    assert res.url == "inprocess://cpu/0" and res.resident == [Resident("rm", 1, "g0", 0)]


def test_a_spec_needs_a_loader_and_run_or_an_engine():
    with pytest.raises(ValueError, match="needs a loader and a run, or an engine"):
        ServiceSpec("x")
    with pytest.raises(ValueError, match="launch must be one of"):
        ServiceSpec("x", engine=vllm(), launch="eager")
