"""The ``k8s-pod`` baseline (paper, coding baseline): one Kubernetes pod per trajectory.

A pod is created when its trajectory starts, with 0.5 CPU requested and a 4 CPU limit
(paper). What Kubernetes adds, each figure with its source in ``PodParams``:

- **Placement** by the default kube-scheduler's scoring (``spread``, the default): among
  the nodes whose free *requests* fit the pod (NodeResourcesFit's filter), the highest
  sum of NodeResourcesFit's LeastAllocated score and NodeResourcesBalancedAllocation's
  score, weight 1 each, over CPU and memory (``node_scores``). ``k8s-pod:pack`` keeps
  the earlier model: first fit by request, filling one node before the next (what
  MostAllocated scoring does with identical pods).
- **Start-up**: a pod is ready ``startup_s`` after it is bound, and pods become ready
  at most ``startup_rate`` per second cluster-wide (a token bucket of ``startup_burst``).
- **Exec**: every action pays ``exec_s`` before it runs (the exec path into the pod).
- **CPU**: an action uses min(its demand's max, the pod's limit) cores, at its own
  efficiency curve; a node's cores are shared max-min fairly among its running actions
  (CFS with equal shares: every pod requests the same), and an action on a share ``s``
  of its ``c`` wanted cores progresses at ``speed(s) / speed(c)`` of its own curve.

The scheduler sees requests, never use, so busy pods on one node contend for its cores.
Modelled apart from the core: Kubernetes is a different scheduler, not a policy of
this one.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, fields, replace
from typing import Any

from tangram.sim.engine import ActionRun, Runner
from tangram.sim.trace import ActionSpec
from tangram.spec import Action, Amdahl, Efficiency

# kube-scheduler constants (kubernetes/kubernetes, pkg/scheduler/framework/interface.go
# MaxNodeScore; pkg/scheduler/util/pod_resources.go, the "non-zero" requests counted for a
# container that requests nothing).
MAX_NODE_SCORE = 100
NONZERO_MILLI_CPU = 100
NONZERO_MEMORY = 200 * 1024 * 1024
GIB = 1024**3


@dataclass(frozen=True)
class PodParams:
    request: float = 0.5  # paper: 0.5 CPU requested per pod
    limit: int = 4  # paper: 4 CPU limit per pod
    # Pod creation to ready, for a stateless pod whose image is already on the node: the
    # Kubernetes pod start-up latency SLO, "99th percentile per cluster-day <= 5s"
    # (kubernetes/community, sig-scalability/slos/pod_startup_latency.md). Taken whole
    # for every pod: the SLO bounds the tail, the paper names a delay without a value.
    startup_s: float = 5.0
    # Pods becoming ready cluster-wide, per second: the pod creation throughput the
    # Kubernetes density test assumes, DENSITY_TEST_THROUGHPUT default 20
    # (kubernetes/perf-tests, clusterloader2/testing/density/README.md). 0: unlimited.
    startup_rate: float = 20.0
    # Pods the start-up bucket lets through at once (1: evenly spaced, 1/rate apart, as
    # that test creates its pods at a fixed rate).
    startup_burst: int = 1
    # Every action executed in a pod pays this before it runs. Measured on this machine
    # (2026-12-01): the median spawn of `true` in a bubblewrap sandbox with the
    # arguments of tangram's own sandbox executor (new pid, ipc, uts, net, mount
    # namespaces), 5.8 ms (p90 7.4 ms; a plain spawn: 0.6 ms). A lower bound for a
    # `kubectl exec`: that adds the API server and kubelet streaming round trips and the
    # OCI runtime's exec, which could not be run here (no container images).
    exec_s: float = 0.006
    # "spread": the default kube-scheduler's scoring; "pack": first fit by request.
    placement: str = "spread"


_OPTIONS = {
    "exec": "exec_s",
    "startup": "startup_s",
    "startup_rate": "startup_rate",
    "startup_burst": "startup_burst",
    "limit": "limit",
    "request": "request",
}


def pod_params(name: str) -> PodParams:
    """``k8s-pod`` or ``k8s-pod:OPT,OPT...``. Options: ``pack`` or ``spread``
    (placement), ``exec=S`` (seconds per exec), ``startup=S`` (seconds from bound to
    ready), ``startup_rate=R`` (pods ready per second cluster-wide, 0: unlimited),
    ``startup_burst=B``, ``limit=N`` (CPU limit), ``request=C`` (CPU request)."""
    arg = name.partition(":")[2]
    p = PodParams()
    if not arg:
        return p
    usage = (
        f"policy {name!r}: write k8s-pod or k8s-pod:OPT,... with OPT one of pack, spread, "
        "exec=S, startup=S, startup_rate=R, startup_burst=B, limit=N, request=C"
    )
    kinds = {f.name: f.type for f in fields(PodParams)}
    for opt in arg.split(","):
        if opt in ("pack", "spread"):
            p = replace(p, placement=opt)
            continue
        key, eq, val = opt.partition("=")
        attr = _OPTIONS.get(key)
        if attr is None or not eq:
            raise ValueError(usage)
        try:
            num: float = int(val) if kinds[attr] == "int" else float(val)
        except ValueError:
            raise ValueError(usage) from None
        if not math.isfinite(num) or num < 0 or (attr in ("limit", "startup_burst") and num < 1):
            raise ValueError(f"{usage}; {key} must be a finite number >= 0 (limit, burst >= 1)")
        if attr == "request" and num <= 0:
            raise ValueError(f"{usage}; request must be > 0")
        change: dict[str, Any] = {attr: num}
        p = replace(p, **change)
    return p


# --------------------------------------------------------------------------- scoring


def least_allocated(requested: int, allocatable: int) -> int:
    """NodeResourcesFit, LeastAllocated strategy, one resource: the unrequested share of
    the node on 0-100, integer arithmetic (kubernetes/kubernetes, pkg/scheduler/framework/
    plugins/noderesources/least_allocated.go, leastRequestedScore). ``requested``
    includes the pod being placed."""
    if allocatable == 0 or requested > allocatable:
        return 0
    return (allocatable - requested) * MAX_NODE_SCORE // allocatable


def balanced_allocation(fractions: list[float]) -> int:
    """NodeResourcesBalancedAllocation: 100 times one minus the standard deviation of the
    requested fractions (each capped at 1); for two resources the deviation is half
    their difference (kubernetes/kubernetes, pkg/scheduler/framework/plugins/
    noderesources/balanced_allocation.go, balancedResourceScorer)."""
    if len(fractions) == 2:
        std = abs(fractions[0] - fractions[1]) / 2
    elif len(fractions) > 2:
        mean = sum(fractions) / len(fractions)
        std = math.sqrt(sum((f - mean) ** 2 for f in fractions) / len(fractions))
    else:
        std = 0.0
    return int((1 - std) * MAX_NODE_SCORE)


def node_scores(
    pod_cpu_m: int,
    pod_mem: int,
    requested: list[tuple[int, int]],
    allocatable: list[tuple[int, int]],
) -> list[int | None]:
    """The default kube-scheduler's resource score of every node for a pod requesting
    ``pod_cpu_m`` millicores and ``pod_mem`` bytes; None where the pod does not fit.

    ``requested``: per node (millicores, bytes) already requested by its pods;
    ``allocatable``: per node (millicores, bytes). Filter: NodeResourcesFit (the
    pod's request must fit what the node's pods have not requested). Score:
    NodeResourcesFit with its default LeastAllocated strategy over cpu and memory, weight
    1 each, plus NodeResourcesBalancedAllocation over cpu and memory, each plugin at
    weight 1 in the default profile (kubernetes/kubernetes, pkg/scheduler/apis/config/v1/
    defaults.go defaultResourceSpec and SetDefaults_NodeResourcesFitArgs;
    default_plugins.go). LeastAllocated counts a container that requests nothing as
    100m CPU and 200 MiB (the "non-zero" request); BalancedAllocation counts what is
    requested. The other default score plugins (taints, affinities, topology spread,
    image locality) give every node the same score for these pods: no taints,
    affinities or owning controllers, one image everywhere."""
    nz_cpu = pod_cpu_m or NONZERO_MILLI_CPU
    nz_mem = pod_mem or NONZERO_MEMORY
    out: list[int | None] = []
    for (rc, rm), (ac, am) in zip(requested, allocatable, strict=True):
        if rc + pod_cpu_m > ac or rm + pod_mem > am:
            out.append(None)
            continue
        # LeastAllocated: (sum of weight * score) // (sum of weights), resources the node
        # does not have (allocatable 0) left out.
        parts = [least_allocated(r, a) for r, a in ((rc + nz_cpu, ac), (rm + nz_mem, am)) if a]
        fit = sum(parts) // len(parts) if parts else 0
        fracs = [min(1.0, r / a) for r, a in ((rc + pod_cpu_m, ac), (rm + pod_mem, am)) if a]
        out.append(fit + balanced_allocation(fracs))
    return out


def pick_node(scores: list[int | None]) -> int | None:
    """The highest-scoring node; ties go to the first in configuration order
    (kube-scheduler picks one of the tied nodes at random: the simulator stays
    deterministic instead)."""
    best: int | None = None
    top = -1
    for i, s in enumerate(scores):
        if s is not None and s > top:
            best, top = i, s
    return best


# --------------------------------------------------------------------------- speed


def speed(eff: Efficiency | None, cores: float) -> float:
    """An action's speed-up on ``cores`` (a real number: a CFS share) by its own
    efficiency curve. Below one core every thread is time-sliced, so the speed is the
    share times the speed on one core. Amdahl's law takes a real amount as it is (its
    serial part gets a whole core, the parallel part the share); a measured table is
    interpolated linearly between the whole amounts on either side. Without a curve,
    speed is proportional to cores (the action uses all it asked for)."""
    if eff is None:
        return cores
    if cores < 1.0:
        return cores * eff.speedup(1)
    if isinstance(eff, Amdahl):
        p = eff.parallel_fraction
        return 1.0 / ((1.0 - p) + p / cores)
    lo = math.floor(cores)
    s_lo = eff.speedup(lo)
    if cores == lo:
        return s_lo
    return s_lo + (cores - lo) * (eff.speedup(lo + 1) - s_lo)


@dataclass(slots=True)
class _Job:
    run: ActionRun
    left: float  # seconds of work left at full speed (on all ``want`` cores)
    want: int  # cores the action uses uncontended
    eff: Efficiency | None
    began: float
    share: float = 0.0  # cores it gets now
    rate: float = 1.0  # its speed now over its uncontended speed


class PodExecutor:
    """Pods placed by request, started at a bounded rate; each node shares its cores
    among running actions max-min fairly, an action never using more than its pod's
    limit, each slowed by its own efficiency curve when it gets fewer cores."""

    def __init__(self, pool_cfg: dict[str, Any], params: PodParams) -> None:
        self.p = params
        self.pool = pool_cfg["_name"]
        self.cores: list[int] = []
        self.names: list[str] = []
        self.memory: list[int] = []  # bytes per node
        for i, n in enumerate(pool_cfg["nodes"]):
            count = int(n.get("count", 1))
            c = n["cores"] if isinstance(n["cores"], int) else len(n["cores"])
            base = n.get("name") or f"{self.pool}{i}"
            for j in range(count):
                self.names.append(base if count == 1 else f"{base}-{j}")
                self.cores.append(int(c))
                self.memory.append(int(float(n.get("memory_gb", 0.0)) * GIB))
        self.pod_cpu_m = round(params.request * 1000)
        self.requested = [0.0] * len(self.cores)  # CPU requested per node (cores)
        self.req_m = [0] * len(self.cores)  # the same in millicores (the scheduler's unit)
        self.req_mem = [0] * len(self.cores)  # memory requested per node (bytes)
        self.pod_node: dict[int, int] = {}
        self.pod_mem: dict[int, int] = {}
        self.pod_ready: dict[int, float] = {}
        self.waiting: dict[int, ActionRun] = {}  # traj -> action waiting for its pod
        self.jobs: list[dict[int, _Job]] = [{} for _ in self.cores]
        self.last: list[float] = [0.0] * len(self.cores)
        self.demand: list[float] = [0.0] * len(self.cores)
        self.version: list[int] = [0] * len(self.cores)
        self.busy: list[float] = [0.0] * len(self.cores)
        self._id = 0
        self.pending: deque[int] = deque()  # trajectories whose pod fits no node yet
        self.started_at: dict[int, float] = {}
        self.unplaced = 0  # pods that had to wait Pending for a request to free
        self.pods_per_node: list[int] = [0] * len(self.cores)
        self.placed: list[tuple[int, int]] = []  # (trajectory, node) of every binding
        self.max_pods_per_node = 0
        # Start-up throughput as a GCRA (a token bucket on one number): the next
        # pod may become ready at ``_tat - _tolerance`` at the earliest.
        self._tat = -math.inf
        self.startup_wait_s = 0.0  # total time pods waited for the start-up rate
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

    # ---- placement and start-up ---------------------------------------------------------
    def _node_for(self, mem: int) -> int | None:
        if self.p.placement == "pack":
            # First fit by request: one node's requests fill before the next.
            return next(
                (
                    i
                    for i, c in enumerate(self.cores)
                    if self.requested[i] + self.p.request <= c + 1e-9
                    and self.req_mem[i] + mem <= self.memory[i]
                ),
                None,
            )
        scores = node_scores(
            self.pod_cpu_m,
            mem,
            list(zip(self.req_m, self.req_mem, strict=True)),
            [(c * 1000, m) for c, m in zip(self.cores, self.memory, strict=True)],
        )
        return pick_node(scores)

    def _startup_slot(self, now: float) -> float:
        """When a pod bound at ``now`` may start its start-up: the rate limit's slot."""
        rate = self.p.startup_rate
        if rate <= 0:
            return now
        interval = 1.0 / rate
        tolerance = (self.p.startup_burst - 1) * interval
        slot = max(now, self._tat - tolerance)
        self._tat = max(self._tat, slot) + interval
        return slot

    def _place(self, now: float) -> None:
        """Bind pending pods, oldest first. Kubernetes places by request, never by use.
        A pod that fits no node stays Pending until a trajectory ends and frees its
        request."""
        assert self.runner is not None
        while self.pending:
            traj = self.pending[0]
            mem = int(self.runner.trajs[traj].memory_gb * GIB)
            node = self._node_for(mem)
            if node is None:
                return
            self.pending.popleft()
            if now > self.started_at.pop(traj):
                self.unplaced += 1
            self.requested[node] += self.p.request
            self.req_m[node] += self.pod_cpu_m
            self.req_mem[node] += mem
            self.pods_per_node[node] += 1
            self.max_pods_per_node = max(self.max_pods_per_node, self.pods_per_node[node])
            self.pod_node[traj] = node
            self.pod_mem[traj] = mem
            self.placed.append((traj, node))
            slot = self._startup_slot(now)
            self.startup_wait_s += slot - now
            ready = slot + self.p.startup_s
            self.pod_ready[traj] = ready
            self.runner.at(ready, self._pod_up, traj)

    def _pod_up(self, traj: int) -> None:
        run = self.waiting.pop(traj, None)
        if run is not None:
            assert self.runner is not None
            self._start(run, self.runner.now)

    def end_trajectory(self, traj: int, now: float) -> None:
        node = self.pod_node.pop(traj)
        self.requested[node] -= self.p.request
        self.req_m[node] -= self.pod_cpu_m
        self.req_mem[node] -= self.pod_mem.pop(traj)
        self.pods_per_node[node] -= 1
        self.pod_ready.pop(traj, None)
        self._place(now)

    # ---- actions ---------------------------------------------------------------------
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
        """The pod is up: the exec into it, then the action's work on the node's cores."""
        run.started = now
        if self.p.exec_s > 0:
            run.setup_s = self.p.exec_s
            assert self.runner is not None
            self.runner.at(now + self.p.exec_s, self._begin, run)
        else:
            self._begin(run)

    def _begin(self, run: ActionRun) -> None:
        assert self.runner is not None
        now = self.runner.now
        node = self.pod_node[run.traj]
        cores, dur = self._want(run.spec)
        run.units = cores
        # Only a keyed action follows a curve (its duration is at the key's minimum);
        # one without runs on its cores in proportion.
        eff = run.spec.efficiency if run.spec.key is not None else None
        self._id += 1
        self._advance(node, now)
        self.jobs[node][self._id] = _Job(run, dur, cores, eff, now)
        self.demand[node] += cores
        run.exec_s = dur  # corrected at the end with the contended time
        self._reshare(node, now)

    def _advance(self, node: int, now: float) -> None:
        dt = now - self.last[node]
        if dt > 0:
            used = 0.0
            for job in self.jobs[node].values():
                job.left -= job.rate * dt
                used += job.share
            self.busy[node] += min(used, self.cores[node]) * dt
        self.last[node] = now

    def _reshare(self, node: int, now: float) -> None:
        jobs = self.jobs[node]
        cap = self.cores[node]
        self.version[node] += 1
        v = self.version[node]
        if self.demand[node] <= cap:
            for job in jobs.values():
                job.share = float(job.want)
                job.rate = 1.0
        else:
            # Max-min fair water level over the jobs' wanted cores.
            wants = sorted(j.want for j in jobs.values())
            left, n, level = float(cap), len(wants), 0.0
            for i, w in enumerate(wants):
                share = left / (n - i)
                if w <= share:
                    left -= w
                else:
                    level = share
                    break
            for job in jobs.values():
                if job.want <= level or level == 0.0:
                    job.share, job.rate = float(job.want), 1.0
                else:
                    job.share = level
                    job.rate = speed(job.eff, level) / speed(job.eff, float(job.want))
        assert self.runner is not None
        # One event per node: the next job to finish; stale ones are skipped by version.
        soonest = min((j.left / j.rate for j in jobs.values()), default=None)
        if soonest is not None:
            self.runner.at(now + max(soonest, 0.0), self._tick, (node, v))

    def _tick(self, arg: tuple[int, int]) -> None:
        node, v = arg
        if v != self.version[node]:
            return
        assert self.runner is not None
        now = self.runner.now
        self._advance(node, now)
        done = [jid for jid, j in self.jobs[node].items() if j.left <= 1e-9]
        for jid in done:
            job = self.jobs[node].pop(jid)
            self.demand[node] -= job.want
            job.run.exec_s = now - job.began
            self.runner.finish(job.run, now)
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
            "pods_max_per_node": self.max_pods_per_node,
            "pods_startup_wait_s": self.startup_wait_s,
        }
