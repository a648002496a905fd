"""The ``static`` baseline (paper, MOPD baseline: nine teachers served statically on 4
GPUs each): every GPU service gets its own GPUs, always resident, no sharing across
services.

It reuses the core (a pool per service, FCFS at that service's fixed parallelism), since
it is a different *configuration*, not a different scheduler: this module only rewrites
the pool configuration and the trajectories.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from tangram.sim.trace import ActionSpec, TrajectorySpec
from tangram.spec import Action, Demand


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
                    label=a.label,
                )
            )
        out.append(nt)
    return cfg, out
