"""A rollout loop that uses Tangram from Ray the way a verl or SkyRL tool does.

A rollout worker (a Ray actor, like verl's agent-loop workers) runs several trajectories
at once. Each turn, the "LLM" generates (a sleep here), then the tool runs the generated
code in the trajectory's sandbox, and at the end a reward action runs the tests. Each
tool call is one Tangram action: it holds exact cores only while it runs, and its
working directory survives between turns.

    python examples/ray_rollout.py            # starts a local Ray cluster and a broker

In a real cluster, ``tangram.ray.start_broker(config)`` runs once and workers only
create ``tangram.ray.Client()``.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import ray

import tangram
import tangram.ray as tr
from tangram.executors import Command

SNIPPET = "def solve(n):\n    return sum(range(n + 1))\n"
TESTS = "from solution import solve\nassert solve(10) == 55\nprint('reward 1.0')\n"


@tangram.action(cpu=1, duration=0.2)
def run_snippet(turn: int) -> Command:
    """The tool call: write the model's code and run it."""
    code = SNIPPET + f"print('turn {turn}:', solve({turn}))\n"
    return Command("{python} solution.py", files={"solution.py": code}, timeout=30)


@tangram.action(cpu=(1, 2), key="cpu", duration=0.5, efficiency={"amdahl": 0.5})
def reward() -> Command:
    """The reward: run the tests against what the trajectory wrote."""
    return Command("{python} check.py", files={"check.py": TESTS}, timeout=30)


@ray.remote(num_cpus=0)
class RolloutWorker:
    def __init__(self) -> None:
        self.client = tr.Client()

    async def trajectory(self, name: str, turns: int, think: float) -> dict[str, Any]:
        failed = actions = 0
        try:
            for turn in range(turns - 1):
                await asyncio.sleep(think)  # the LLM generates; no sandbox is held
                res = await self.client.run(run_snippet(turn), trajectory=name)
                actions += 1
                failed += not res.ok
            res = await self.client.run(reward(), trajectory=name)
            actions += 1
            failed += "reward 1.0" not in res.stdout
        finally:
            await self.client.close_trajectory(name)  # removes its working directory
        return {"actions": actions, "failed": failed}

    async def run(self, trajectories: int, turns: int, think: float) -> dict[str, Any]:
        results = await asyncio.gather(
            *(self.trajectory(f"rollout-{i}", turns, think) for i in range(trajectories))
        )
        return {
            "actions": sum(r["actions"] for r in results),
            "failed": sum(r["failed"] for r in results),
        }


async def rollout(trajectories: int = 4, turns: int = 3, think: float = 0.05) -> dict[str, Any]:
    """Run the rollout on a worker actor against the running broker."""
    worker = RolloutWorker.remote()  # type: ignore[attr-defined]
    try:
        report: dict[str, Any] = await worker.run.remote(trajectories, turns, think)
        return report
    finally:
        ray.kill(worker)


def main() -> None:
    ray.init(num_cpus=2, include_dashboard=False)
    cores = sorted(os.sched_getaffinity(0))
    tr.start_broker(
        {"pools": {"cpu": {"kind": "cpu", "nodes": [{"cores": cores, "memory_gb": 4}]}}},
        detached=False,
    )
    print(asyncio.run(rollout()))
    tr.stop_broker()


if __name__ == "__main__":
    main()
