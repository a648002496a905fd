"""The paper's baselines that are not scheduling policies of the core.

Each is modelled here, apart from the core, with the paper fact it rests on; what the
paper does not say is marked "assumed" and documented in docs/benchmarks.md.

- ``k8s-pod`` (paper, coding baseline): one Kubernetes pod per trajectory, created at
  its start, 0.5 CPU requested and 4 CPU limit. Pods are placed by *request* (the
  scheduler never sees use), so busy pods on one node contend for its cores.
- ``static`` (paper, MOPD baseline: nine teachers served statically on 4 GPUs each):
  every GPU service gets its own GPUs, always resident, no sharing across services. This
  one reuses the core (a pool per service, FCFS at that service's fixed parallelism),
  since it is a different *configuration*, not a different scheduler.
- ``naive-api`` (paper, DeepSearch baseline): each trajectory calls the APIs on its
  own; a call over the provider's limit fails and is retried up to 3 times, on an error
  or on a 600 s timeout; the rest (GPU judge) goes through the core as under tangram.
"""

from __future__ import annotations

import copy
import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from tangram.config import QuotaPoolConfig, parse_config
from tangram.core.policy import parse_policy
from tangram.sim.engine import ActionRun, Runner
from tangram.sim.executor import CoreExecutor
from tangram.sim.provider import Provider
from tangram.sim.trace import ActionSpec, TrajectorySpec
from tangram.spec import Action, Demand

# ----------------------------------------------------------------------------- k8s-pod


@dataclass(frozen=True)
class PodParams:
    request: float = 0.5  # paper: 0.5 CPU requested per pod
    limit: int = 4  # paper: 4 CPU limit per pod
    startup_s: float = 5.0  # assumed: pod creation to ready (the paper names a delay, no value)


class PodExecutor:
    """Pods packed by request; each node shares its cores among running actions max-min
    fairly (CFS with equal shares, every pod requests the same), an action never using
    more than its pod's limit. An action's progress slows in proportion to the cores it
    lost (a linear approximation of CFS throttling)."""

    def __init__(self, pool_cfg: dict[str, Any], params: PodParams) -> None:
        self.p = params
        self.pool = pool_cfg["_name"]
        self.cores: list[int] = []
        self.names: list[str] = []
        for i, n in enumerate(pool_cfg["nodes"]):
            count = int(n.get("count", 1))
            c = n["cores"] if isinstance(n["cores"], int) else len(n["cores"])
            base = n.get("name") or f"{self.pool}{i}"
            for j in range(count):
                self.names.append(base if count == 1 else f"{base}-{j}")
                self.cores.append(int(c))
        self.requested = [0.0] * len(self.cores)
        self.pod_node: dict[int, int] = {}
        self.pod_ready: dict[int, float] = {}
        self.waiting: dict[int, ActionRun] = {}  # traj -> action waiting for its pod
        # Per node: running jobs -> [remaining seconds at full speed, cores wanted, rate]
        self.jobs: list[dict[int, list[float]]] = [{} for _ in self.cores]
        self.last: list[float] = [0.0] * len(self.cores)
        self.demand: list[float] = [0.0] * len(self.cores)
        self.version: list[int] = [0] * len(self.cores)
        self.busy: list[float] = [0.0] * len(self.cores)
        self._runs: dict[int, ActionRun] = {}
        self._id = 0
        self.pending: deque[int] = deque()  # trajectories whose pod fits no node yet
        self.started_at: dict[int, float] = {}
        self.unplaced = 0  # pods that had to wait Pending for a request to free
        self.runner: Runner | None = None

    def bind(self, runner: Runner) -> None:
        self.runner = runner
        for t in runner.trajs:
            for a in t.actions:
                if set(a.demands) != {self.pool}:
                    raise ValueError(
                        f"k8s-pod models one CPU pool ({self.pool}); an action of "
                        f"trajectory {t.id} demands {sorted(a.demands)}"
                    )

    def start_trajectory(self, traj: int, now: float) -> None:
        self.started_at[traj] = now
        self.pending.append(traj)
        self._place(now)

    def _place(self, now: float) -> None:
        """Bind pending pods, oldest first. Kubernetes places by request, never by use;
        packing by request (MostAllocated scoring) fills one node's requests before the
        next (paper: pods are packed by request). A pod that fits no node stays Pending
        until a trajectory ends and frees its request."""
        assert self.runner is not None
        while self.pending:
            traj = self.pending[0]
            node = next(
                (
                    i
                    for i, c in enumerate(self.cores)
                    if self.requested[i] + self.p.request <= c + 1e-9
                ),
                None,
            )
            if node is None:
                return
            self.pending.popleft()
            if now > self.started_at.pop(traj):
                self.unplaced += 1
            self.requested[node] += self.p.request
            self.pod_node[traj] = node
            self.pod_ready[traj] = now + self.p.startup_s
            self.runner.at(now + self.p.startup_s, self._pod_up, traj)

    def _pod_up(self, traj: int) -> None:
        run = self.waiting.pop(traj, None)
        if run is not None:
            assert self.runner is not None
            self._start(run, self.runner.now)

    def end_trajectory(self, traj: int, now: float) -> None:
        node = self.pod_node.pop(traj)
        self.requested[node] -= self.p.request
        self.pod_ready.pop(traj, None)
        self._place(now)

    def submit(self, run: ActionRun, now: float) -> None:
        if self.pod_ready.get(run.traj, math.inf) > now:
            self.waiting[run.traj] = run  # the pod is still starting
        else:
            self._start(run, now)

    def _want(self, spec: ActionSpec) -> tuple[int, float]:
        """(cores the action uses in its pod, its duration on them uncontended)."""
        d = spec.demands[self.pool]
        cores = max(1, min(self.p.limit, d.max))
        if d.min > self.p.limit:
            cores = d.min  # cannot run below its minimum; assumed to get it
        amounts = [a for a in d.amounts() if a <= cores] or [d.min]
        cores = amounts[-1]
        if spec.key is None:
            return cores, spec.duration
        a = Action(
            "x", {self.pool: d}, key=spec.key, duration=spec.duration, efficiency=spec.efficiency
        )
        return cores, a.duration_at(cores) or 0.0

    def _start(self, run: ActionRun, now: float) -> None:
        node = self.pod_node[run.traj]
        cores, dur = self._want(run.spec)
        run.started = now
        run.units = cores
        self._id += 1
        self._runs[self._id] = run
        self._advance(node, now)
        self.jobs[node][self._id] = [dur, float(cores), 1.0]
        self.demand[node] += cores
        run.exec_s = dur  # corrected at the end with the contended time
        self._reshare(node, now)

    def _advance(self, node: int, now: float) -> None:
        dt = now - self.last[node]
        if dt > 0:
            used = 0.0
            for job in self.jobs[node].values():
                job[0] -= job[2] * dt
                used += job[1] * job[2]
            self.busy[node] += min(used, self.cores[node]) * dt
        self.last[node] = now

    def _reshare(self, node: int, now: float) -> None:
        jobs = self.jobs[node]
        cap = self.cores[node]
        self.version[node] += 1
        v = self.version[node]
        if self.demand[node] <= cap:
            for job in jobs.values():
                job[2] = 1.0
        else:
            # Max-min fair water level over the jobs' wanted cores.
            wants = sorted(j[1] for j in jobs.values())
            left, n, level = float(cap), len(wants), 0.0
            for i, w in enumerate(wants):
                share = left / (n - i)
                if w <= share:
                    left -= w
                else:
                    level = share
                    break
            for job in jobs.values():
                job[2] = 1.0 if job[1] <= level or level == 0.0 else level / job[1]
        assert self.runner is not None
        # One event per node: the next job to finish; stale ones are skipped by version.
        soonest = min((j[0] / j[2] for j in jobs.values()), default=None)
        if soonest is not None:
            self.runner.at(now + max(soonest, 0.0), self._tick, (node, v))

    def _tick(self, arg: tuple[int, int]) -> None:
        node, v = arg
        if v != self.version[node]:
            return
        assert self.runner is not None
        now = self.runner.now
        self._advance(node, now)
        done = [jid for jid, j in self.jobs[node].items() if j[0] <= 1e-9]
        for jid in done:
            job = self.jobs[node].pop(jid)
            self.demand[node] -= job[1]
            run = self._runs.pop(jid)
            run.exec_s = now - run.started
            self.runner.finish(run, now)
        self._reshare(node, now)

    def settle(self, now: float) -> None:
        pass

    def stuck_report(self) -> str:
        return f"{len(self.waiting)} actions wait for their pods, {len(self.pending)} pods Pending"

    def result(self, now: float) -> dict[str, Any]:
        for i in range(len(self.cores)):
            self._advance(i, now)
        cap = sum(self.cores)
        busy = sum(self.busy)
        idle = cap * now - busy
        return {
            "pools": {
                self.pool: {
                    "capacity": cap,
                    "busy_unit_s": busy,
                    "idle_unit_s": idle,
                    "utilization": busy / (cap * now) if now > 0 else None,
                }
            },
            "restores": 0,
            "pods_pending": self.unplaced,
        }


# ----------------------------------------------------------------------------- static


@dataclass(frozen=True)
class StaticParams:
    gpus_per_service: int = 4  # paper: nine teachers served statically, 4 GPUs each


def static_setup(
    config: dict[str, Any], trajs: list[TrajectorySpec], params: StaticParams
) -> tuple[dict[str, Any], list[TrajectorySpec]]:
    """Give every GPU service its own pool of ``gpus_per_service`` GPUs (one replica at
    that tensor parallelism, always resident: restore 0) and pin every GPU action to its
    service's pool at that parallelism. Other pools are left as they are."""
    cfg = copy.deepcopy(config)
    k = params.gpus_per_service
    moved: dict[tuple[str, str], str] = {}
    for name, pool in list(cfg["pools"].items()):
        if pool.get("kind") != "gpu":
            continue
        mem = min(float(n.get("memory_gb", 80.0)) for n in pool["nodes"])
        del cfg["pools"][name]
        for svc, sc in pool.get("services", {}).items():
            new = f"{name}/{svc}"
            cfg["pools"][new] = {
                "kind": "gpu",
                "nodes": [{"name": svc, "gpus": k, "memory_gb": mem}],
                "services": {svc: {**sc, "restore_seconds": 0.0, "parallelism": [k]}},
            }
            moved[(name, svc)] = new
    out = []
    for t in trajs:
        nt = TrajectorySpec(t.id, t.task, t.step, t.memory_gb)
        for a in t.actions:
            gpu = [p for p in a.demands if (p, a.service or "") in moved]
            if not gpu:
                nt.actions.append(a)
                continue
            (pool,) = gpu
            act = Action(
                "x",
                {pool: a.demands[pool]},
                key=a.key,
                duration=a.duration,
                efficiency=a.efficiency,
            )
            demands = {p: d for p, d in a.demands.items() if p != pool}
            demands[moved[(pool, a.service or "")]] = Demand.fixed(k)
            nt.actions.append(
                ActionSpec(
                    gap=a.gap,
                    demands=demands,
                    duration=(act.duration_at(k) or 0.0) if a.key == pool else a.duration,
                    service=a.service,
                    tokens=a.tokens,
                    kind=a.kind,
                )
            )
        out.append(nt)
    return cfg, out


# ----------------------------------------------------------------------------- naive-api


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
        self.runner.at(self.runner.now + wait, self._call, run)

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
