"""``tangram.integrations.skyrl.TangramTextEnv``: SkyRL-Gym environments stepped from a
``ThreadPoolExecutor`` (as SkyRL's generator steps them) leasing their tool calls from
the broker actor on one real local Ray cluster shared by the module (as
tests/test_ray_sync.py starts it), through one shared ``SyncClient``."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

pytest.importorskip("skyrl_gym", reason="skyrl-gym is not installed (the `skyrl` extra)")
ray = pytest.importorskip("ray", reason="ray is not installed (the `ray` extra)")

from skyrl_gym.envs.base_text_env import BaseTextEnv, BaseTextEnvStepOutput  # noqa: E402

import tangram.ray as tr  # noqa: E402
from tangram.integrations.skyrl import TangramTextEnv  # noqa: E402

CONFIG: dict[str, Any] = {
    "lease_ttl_seconds": 30,
    "pools": {
        "cpu": {
            "kind": "cpu",
            "nodes": [
                {"name": "a", "cores": 2, "memory_gb": 8},
                {"name": "b", "cores": 2, "memory_gb": 8},
            ],
        },
    },
}
STEPS = 3


@pytest.fixture(scope="module")
def client() -> Iterator[tr.SyncClient]:
    ray.init(num_cpus=2, include_dashboard=False)
    handle = tr.start_broker(CONFIG, detached=False, executors=False, data_dir=None)
    sync = tr.SyncClient(handle)
    yield sync
    sync.close()
    tr.stop_broker()
    ray.shutdown()


class Holders:
    """Which lease holds each (node, core), failing on a unit held twice at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.held: dict[tuple[str | None, Any], str] = {}
        self.peak = 0
        self.count: Counter[str] = Counter()

    def hold(self, lease: Any) -> list[tuple[str | None, Any]]:
        alloc = lease.allocation["cpu"]
        units = [(alloc.node, u) for u in alloc.units]
        with self.lock:
            for unit in units:
                assert unit not in self.held, f"{unit} held by {self.held[unit]} and {lease.id}"
                self.held[unit] = lease.id
            self.peak = max(self.peak, len(self.held))
            self.count["leases"] += 1
        return units

    def unhold(self, lease: Any, units: list[tuple[str | None, Any]]) -> None:
        with self.lock:
            for unit in units:
                assert self.held.pop(unit) == lease.id


class ToolEnv(TangramTextEnv):
    """Three turns, each running a "tool" under a lease of 1 core."""

    holders: Holders

    def __init__(self, env_config: Any = None, extras: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.max_turns = STEPS

    def step(self, action: str) -> BaseTextEnvStepOutput:
        self.turns += 1
        if self.turns % 2:
            ctx = self.leased({"cpu": 1}, memory_gb=0.25, timeout=60.0)
            with ctx as lease:
                out = self._tool(lease, action)
                ctx.report(steps=1)
        else:
            out = self.call(lambda: f"called {action}", {"cpu": 1}, memory_gb=0.25, timeout=60)
        return BaseTextEnvStepOutput(
            observations=[{"role": "user", "content": out}],
            reward=float(self.turns == STEPS),
            done=self.turns >= STEPS,
            metadata={},
        )

    def _tool(self, lease: Any, action: str) -> str:
        units = self.holders.hold(lease)
        threading.Event().wait(0.01)
        self.holders.unhold(lease, units)
        return f"ran {action}"


def test_sixteen_envs_from_a_thread_pool_lease_every_step_and_close(
    client: tr.SyncClient,
) -> None:
    holders = Holders()
    ToolEnv.holders = holders
    ToolEnv.tangram_client = client
    envs = [ToolEnv(None, {}) for _ in range(16)]
    assert all(isinstance(e, BaseTextEnv) for e in envs)
    assert len({e.trajectory for e in envs}) == 16
    rewards: list[float] = []

    def rollout(env: ToolEnv) -> float:
        obs, _ = env.init([{"role": "user", "content": "go"}])
        assert obs
        done, reward = False, 0.0
        while not done:
            out = env.step("act")
            done, reward = out["done"], out["reward"]
        return reward

    with ThreadPoolExecutor(8) as pool:
        rewards = list(pool.map(rollout, envs))
        snap = client.snapshot()
        # Every trajectory is still pinned to its node between actions.
        assert snap["pools"]["cpu"]["trajectories"] == 16
        assert snap["leases"] == 0
        list(pool.map(lambda e: e.close(), envs))

    assert rewards == [1.0] * 16
    assert not holders.held and 1 <= holders.peak <= 4
    assert holders.count["leases"] == 16 * ((STEPS + 1) // 2)
    snap = client.snapshot()
    assert snap["pools"]["cpu"]["trajectories"] == 0
    assert snap["pools"]["cpu"]["in_use"] == 0
    assert snap["leases"] == 0 and snap["queued"] == 0
    assert snap["counts"]["granted"] >= 16 * STEPS


def test_trajectory_is_assignable_and_close_without_leases_is_a_no_op(
    client: tr.SyncClient,
) -> None:
    env = ToolEnv()
    env.trajectory = "traj-7"
    assert env.trajectory == "traj-7"
    env.close()  # no lease taken: nothing to close, no broker call
    env.tangram_client = client
    assert env.call(lambda: 42, {"cpu": 1}, timeout=30.0) == 42
    assert client.snapshot()["pools"]["cpu"]["trajectories"] == 1
    env.close()
    env.close()
    assert client.snapshot()["pools"]["cpu"]["trajectories"] == 0
