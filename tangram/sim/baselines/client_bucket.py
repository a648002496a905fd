"""The ``client-bucket`` baseline: ``naive-api`` with a rate limiter in every rollout
worker, the usual fix short of a broker.

Each trajectory (one rollout worker) paces its own calls to an API with a limiter sized
to its *share* of the API's limits, share = limit / workers, where workers is the
number of trajectories of the step (all start together; ``workers=N`` fixes it). The
share is static, as a worker configured at the start of a step has no view of the
others: when most trajectories are generating or done, the few that call still get
only their share, and the quota goes unused. Calls the provider refuses all the same
(the shares of a concurrency limit, and a burst of first calls) fail and are retried as
under ``naive-api``; a retry waits for the limiter too.

The limiter per worker and API (assumed: what a careful client does with each kind of
limit; the paper does not describe such a client):

- a window (L calls per W seconds): calls paced W * workers / L apart, so the worker
  never makes more than its share L / workers of calls in any window of W seconds
  (when that share is a whole number; a fraction rounds up);
- a request rate (R per second, burst B): a token bucket of rate R / workers and burst
  max(1, floor(B / workers));
- a concurrency limit (C in flight): not split, since a worker has one call in flight
  at most; when C < workers, more than C workers can call at once and be refused.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

from tangram.sim.baselines.naive_api import NaiveApiExecutor, NaiveApiParams
from tangram.sim.engine import ActionRun, Runner
from tangram.sim.provider import Provider


@dataclass(frozen=True)
class ClientBucketParams(NaiveApiParams):
    # Workers the API's limits are split among; 0: the trajectories of the step.
    workers: int = 0


def bucket_params(name: str) -> ClientBucketParams:
    """``client-bucket`` or ``client-bucket:OPT,...`` with OPT ``hang=F`` (the share of
    refused calls that hang until the timeout, in [0, 1], as for naive-api) or
    ``workers=N`` (split the limits N ways instead of among the step's trajectories)."""
    arg = name.partition(":")[2]
    p = ClientBucketParams()
    if not arg:
        return p
    usage = (
        f"policy {name!r}: write client-bucket or client-bucket:OPT,... with OPT hang=F "
        "(F in [0, 1]) or workers=N (N >= 1)"
    )
    for opt in arg.split(","):
        key, _, val = opt.partition("=")
        try:
            if key == "hang":
                share = float(val)
                if not 0.0 <= share <= 1.0:
                    raise ValueError
                p = replace(p, hang_share=share)
            elif key == "workers":
                n = int(val)
                if n < 1:
                    raise ValueError
                p = replace(p, workers=n)
            else:
                raise ValueError
        except ValueError:
            raise ValueError(usage) from None
    return p


@dataclass(slots=True)
class _Rule:
    """One pacing rule as a GCRA: a call may go at ``tat - tolerance`` at the earliest,
    and each call pushes ``tat`` on by ``interval``."""

    interval: float
    tolerance: float
    tat: float = -math.inf


def worker_rules(prov: Provider, workers: int) -> list[tuple[float, float]]:
    """(interval, tolerance) of each pacing rule of one worker's share of ``prov``."""
    rules = []
    if prov.window is not None:
        limit, secs = prov.window
        rules.append((secs * workers / limit, 0.0))
    if prov.rate is not None:
        per_s, burst = prov.rate
        interval = workers / per_s
        rules.append((interval, (max(1, math.floor(burst / workers)) - 1) * interval))
    return rules


class ClientBucketExecutor(NaiveApiExecutor):
    """Calls to the APIs paced by each trajectory's own limiter, then as naive-api."""

    def __init__(
        self,
        config: dict[str, Any],
        policy: str,
        params: ClientBucketParams,
        seed: int,
        check: bool,
    ) -> None:
        super().__init__(config, policy, params, seed, check)
        self.workers = params.workers
        self._step_size: Counter[int] = Counter()
        self._rules: dict[tuple[int, str], list[_Rule]] = {}
        self.paced_s = 0.0  # total time calls waited for their worker's limiter
        self.calls: Counter[str] = Counter()  # calls the providers admitted, per API

    def bind(self, runner: Runner) -> None:
        super().bind(runner)
        self._step_size = Counter(t.step for t in runner.trajs)

    def end_trajectory(self, traj: int, now: float) -> None:
        for name in self.providers:
            self._rules.pop((traj, name), None)
        super().end_trajectory(traj, now)

    def _rules_of(self, traj: int, api: str) -> list[_Rule]:
        rules = self._rules.get((traj, api))
        if rules is None:
            assert self.runner is not None
            n = self.workers or self._step_size[self.runner.trajs[traj].step]
            rules = [_Rule(i, t) for i, t in worker_rules(self.providers[api], n)]
            self._rules[(traj, api)] = rules
        return rules

    def submit(self, run: ActionRun, now: float) -> None:
        if not set(run.spec.demands) <= set(self.providers):
            self.inner.submit(run, now)
            return
        run.started = now
        self._retry(run)

    def _retry(self, run: ActionRun) -> None:
        """Wait for a token of every API the call needs, take them, then call."""
        assert self.runner is not None
        now = self.runner.now
        rules = [r for api in run.spec.demands for r in self._rules_of(run.traj, api)]
        slot = max([now, *(r.tat - r.tolerance for r in rules)])
        for r in rules:
            r.tat = max(r.tat, slot) + r.interval
        if slot > now:
            self.paced_s += slot - now
            self.runner.at(slot, self._call, run)
        else:
            self._call(run)

    def _answered(self, arg: tuple[ActionRun, list[Provider]]) -> None:
        run, _ = arg
        for api in run.spec.demands:
            self.calls[api] += 1
        super()._answered(arg)

    def result(self, now: float) -> dict[str, Any]:
        out = super().result(now)
        use = {}
        for name, prov in self.providers.items():
            entry: dict[str, float] = {"calls": self.calls[name]}
            if prov.window is not None and now > 0:
                limit, secs = prov.window
                # The share of the window quota the run used: calls / (limit per second
                # times the run's length).
                entry["window_use"] = self.calls[name] / (limit / secs * now)
            use[name] = entry
        out["api_use"] = use
        out["client_paced_s"] = self.paced_s
        return out
