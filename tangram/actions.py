"""``@tangram.action(...)``: declare a function's resource demands next to the function.

The decorated function builds the request an executor runs (a sandbox ``Command``, a
``ServiceCall``, an ``HttpCall``); calling it returns a ``Bound`` action that a client
runs end to end: ``await client.run(run_tests("tests/"), trajectory="t1")``. Demands
are pool names as keywords, in the wire forms of ``Demand.parse``: ``cpu=2``,
``cpu=(1, 8)`` (a range), ``gpu=[1, 2, 4]`` (choices). They are checked when the module
is imported, so a typo fails at once and not at the first rollout.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, ParamSpec, TypeVar

from tangram.spec import Action, Demand, Efficiency, InvalidAction, parse_efficiency

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class ActionTemplate:
    """Everything about an action except its trajectory."""

    demands: Mapping[str, Demand]
    key: str | None = None
    duration: float | None = None
    efficiency: Efficiency | None = None
    service: str | None = None
    tokens: int | None = None
    memory_gb: float = 0.0
    ttl: float | None = None
    task: str = "default"
    tenant: str | None = None

    def build(self, trajectory: str) -> Action:
        if not isinstance(trajectory, str) or not trajectory:
            raise InvalidAction("an action needs a trajectory id (a non-empty string)")
        return Action(
            trajectory=trajectory,
            demands=dict(self.demands),
            task=self.task,
            key=self.key,
            duration=self.duration,
            efficiency=self.efficiency,
            service=self.service,
            tokens=self.tokens,
            memory_gb=self.memory_gb,
            ttl=self.ttl,
            tenant=self.tenant,
        )


@dataclass(frozen=True, slots=True)
class Bound(Generic[R]):
    """An action ready to run: its template and the request the function built."""

    template: ActionTemplate
    request: R
    name: str = ""

    def action(self, trajectory: str) -> Action:
        return self.template.build(trajectory)


class ActionFunction(Generic[P, R]):
    """A function whose calls are actions (see the module docstring)."""

    def __init__(self, fn: Callable[P, R], template: ActionTemplate) -> None:
        self.fn = fn
        self.template = template
        functools.update_wrapper(self, fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Bound[R]:
        return Bound(self.template, self.fn(*args, **kwargs), getattr(self.fn, "__name__", ""))

    def action(self, trajectory: str) -> Action:
        """The bare action, for ``async with client.lease(f.action("t1")) as lease:``."""
        return self.template.build(trajectory)


def action(
    *,
    key: str | None = None,
    duration: float | None = None,
    efficiency: Any = None,
    service: str | None = None,
    tokens: int | None = None,
    memory_gb: float = 0.0,
    ttl: float | None = None,
    task: str = "default",
    tenant: str | None = None,
    demands: Mapping[str, Any] | None = None,
    **pools: Any,
) -> Callable[[Callable[P, R]], ActionFunction[P, R]]:
    """Declare the demands of the decorated function's actions.

    Pools whose names clash with the keywords above go in ``demands={...}``."""
    raw = dict(demands or {})
    for name, d in pools.items():
        if name in raw:
            raise InvalidAction(f"pool {name!r} is given twice (keyword and demands)")
        raw[name] = d
    if not raw:
        raise InvalidAction("@tangram.action needs at least one demand, e.g. cpu=(1, 8)")
    parsed = {}
    for name, d in raw.items():
        dem = Demand.parse(d, name)
        dem.check_shape(name)
        parsed[name] = dem
    if key is not None and key not in parsed:
        raise InvalidAction(f"key {key!r} is not among the demands ({', '.join(parsed)})")
    template = ActionTemplate(
        demands=parsed,
        key=key,
        duration=duration,
        efficiency=parse_efficiency(efficiency),
        service=service,
        tokens=tokens,
        memory_gb=memory_gb,
        ttl=ttl,
        task=task,
        tenant=tenant,
    )

    def wrap(fn: Callable[P, R]) -> ActionFunction[P, R]:
        return ActionFunction(fn, template)

    return wrap
