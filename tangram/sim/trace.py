"""The trace format: one JSON object per line, trajectories and their actions in order.

A trace is what the simulator replays; a generated workload is written in the same form
by ``--save-trace``. See docs/trace-format.md. Reading is strict about what it needs and
lenient about what it does not know (unknown fields are ignored), and every error names
the line it was found on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tangram import wire
from tangram.spec import Demand, Efficiency, InvalidAction, parse_efficiency


class TraceError(ValueError):
    """A trace line is malformed; the message starts with ``line N:``."""


@dataclass(slots=True)
class ActionSpec:
    """One action of a trajectory, as the workload (not the scheduler) describes it."""

    gap: float  # generation time before the action is submitted
    demands: dict[str, Demand]
    duration: float  # execution time at the minimum allocation of the key demand
    key: str | None = None
    efficiency: Efficiency | None = None
    service: str | None = None
    tokens: int | None = None
    label: str = ""  # free-form (tool, test, search, judge...), for the reports
    # What the action tells the scheduler, when it is not the truth (``--duration-error``,
    # ``--hide-durations``; never read from or written to a trace): ``declared`` replaces
    # ``duration`` in the submitted action, ``hidden`` submits no duration at all. The
    # simulated execution always follows ``duration``.
    declared: float | None = None
    hidden: bool = False

    @property
    def declared_duration(self) -> float | None:
        """The duration the submitted action carries (None: it declares none)."""
        if self.hidden:
            return None
        return self.duration if self.declared is None else self.declared

    @property
    def key_pool(self) -> str | None:
        """The demand whose amount sets the duration: ``key``, or the only elastic demand
        (the rule the core applies, tangram.core.validate.key_of)."""
        if self.key is not None:
            return self.key
        elastic = [p for p, d in self.demands.items() if d.elastic]
        return elastic[0] if len(elastic) == 1 else None

    def duration_at(self, key: str | None, amount: int) -> float:
        """True execution time on ``amount`` units of pool ``key``: what
        ``Action.duration_at`` computes (the same arithmetic, so the same float) from the
        true duration, whatever the action declared."""
        if key is None:
            return self.duration
        lo = self.demands[key].min
        if self.efficiency is None or amount == lo:
            return self.duration
        return self.duration * self.efficiency.speedup(lo) / self.efficiency.speedup(amount)

    def fastest(self, feasible: Callable[[str, int], bool] | None = None) -> float:
        """The shortest true execution time over the amounts of the key demand (those
        ``feasible(pool, amount)`` accepts when given; the minimum if it accepts none)."""
        key = self.key_pool
        if key is None or self.efficiency is None:
            return self.duration
        amounts = self.demands[key].amounts()
        if feasible is not None:
            amounts = tuple(a for a in amounts if feasible(key, a)) or amounts[:1]
        return min(self.duration_at(key, a) for a in amounts)


@dataclass(slots=True)
class TrajectorySpec:
    id: str
    task: str
    step: int
    memory_gb: float = 0.0
    actions: list[ActionSpec] = field(default_factory=list)


# The fields a trace's action line shares with an action, written as tangram.wire writes
# them (the line adds its kind, trajectory, gap and label; docs/trace-format.md).
TRACE_FIELDS = wire.action_fields("demands", "key", "duration", "efficiency", "service", "tokens")


def action_to_wire(trajectory: str, a: ActionSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": "action", "trajectory": trajectory, "gap": a.gap}
    out.update(wire.encode_fields(a, TRACE_FIELDS))
    if a.label:
        out["label"] = a.label
    return out


def dump_lines(trajectories: Iterable[TrajectorySpec]) -> Iterator[str]:
    for t in trajectories:
        head: dict[str, Any] = {"kind": "trajectory", "id": t.id, "task": t.task, "step": t.step}
        if t.memory_gb:
            head["memory_gb"] = t.memory_gb
        yield json.dumps(head)
        for a in t.actions:
            yield json.dumps(action_to_wire(t.id, a))


def write_trace(path: str | Path, trajectories: Iterable[TrajectorySpec]) -> None:
    with open(path, "w") as f:
        for line in dump_lines(trajectories):
            f.write(line + "\n")


def _number(obj: Mapping[str, Any], name: str, *, default: float | None = None) -> float:
    v = obj.get(name, default)
    if v is None:
        raise ValueError(f"field {name!r} is required")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ValueError(f"field {name!r} must be a non-negative number, got {v!r}")
    return float(v)


def _parse_action(obj: Mapping[str, Any]) -> tuple[str, ActionSpec]:
    traj = obj.get("trajectory")
    if not isinstance(traj, str) or not traj:
        raise ValueError("an action needs 'trajectory', the id of an earlier trajectory line")
    raw = obj.get("demands")
    if not isinstance(raw, Mapping) or not raw:
        raise ValueError("an action needs 'demands', a non-empty object pool -> demand")
    demands = {}
    for pool, d in raw.items():
        dem = Demand.parse(d, str(pool))
        dem.check_shape(str(pool))
        demands[str(pool)] = dem
    key = obj.get("key")
    if key is not None and key not in demands:
        raise ValueError(f"key {key!r} is not among the demands ({', '.join(demands)})")
    service = obj.get("service")
    if service is not None and not isinstance(service, str):
        raise ValueError("'service' must be a string")
    tokens = obj.get("tokens")
    if tokens is not None and (
        isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0
    ):
        raise ValueError(f"'tokens' must be a non-negative integer, got {tokens!r}")
    label = obj.get("label", "")
    return traj, ActionSpec(
        gap=_number(obj, "gap", default=0.0),
        demands=demands,
        duration=_number(obj, "duration"),
        key=key,
        efficiency=parse_efficiency(obj.get("efficiency")),
        service=service,
        tokens=tokens,
        label=label if isinstance(label, str) else "",
    )


def parse_lines(lines: Iterable[str], source: str = "trace") -> list[TrajectorySpec]:
    """Parse trace lines; raise TraceError naming the first bad line."""
    trajs: dict[str, TrajectorySpec] = {}
    for no, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            obj = json.loads(text)
            if not isinstance(obj, dict):
                raise ValueError("each line must be a JSON object")
            kind = obj.get("kind")
            if kind == "trajectory":
                tid = obj.get("id")
                if not isinstance(tid, str) or not tid:
                    raise ValueError("a trajectory needs 'id', a non-empty string")
                if tid in trajs:
                    raise ValueError(f"trajectory {tid!r} is defined twice")
                step = obj.get("step", 0)
                if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                    raise ValueError(f"'step' must be a non-negative integer, got {step!r}")
                task = obj.get("task", "default")
                if not isinstance(task, str):
                    raise ValueError("'task' must be a string")
                trajs[tid] = TrajectorySpec(tid, task, step, _number(obj, "memory_gb", default=0.0))
            elif kind == "action":
                tid, spec = _parse_action(obj)
                if tid not in trajs:
                    raise ValueError(
                        f"action of trajectory {tid!r} comes before that trajectory's line"
                    )
                trajs[tid].actions.append(spec)
            else:
                raise ValueError(f"'kind' must be 'trajectory' or 'action', got {kind!r}")
        except (ValueError, InvalidAction) as exc:  # JSONDecodeError is a ValueError
            raise TraceError(f"{source}: line {no}: {exc}") from None
    return list(trajs.values())


def read_trace(path: str | Path) -> list[TrajectorySpec]:
    with open(path) as f:
        return parse_lines(f, str(path))
