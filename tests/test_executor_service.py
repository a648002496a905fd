"""The GPU service executor on its own, with the CPU as the device and a numpy model."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tangram.executors.service import ServiceError, ServiceHost, ServiceSpec, to_device
from tangram.spec import Resident

RM = Resident("rm", 1, "g0", 0)
JUDGE = Resident("judge", 1, "g0", 0)


def tiny_model() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {"w": rng.standard_normal((64, 8)), "b": np.ones(8), "labels": ["a"] * 8}


def score(state: dict[str, Any], x: list[float]) -> float:
    return float((np.asarray(x) @ state["w"] + state["b"]).sum())


@pytest.fixture
def host() -> ServiceHost:
    h = ServiceHost("g0", trusted=True)  # fencing: tests/test_executor_fencing.py
    h.register(ServiceSpec("rm", tiny_model, score))
    h.register(ServiceSpec("judge", tiny_model, lambda s, x: len(x)))
    return h


async def test_restore_run_then_warm(host: ServiceHost):
    x = [0.5] * 64
    expect = score(tiny_model(), x)
    first = await host.run("rm", [0], [], x)
    assert first.restored and first.restore_seconds > 0
    assert first.output == pytest.approx(expect)
    assert first.device == "cpu" and first.resident == [RM]
    again = await host.run("rm", [0], [], x)
    assert not again.restored and again.restore_seconds == 0.0


async def test_the_device_copy_is_not_the_host_copy(host: ServiceHost):
    await host.run("rm", [0], [], [0.0] * 64)
    on_device = host.resident[("rm", 1, 0)]
    assert on_device["w"] is not host.host["rm"]["w"]
    assert np.array_equal(on_device["w"], host.host["rm"]["w"])
    assert on_device["labels"] == host.host["rm"]["labels"]


async def test_eviction_drops_the_copy_and_the_next_call_restores(host: ServiceHost):
    await host.run("rm", [0], [], [0.0] * 64)
    res = await host.run("judge", [0], [RM], [1, 2])
    assert res.evicted == [RM] and res.resident == [JUDGE]
    assert (await host.run("rm", [0], [], [0.0] * 64)).restored


async def test_chunks_hold_their_own_copies(host: ServiceHost):
    await host.run("rm", [0], [], [0.0] * 64)
    res = await host.run("rm", [1], [], [0.0] * 64)
    assert res.restored  # resident on GPU 0 says nothing about GPU 1
    assert (await host.run("rm", [0, 1], [], [0.0] * 64)).restored  # tp2 is its own variant


async def test_bad_calls_are_refused(host: ServiceHost):
    with pytest.raises(ServiceError, match="not registered here; registered: judge, rm"):
        await host.run("nope", [0], [], None)
    with pytest.raises(ServiceError, match="no GPUs granted"):
        await host.run("rm", [], [], None)
    with pytest.raises(ServiceError, match="cannot read eviction"):
        await host.run("rm", [0], ["garbage"], None)
    with pytest.raises(ServiceError, match="device kind"):
        ServiceHost("g", "tpu")


def test_to_device_uses_dot_to_and_refuses_numpy_on_gpus():
    class Tensor:
        def to(self, device: str) -> str:
            return f"on {device}"

    assert to_device({"t": Tensor(), "n": (1, 2)}, "cuda:3") == {"t": "on cuda:3", "n": (1, 2)}
    with pytest.raises(ServiceError, match="numpy"):
        to_device(np.zeros(2), "cuda:0")
    assert ServiceHost("g", "cuda", trusted=True).device([2, 3]) == "cuda:2"
