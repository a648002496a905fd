"""Executor fencing: work carrying a fencing token older than the newest one an executor
has seen for its units is refused, on the sandbox (per core) and the GPU service host
(per GPU). The end-to-end case through ``client.run`` is in tests/test_ray_broker.py."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tangram.executors import Command, Fence, ServiceHost, ServiceSpec, StaleLease
from tangram.executors.sandbox import SandboxRunner, isolation_problem

CORES = sorted(os.sched_getaffinity(0))


def test_fence_keeps_the_newest_token_per_unit():
    f = Fence()
    f.admit([0, 1], 5)
    f.admit([0, 1], 5)  # the same lease again (run_on): fine
    f.admit([2], 3)  # other units have their own history
    f.admit([1, 2], 7)  # a newer lease took unit 1
    with pytest.raises(StaleLease, match="fencing token 5 is older than token 7") as err:
        f.admit([0, 1], 5)
    assert (err.value.token, err.value.newest) == (5, 7)
    f.admit([0], 6)  # unit 0 alone only saw 5
    f.admit([0], None)  # no lease, no check
    assert f.newest == {0: 6, 1: 7, 2: 7}
    with pytest.raises(TypeError):
        f.admit([0], "9")  # type: ignore[arg-type]


def test_stale_lease_survives_pickling():
    err = pickle.loads(pickle.dumps(StaleLease("stale lease: x", 3, 9)))
    assert isinstance(err, StaleLease) and (str(err), err.token, err.newest) == (
        "stale lease: x",
        3,
        9,
    )


async def test_sandbox_refuses_a_stale_token_and_runs_nothing(tmp_path: Path):
    runner = SandboxRunner(tmp_path / "sb", node="n0", isolate=isolation_problem() is None)
    core = CORES[:1]
    assert (await runner.run("old", Command("true"), core, token=10)).ok
    assert (await runner.run("new", Command("true"), core, token=11)).ok
    with pytest.raises(StaleLease, match=r"token 10 is older than token 11 .* on node n0"):
        await runner.run("old", Command("touch ran.txt"), core, token=10)
    assert not (tmp_path / "sb" / "old" / "ran.txt").exists()
    # Other cores did not see token 11.
    if len(CORES) > 1:
        assert (await runner.run("old", Command("true"), CORES[1:2], token=10)).ok
    assert (await runner.run("new", Command("true"), core, token=11)).ok


async def test_service_host_refuses_a_stale_token_before_evicting():
    host = ServiceHost("g0")
    host.register(ServiceSpec("rm", lambda: {"w": np.ones(4)}, lambda s, x: float(s["w"].sum())))
    res: Any = await host.run("rm", [0], [], None, token=4)
    assert res.output == 4.0 and res.restored
    await host.run("rm", [0, 1], [], None, token=6)
    with pytest.raises(StaleLease, match=r"token 4 is older than token 6 .* GPU node g0"):
        await host.run("rm", [0], ["rm/tp1@g0:0"], None, token=4)
    assert ("rm", 1, 0) in host.resident  # the stale call evicted nothing
