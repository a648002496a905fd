"""The paper's workloads as generators, and the default pools each one runs on.

Every parameter sits in the ``*Params`` dataclasses below, each with the paper fact it
comes from or the word "assumed" where the paper is silent (see
/work/shared/docs/paper-notes.md, section 7, and docs/benchmarks.md). Generators are pure
functions of the parameters and a seed: the same seed gives the same trajectories.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tangram.sim.trace import ActionSpec, TrajectorySpec
from tangram.spec import Amdahl, Demand, EfficiencyTable

# ----------------------------------------------------------------------------- pools

# Paper: the external CPU cluster has 15 nodes of 256 cores and 2.4 TB of memory (read
# here as per node); the CPU scaling experiments use 1280 cores on 5 nodes of it
# (``--capacity 1280``). Two NUMA groups per node are assumed.
CODING_POOLS: dict[str, Any] = {
    "pools": {
        "cpu": {
            "kind": "cpu",
            "nodes": [{"name": "cpu", "count": 15, "cores": 256, "numa": 2, "memory_gb": 2400}],
        }
    }
}

# The paper's CPU scaling cluster, 1280 cores on 5 of those nodes: the default of
# ``coding-short``, whose many suites make cores scarce there (the best fixed K is small).
CODING_1280_POOLS: dict[str, Any] = {
    "pools": {
        "cpu": {
            "kind": "cpu",
            "nodes": [{"name": "cpu", "count": 5, "cores": 256, "numa": 2, "memory_gb": 2400}],
        }
    }
}

# Paper: the GPU cluster is 5 nodes of 8 GPUs. 80 GB per GPU is assumed (H100/A100 class).
GPU_NODES: list[dict[str, Any]] = [{"name": "gpu", "count": 5, "gpus": 8, "memory_gb": 80}]

# One quota pool per external API (paper: "each API's quota as its own type"). The limits
# are assumed: the paper uses "several real APIs with quotas" without giving them.
API_POOLS: dict[str, Any] = {
    "search": {"kind": "quota", "concurrency": 64, "window": {"limit": 1800, "seconds": 60}},
    "fetch": {"kind": "quota", "concurrency": 64, "window": {"limit": 1200, "seconds": 60}},
}

# An efficiency table for tensor parallelism (assumed: typical TP scaling of inference).
TP_EFFICIENCY = {"table": {"1": 1.0, "2": 0.9, "4": 0.75, "8": 0.55}}


# Batching curves: (requests in flight on one instance, latency multiplier), assumed, not
# measured (no GPU here; docs/gpu-services.md). A teacher scores a whole trajectory
# (prefill: compute-bound), so batching gains little: throughput saturates near 3.6x one
# request's. The judge generates a verdict (decode: memory-bound) and batches well:
# about 11x at 32 in flight.
PREFILL_BATCHING = [[2, 1.15], [4, 1.5], [8, 2.4], [16, 4.4]]
DECODE_BATCHING = [[2, 1.05], [4, 1.15], [8, 1.35], [16, 1.8], [32, 2.8]]


def _services(
    names: list[str], memory_gb: float, restore: float, slots: int, batching: list[list[float]]
) -> dict[str, Any]:
    return {
        n: {
            "memory_gb": memory_gb,
            "restore_seconds": restore,
            "parallelism": [1, 2, 4, 8],
            "max_concurrency": slots,
            "batching": batching,
        }
        for n in names
    }


def without_batching(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with every GPU service taking one request per instance (no request
    slots): the model before engines batched, kept for comparison."""
    out = copy.deepcopy(config)
    for pool in out.get("pools", {}).values():
        if pool.get("kind") == "gpu":
            for svc in pool.get("services", {}).values():
                svc["max_concurrency"] = 1
                svc.pop("batching", None)
    return out


# ----------------------------------------------------------------------------- coding


@dataclass(frozen=True)
class CodingParams:
    batch: int = 1280  # paper: RL batch size 1280 for coding
    # Tool calls per trajectory before the final test (assumed: multi-turn, paper silent).
    turns_min: int = 8
    turns_max: int = 24
    # LLM generation time before each action, lognormal (assumed), set so that actions
    # take 47% of a trajectory's life at minimum allocation (paper: 47% in production).
    gap_median_s: float = 3.5
    gap_sigma: float = 0.8
    # Tool commands: paper: actions can be about 1 ms; a share are that short (assumed
    # 30%), the rest lognormal around a second (assumed).
    tool_tiny_share: float = 0.3
    tool_tiny_s: float = 0.001
    tool_median_s: float = 1.0
    tool_sigma: float = 1.2
    # The final test/reward action: elastic on 1-32 cores (paper), long-tailed duration
    # at one core (assumed lognormal), Amdahl parallel fraction (assumed range).
    test_median_s: float = 30.0
    test_sigma: float = 1.0
    test_max_cores: int = 32
    amdahl_lo: float = 0.90
    amdahl_hi: float = 0.99
    memory_gb: float = 4.0  # per trajectory environment (assumed)


def coding(p: CodingParams, steps: int, rng: np.random.Generator) -> list[TrajectorySpec]:
    out: list[TrajectorySpec] = []
    for step in range(steps):
        for i in range(p.batch):
            t = TrajectorySpec(f"s{step}-c{i}", "coding", step, p.memory_gb)
            for _ in range(int(rng.integers(p.turns_min, p.turns_max + 1))):
                t.actions.append(_tool_call(rng, p))
            t.actions.append(_test_suite(rng, p))
            out.append(t)
    return out


def _tool_call(rng: np.random.Generator, p: CodingParams) -> ActionSpec:
    """One tool command of the coding model (one core, tiny or lognormal)."""
    tiny = rng.random() < p.tool_tiny_share
    dur = p.tool_tiny_s if tiny else float(rng.lognormal(np.log(p.tool_median_s), p.tool_sigma))
    return ActionSpec(
        gap=_lognormal(rng, p.gap_median_s, p.gap_sigma),
        demands={"cpu": Demand.fixed(1)},
        duration=round(dur, 6),
        label="tool",
    )


def _test_suite(rng: np.random.Generator, p: CodingParams) -> ActionSpec:
    """One run of a test suite: elastic on 1..test_max_cores, Amdahl efficiency."""
    return ActionSpec(
        gap=_lognormal(rng, p.gap_median_s, p.gap_sigma),
        demands={"cpu": Demand.range(1, p.test_max_cores)},
        duration=_lognormal(rng, p.test_median_s, p.test_sigma),
        key="cpu",
        efficiency=Amdahl(round(float(rng.uniform(p.amdahl_lo, p.amdahl_hi)), 4)),
        label="test",
    )


# Two variants of coding with the same tool-call model, made so that the best *fixed*
# degree of parallelism for the tests differs between them (a policy that picks the
# degree per action should match the best fixed K of each without being told which).
# Every parameter not redefined (batch, turns, generation gaps, tool calls, memory, 1-32
# cores per suite) is coding's, above. Seed 0, batch 1280, fixed:2..32: coding-short
# on its 1280 cores is best at K = 4 on ACT and step time; coding-long on coding's 3840
# cores at K = 32 on both (on 1280 cores: K = 16 on ACT, 32 on step time).


@dataclass(frozen=True)
class CodingShortParams(CodingParams):
    """Many short test suites that parallelise poorly: the best fixed K is small."""

    # A test-driven loop (assumed): the agent reruns the suite after every
    # ``test_every`` tool calls, and once more at the end (the reward).
    test_every: int = 3
    test_median_s: float = 10.0  # short suites, at one core (assumed)
    test_sigma: float = 0.8  # (assumed)
    # Low Amdahl parallel fractions (assumed: unit tests dominated by start-up, imports
    # and serial fixtures): 32 cores give at most 2-5x.
    amdahl_lo: float = 0.5
    amdahl_hi: float = 0.8


def coding_short(
    p: CodingShortParams, steps: int, rng: np.random.Generator
) -> list[TrajectorySpec]:
    out: list[TrajectorySpec] = []
    for step in range(steps):
        for i in range(p.batch):
            t = TrajectorySpec(f"s{step}-cs{i}", "coding", step, p.memory_gb)
            turns = int(rng.integers(p.turns_min, p.turns_max + 1))
            for n in range(1, turns + 1):
                t.actions.append(_tool_call(rng, p))
                if n % p.test_every == 0 and n < turns:
                    t.actions.append(_test_suite(rng, p))
            t.actions.append(_test_suite(rng, p))
            out.append(t)
    return out


@dataclass(frozen=True)
class CodingLongParams(CodingParams):
    """Rare, very long test suites that parallelise almost perfectly: the best fixed K
    is large."""

    # Only this share of trajectories ends with the suite (assumed: the others' reward
    # is checked by their last tool call, e.g. a build, in the tool-call model).
    suite_share: float = 0.2
    test_median_s: float = 200.0  # long integration suites, at one core (assumed)
    # A long tail (assumed): about one suite in a thousand takes over an hour at one core.
    test_sigma: float = 1.0
    # Parallel fractions near 1 (assumed: independent test files, sharded by the runner).
    amdahl_lo: float = 0.97
    amdahl_hi: float = 0.999


def coding_long(p: CodingLongParams, steps: int, rng: np.random.Generator) -> list[TrajectorySpec]:
    out: list[TrajectorySpec] = []
    for step in range(steps):
        for i in range(p.batch):
            t = TrajectorySpec(f"s{step}-cl{i}", "coding", step, p.memory_gb)
            for _ in range(int(rng.integers(p.turns_min, p.turns_max + 1))):
                t.actions.append(_tool_call(rng, p))
            if rng.random() < p.suite_share:
                t.actions.append(_test_suite(rng, p))
            out.append(t)
    return out


# ----------------------------------------------------------------------------- deepsearch


@dataclass(frozen=True)
class DeepSearchParams:
    batch: int = 2048  # paper: RL batch size 2048 for DeepSearch
    turns_min: int = 4  # API calls per trajectory (assumed)
    turns_max: int = 12
    gap_median_s: float = 8.0  # LLM generation before each call (assumed)
    gap_sigma: float = 0.9
    fetch_share: float = 0.4  # share of calls that fetch/parse a page (assumed)
    search_median_s: float = 1.5  # API latencies (assumed)
    fetch_median_s: float = 3.0
    api_sigma: float = 0.6
    # The LLM-judge reward on a GPU service (paper); time at one GPU assumed.
    judge_median_s: float = 6.0
    judge_sigma: float = 0.5


def deepsearch(p: DeepSearchParams, steps: int, rng: np.random.Generator) -> list[TrajectorySpec]:
    out: list[TrajectorySpec] = []
    for step in range(steps):
        for i in range(p.batch):
            t = TrajectorySpec(f"s{step}-d{i}", "deepsearch", step)
            for _ in range(int(rng.integers(p.turns_min, p.turns_max + 1))):
                fetch = rng.random() < p.fetch_share
                api = "fetch" if fetch else "search"
                med = p.fetch_median_s if fetch else p.search_median_s
                t.actions.append(
                    ActionSpec(
                        gap=_lognormal(rng, p.gap_median_s, p.gap_sigma),
                        demands={api: Demand.fixed(1)},
                        duration=_lognormal(rng, med, p.api_sigma),
                        label=api,
                    )
                )
            t.actions.append(
                _gpu_action(
                    rng, "judge", p.judge_median_s, p.judge_sigma, p.gap_median_s, p.gap_sigma
                )
            )
            out.append(t)
    return out


# ----------------------------------------------------------------------------- mopd


@dataclass(frozen=True)
class MopdParams:
    batch: int = 2048  # paper: RL batch size 2048 for MOPD
    teachers: int = 9  # paper: nine teacher models in the baseline (9 to 12 in MOPD)
    # Teacher popularity is Zipf-like (assumed) and each teacher's domain has its own
    # generation length, spread over two orders of magnitude, so each teacher's call rate
    # swings over the step (paper: call rate swings by up to three orders of magnitude).
    zipf_s: float = 1.0
    gap_fast_s: float = 3.0
    gap_slow_s: float = 300.0
    gap_sigma: float = 0.5
    calls_min: int = 1  # teacher calls per trajectory (assumed: one per turn, 1-3 turns)
    calls_max: int = 3
    # Teacher scoring time at one GPU (assumed; the paper's MOPD ACT split gives 0.62 s of
    # execution on average over its chosen parallelism).
    call_median_s: float = 1.5
    call_sigma: float = 0.5
    teacher_memory_gb: float = 64.0  # a 32B model in bf16 (assumed)
    # Restore from the host copy (assumed; the paper: restore is 20-35% of execution).
    restore_s: float = 1.5
    # Request slots per teacher instance (an engine's concurrent requests; assumed).
    slots: int = 8


def teacher_names(n: int) -> list[str]:
    return [f"teacher{i}" for i in range(n)]


def mopd(p: MopdParams, steps: int, rng: np.random.Generator) -> list[TrajectorySpec]:
    names = teacher_names(p.teachers)
    weights = 1.0 / np.arange(1, p.teachers + 1) ** p.zipf_s
    weights /= weights.sum()
    gaps = np.geomspace(p.gap_fast_s, p.gap_slow_s, p.teachers)
    out: list[TrajectorySpec] = []
    for step in range(steps):
        # The popular teachers change from step to step (assumed).
        order = rng.permutation(p.teachers)
        for i in range(p.batch):
            k = int(rng.choice(p.teachers, p=weights))
            svc, gap = names[order[k]], float(gaps[order[k]])
            t = TrajectorySpec(f"s{step}-m{i}", "mopd", step)
            for _ in range(int(rng.integers(p.calls_min, p.calls_max + 1))):
                t.actions.append(
                    _gpu_action(rng, svc, p.call_median_s, p.call_sigma, gap, p.gap_sigma)
                )
            out.append(t)
    return out


# ----------------------------------------------------------------------------- helpers


def _lognormal(rng: np.random.Generator, median: float, sigma: float) -> float:
    return round(float(rng.lognormal(np.log(median), sigma)), 4)


def _gpu_action(
    rng: np.random.Generator, svc: str, median: float, sigma: float, gap: float, gap_sigma: float
) -> ActionSpec:
    table = EfficiencyTable(tuple((int(k), float(v)) for k, v in TP_EFFICIENCY["table"].items()))
    return ActionSpec(
        gap=_lognormal(rng, gap, gap_sigma),
        demands={"gpu": Demand.of_choices([1, 2, 4, 8])},
        duration=_lognormal(rng, median, sigma),
        key="gpu",
        efficiency=table,
        service=svc,
        label="judge" if svc == "judge" else "teacher",
    )


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Workload:
    """A named workload: its generator and the pools it runs on by default."""

    name: str
    generate: Callable[[int, int, np.random.Generator], list[TrajectorySpec]]
    pools: dict[str, Any] = field(default_factory=dict)
    batch: int = 0


def _gpu_pool(services: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "gpu", "nodes": GPU_NODES, "services": services}


def _mopd_services(p: MopdParams) -> dict[str, Any]:
    return _services(
        teacher_names(p.teachers),
        p.teacher_memory_gb,
        p.restore_s,
        p.slots,
        PREFILL_BATCHING,
    )


# The judge: an assumed 32B-class reward model with the same restore time as a teacher.
JUDGE = _services(["judge"], 64.0, 1.5, 32, DECODE_BATCHING)


def _mixed(batch: int, steps: int, rng: np.random.Generator) -> list[TrajectorySpec]:
    # Paper: MOPD and DeepSearch share one GPU pool; half the batch each (assumed).
    m = mopd(MopdParams(batch=batch // 2), steps, rng)
    d = deepsearch(DeepSearchParams(batch=batch - batch // 2), steps, rng)
    return m + d


WORKLOADS: dict[str, Workload] = {
    "coding": Workload(
        "coding",
        lambda b, s, r: coding(CodingParams(batch=b), s, r),
        CODING_POOLS,
        CodingParams.batch,
    ),
    "coding-short": Workload(
        "coding-short",
        lambda b, s, r: coding_short(CodingShortParams(batch=b), s, r),
        CODING_1280_POOLS,
        CodingShortParams.batch,
    ),
    "coding-long": Workload(
        "coding-long",
        lambda b, s, r: coding_long(CodingLongParams(batch=b), s, r),
        CODING_POOLS,
        CodingLongParams.batch,
    ),
    "deepsearch": Workload(
        "deepsearch",
        lambda b, s, r: deepsearch(DeepSearchParams(batch=b), s, r),
        {"pools": {**API_POOLS, "gpu": _gpu_pool(JUDGE)}},
        DeepSearchParams.batch,
    ),
    "mopd": Workload(
        "mopd",
        lambda b, s, r: mopd(MopdParams(batch=b), s, r),
        {"pools": {"gpu": _gpu_pool(_mopd_services(MopdParams()))}},
        MopdParams.batch,
    ),
    "mixed": Workload(
        "mixed",
        _mixed,
        {"pools": {**API_POOLS, "gpu": _gpu_pool({**_mopd_services(MopdParams()), **JUDGE})}},
        MopdParams.batch,
    ),
}


def generate(name: str, batch: int | None, steps: int, seed: int) -> list[TrajectorySpec]:
    wl = WORKLOADS[name]
    return wl.generate(batch or wl.batch, steps, np.random.default_rng(seed))
