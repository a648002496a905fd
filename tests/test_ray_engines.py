"""Engine services end to end on a real local Ray cluster: the broker actor grants GPU
chunks and evictions, the service executor actor puts evicted engine instances to sleep
and wakes (or launches) the granted one, and ``client.run`` gets the engine's answer.

The engines are the emulator (``python -m tangram.testing.engine``) launched through
``VllmEngine``: the test machines have no GPU and no model weights. With
``TANGRAM_EMULATOR_GPU_DIR`` the emulators account "GPU memory" per GPU id, so two
services awake on one GPU at once would fail with out-of-memory."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import ray

import tangram.ray as tr
from tangram.executors import ServiceCall, ServiceSpec, VllmEngine
from tangram.spec import Action
from tangram.testing.engine import GPU_DIR_ENV

# One GPU of 80 (emulated) GB; each service's engine holds 60 GB awake: they take turns.
CONFIG: dict[str, Any] = {
    "lease_ttl_seconds": 30,
    "pools": {
        "gpu": {
            "kind": "gpu",
            "nodes": [{"name": "g0", "gpus": 1, "memory_gb": 80}],
            "services": {
                "judge": {"memory_gb": 60, "restore_seconds": 0.5},
                "rm": {"memory_gb": 60, "restore_seconds": 0.5},
                # Small enough to stay beside either (its emulator accounts no memory);
                # four calls at once on one instance (request slots).
                "grader": {"memory_gb": 10, "restore_seconds": 0.5, "max_concurrency": 4},
            },
        }
    },
}


def engine(model: str) -> VllmEngine:
    command = [
        sys.executable, "-m", "tangram.testing.engine", "--port", "{port}", "--host", "{host}",
        "--model", "{model}", "--tensor-parallel-size", "{tp}", "--memory-gb", "60",
        "--wake-delay", "0.1",
    ]  # fmt: skip
    return VllmEngine(model=model, command=command, startup_timeout=60)


def _emulators() -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                cmd = Path(entry.path, "cmdline").read_bytes()
            except OSError:
                continue
            # (each engine's guard, engine_guard.py, carries the same words: not counted)
            ours = b"tangram.testing.engine" in cmd and b"--memory-gb" in cmd
            if ours and b"engine_guard" not in cmd:
                found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    gpus = tmp_path_factory.mktemp("gpus")
    ray.init(
        num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {GPU_DIR_ENV: str(gpus)}}
    )
    grader = [
        sys.executable, "-m", "tangram.testing.engine", "--port", "{port}", "--host", "{host}",
        "--model", "{model}", "--tensor-parallel-size", "{tp}", "--latency", "1.0",
    ]  # fmt: skip
    services = [
        ServiceSpec("judge", engine=engine("judge-model")),
        ServiceSpec("rm", engine=engine("rm-model")),
        # Pre-launched: asleep on the node's one GPU from the start.
        ServiceSpec(
            "grader", engine=VllmEngine(model="grader", command=grader), launch="pre-launched"
        ),
    ]
    tr.start_broker(CONFIG, name="eng", detached=False, services=services, data_dir=None)
    yield gpus
    tr.stop_broker("eng")
    ray.shutdown()


@pytest_asyncio.fixture
async def client(cluster: Path) -> AsyncIterator[tr.Client]:
    c = tr.Client(name="eng")
    yield c
    await c.aclose()


async def test_services_take_turns_on_one_gpu(client: tr.Client, cluster: Path):
    answers = []
    for i, service in enumerate(["judge", "rm", "judge", "rm"]):
        action = Action.build(f"t{i}", {"gpu": 1}, service=service)
        payload = {"model": f"{service}-model", "prompt": "score this", "max_tokens": 4}
        res = await client.run(action, ServiceCall(payload))
        answers.append((service, res))
    # Each call was served by its own model's engine, on GPU 0 (the emulator says so).
    for service, res in answers:
        assert res.output["model"] == f"{service}-model", res.output
        assert res.output["usage"]["completion_tokens"] > 0
    # First use launches; later uses wake the sleeping instance (a restore, measured),
    # after the other service's instance was put to sleep: with 60 + 60 GB on one
    # 80 GB GPU a wake before that sleep fails with out-of-memory.
    assert [r.launched for _, r in answers] == [True, True, False, False]
    assert all(r.restored and r.restore_seconds >= 0.1 for _, r in answers[2:])
    assert all(r.evicted for _, r in answers[1:])
    snap = await client.snapshot()
    assert snap["pools"]["gpu"]["in_use"] == 0


async def test_calls_share_one_instance_through_its_request_slots(client: tr.Client):
    """A pre-launched service with four request slots: its first call wakes the
    sleeping instance; then four calls at once share it (the first lease opens the
    instance, three join with its epoch), the executor's fence admits all four, and the
    engine serves them together (it takes 1 s per answer)."""
    payload = {"model": "grader", "prompt": "grade this", "max_tokens": 2}
    first = await client.run(Action.build("g0", {"gpu": 1}, service="grader"), ServiceCall(payload))
    # The pre-launched instance was asleep: the first call wakes it, launches nothing.
    assert first.restored and not first.launched
    results = await asyncio.gather(
        *(
            client.run(Action.build(f"g{i}", {"gpu": 1}, service="grader"), ServiceCall(payload))
            for i in range(1, 5)
        )
    )
    assert {r.url for r in results} == {first.url}
    assert not any(r.launched or r.restored for r in results)
    stats = httpx.get(first.url + "/stats").json()
    assert stats["max_in_flight"] == 4  # all four at once on the one engine
    snap = await client.snapshot()
    assert snap["pools"]["gpu"]["in_use"] == 0


async def test_stopping_the_broker_stops_the_engines(cluster: Path):
    """Engine processes run in sessions of their own and would outlive the killed
    executor actor, holding their GPUs; stop_broker has the actor stop them first."""
    client = tr.Client(name="eng")
    try:
        for i, service in enumerate(["judge", "rm"]):  # both launched (or woken)
            action = Action.build(f"s{i}", {"gpu": 1}, service=service)
            payload = {"model": f"{service}-model", "prompt": "hi", "max_tokens": 2}
            await client.run(action, ServiceCall(payload))
    finally:
        await client.aclose()
    assert len(_emulators()) == 2  # one instance per service, asleep or awake
    tr.stop_broker("eng")
    assert _emulators() == []
