"""The ``k8s-pod`` baseline (paper, coding baseline): one Kubernetes pod per trajectory.

A pod is created when its trajectory starts, with 0.5 CPU requested and a 4 CPU limit.
Pods are placed by *request* (the scheduler never sees use), so busy pods on one node
contend for its cores. Modelled apart from the core: Kubernetes is a different
scheduler, not a policy of this one.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from tangram.sim.engine import ActionRun, Runner
from tangram.sim.trace import ActionSpec
from tangram.spec import Action


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
