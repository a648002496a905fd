"""The ``naive-api`` baseline (paper, DeepSearch baseline): no broker in front of the APIs.

Each trajectory calls the APIs on its own; a call over the provider's limit fails and is
retried up to 3 times, on an error or on a 600 s timeout. The rest (the GPU judge) goes
through the core as under tangram.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tangram.config import QuotaPoolConfig, parse_config
from tangram.core.policy import parse_policy
from tangram.sim.engine import ActionRun, Runner
from tangram.sim.executor import CoreExecutor
from tangram.sim.provider import Provider


@dataclass(frozen=True)
class NaiveApiParams:
    retries: int = 3  # paper: up to 3 retries
    timeout_s: float = 600.0  # paper: a 600 s timeout
    # How a provider answers a call over its limit (assumed; the paper names both errors
    # and timeouts): this share hangs until the client's timeout, the rest gets an error.
    hang_share: float = 0.5
    error_s: float = 1.0  # time to an error response (assumed)
    backoff_s: float = 2.0  # first retry backoff, doubled each time (assumed)


class NaiveApiExecutor:
    """API-only actions call their provider directly; the rest go through the core."""

    def __init__(
        self, config: dict[str, Any], policy: str, params: NaiveApiParams, seed: int, check: bool
    ) -> None:
        cfg = parse_config(config)
        self.p = params
        self.providers = {
            n: Provider.of(p) for n, p in cfg.pools.items() if isinstance(p, QuotaPoolConfig)
        }
        self.inner = CoreExecutor(cfg.build_pools(), parse_policy(policy), check=check)
        self.rng = np.random.default_rng(seed)
        self.failed_calls = 0
        self.runner: Runner | None = None

    def bind(self, runner: Runner) -> None:
        self.runner = runner
        self.inner.bind(runner)

    def start_trajectory(self, traj: int, now: float) -> None:
        self.inner.start_trajectory(traj, now)

    def end_trajectory(self, traj: int, now: float) -> None:
        self.inner.end_trajectory(traj, now)

    def submit(self, run: ActionRun, now: float) -> None:
        if not set(run.spec.demands) <= set(self.providers):
            self.inner.submit(run, now)
            return
        run.started = now
        self._call(run)

    def _call(self, run: ActionRun) -> None:
        assert self.runner is not None
        now = self.runner.now
        provs = [self.providers[p] for p in run.spec.demands]
        taken = []
        for pr in provs:
            if pr.admit(now):
                taken.append(pr)
            else:
                for t in taken:  # an all-or-nothing call: hand back what was taken
                    t.in_flight -= 1
                self._refused(run)
                return
        self.runner.at(now + run.spec.duration, self._answered, (run, taken))

    def _answered(self, arg: tuple[ActionRun, list[Provider]]) -> None:
        run, taken = arg
        for pr in taken:
            pr.done()
        assert self.runner is not None
        now = self.runner.now
        run.exec_s = run.spec.duration
        # Time lost to refusals and retries counts as queueing, as waiting in the broker
        # would under tangram.
        run.started = now - run.spec.duration
        self.runner.finish(run, now)

    def _refused(self, run: ActionRun) -> None:
        assert self.runner is not None
        self.failed_calls += 1
        hang = self.rng.random() < self.p.hang_share
        lost = self.p.timeout_s if hang else self.p.error_s
        if run.retries >= self.p.retries:
            run.failed = True
            run.started = self.runner.now + lost
            self.runner.at(self.runner.now + lost, self._give_up, run)
            return
        wait = lost + self.p.backoff_s * 2**run.retries
        run.retries += 1
        self.runner.at(self.runner.now + wait, self._retry, run)

    def _retry(self, run: ActionRun) -> None:
        """Call again after a refusal (a client that paces its calls waits its turn)."""
        self._call(run)

    def _give_up(self, run: ActionRun) -> None:
        assert self.runner is not None
        self.runner.finish(run, self.runner.now)

    def settle(self, now: float) -> None:
        self.inner.settle(now)

    def stuck_report(self) -> str:
        return self.inner.stuck_report()

    def result(self, now: float) -> dict[str, Any]:
        out = self.inner.result(now)
        for name in self.providers:  # the core never saw these calls
            out["pools"].pop(name, None)
        out["failed_calls"] = self.failed_calls
        # Every refused call went over a provider's limit.
        out["quota_violations"] = self.failed_calls
        return out
