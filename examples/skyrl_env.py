"""SkyRL: a SkyRL-Gym environment whose code runs under Tangram leases.

``CodeEnv`` subclasses ``tangram.integrations.skyrl.TangramTextEnv`` (a SkyRL-Gym
``BaseTextEnv``): each environment instance is one Tangram trajectory, each ``step``
runs the model's code in the trajectory's sandbox on a leased core of a CPU pool, and
``close()`` closes the trajectory on the broker (its sandbox and pinned node are freed at
once). The environment is registered with ``skyrl_gym.register`` and made with
``skyrl_gym.make``, as SkyRL's generator makes its environments, and 16 of them are
stepped from a ``ThreadPoolExecutor`` as the generator steps them.

    pip install 'tangram-broker[skyrl,ray]'
    python examples/skyrl_env.py

A scripted "model" answers each prompt twice: a wrong answer first (reward 0, the
environment asks again), then a right one (reward 1, done).
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray

import tangram.ray as tr
from tangram.executors import Command
from tangram.executors.sandbox import isolation_problem

ENVS = 16
MAX_TURNS = 3

try:
    import skyrl_gym
    from skyrl_gym.envs.base_text_env import BaseTextEnvStepOutput

    from tangram.integrations.skyrl import TangramTextEnv, shared_client
except ImportError as exc:
    sys.exit(f"skyrl-gym is not installed ({exc}): pip install 'tangram-broker[skyrl,ray]'")

# Which cores run a command now, to show that none runs two at once.
_busy: set[tuple[str | None, int]] = set()
_busy_lock = threading.Lock()
_overlaps = 0


class CodeEnv(TangramTextEnv):
    """Asks for the sum 1..n; the answer is Python code that prints it."""

    def __init__(self, env_config: Any = None, extras: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.max_turns = MAX_TURNS
        self.n = int((extras or {}).get("n", 10))

    def init(self, prompt: Any) -> tuple[Any, dict[str, Any]]:
        question = f"Write Python that prints the sum of 1..{self.n}."
        return [*prompt, {"role": "user", "content": question}], {}

    def step(self, action: str) -> BaseTextEnvStepOutput:
        self.turns += 1
        output = self.run_code(action)
        reward = float(output.strip() == str(self.n * (self.n + 1) // 2))
        done = reward == 1.0 or self.turns >= self.max_turns
        reply = output if done else output + "\nNot the expected sum; try again."
        return BaseTextEnvStepOutput(
            observations=[] if done else [{"role": "user", "content": reply}],
            reward=reward,
            done=done,
            metadata={"turn": self.turns},
        )

    def run_code(self, code: str) -> str:
        """The tool: ``code`` run in this trajectory's sandbox on one leased core."""
        global _overlaps
        with self.leased({"cpu": 1}, memory_gb=0.5, timeout=60) as lease:
            alloc = lease.allocation["cpu"]
            cores = {(alloc.node, int(u)) for u in alloc.units}
            with _busy_lock:
                _overlaps += bool(_busy & cores)
                _busy.update(cores)
            try:
                command = Command("{python} answer.py", files={"answer.py": code}, timeout=30)
                result = shared_client().run_on(lease, command)
            finally:
                with _busy_lock:
                    _busy.difference_update(cores)
        return str(result.stdout) if result.exit_code == 0 else f"error: {result.stderr}"


def scripted_model(env: CodeEnv, turn: int) -> str:
    """A wrong answer, then a right one."""
    stop = env.n if turn == 0 else env.n + 1
    return f"print(sum(range({stop})))\n"


def rollout(env: CodeEnv) -> tuple[float, int]:
    """One episode as SkyRL's generator runs it: init, step until done, close."""
    try:
        env.init([{"role": "system", "content": "You write Python."}])
        reward, done, turn = 0.0, False, 0
        while not done:
            out = env.step(scripted_model(env, turn))
            reward, done, turn = out["reward"], out["done"], turn + 1
        return reward, turn
    finally:
        env.close()  # the trajectory is closed on the broker: its sandbox goes


def main() -> int:
    t0 = time.monotonic()
    cores = sorted(os.sched_getaffinity(0))[:4]
    config = {
        "lease_ttl_seconds": 30,
        "pools": {
            "cpu": {"kind": "cpu", "nodes": [{"name": "local", "cores": cores, "memory_gb": 8}]}
        },
    }
    workdir = tempfile.TemporaryDirectory(prefix="tangram-skyrl-")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        isolate = isolation_problem() is None
        tr.start_broker(
            config,
            detached=False,
            data_dir=None,
            sandbox_root=workdir.name,
            sandbox_isolate=isolate,  # without bubblewrap: unisolated (this code is ours)
        )
        skyrl_gym.register(id="tangram-code", entry_point=CodeEnv)
        envs = [
            skyrl_gym.make("tangram-code", env_config={}, extras={"n": 10 + i}) for i in range(ENVS)
        ]
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(rollout, envs))
        snap = shared_client().snapshot()
        shared_client().close()
    finally:
        tr.stop_broker()
        ray.shutdown()
        workdir.cleanup()

    rewards = [r for r, _ in results]
    steps = sum(t for _, t in results)
    print(f"sandbox isolated: {isolate}; {len({e.trajectory for e in envs})} trajectories")
    print(f"steps: {steps} leased, cores held twice at once: {_overlaps}")
    print(
        f"after close(): {snap['pools']['cpu']['trajectories']} trajectories, "
        f"{snap['leases']} leases on the broker"
    )
    print(
        f"skyrl example: {sum(rewards):.0f}/{ENVS} environments solved "
        f"in {time.monotonic() - t0:.1f} s"
    )
    ok = rewards == [1.0] * ENVS and _overlaps == 0 and snap["pools"]["cpu"]["trajectories"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
