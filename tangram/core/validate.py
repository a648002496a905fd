"""Is an action well formed, and what could the pools ever grant it? Checked once, when
it is submitted, so an impossible demand is refused at once with a message that says
why (and what would fit), never queued forever. Nothing here changes the action or a
pool."""

from __future__ import annotations

import math
from collections.abc import Mapping

from tangram.core.managers.base import Manager
from tangram.spec import Action, Amdahl, EfficiencyTable, InvalidAction


def validate(
    action: Action, pools: Mapping[str, Manager]
) -> tuple[dict[str, tuple[int, ...]], str | None]:
    """The feasible amounts per pool and the key pool (named, or the one elastic demand
    when the action names none). Raises InvalidAction."""
    check_fields(action)
    check_demands(action, pools)
    key = key_of(action)
    if action.service is not None:
        check_service(action, pools)
    try:
        feasible = {}
        for p, d in action.demands.items():
            feasible[p] = pools[p].feasible(action, d)
        return feasible, key
    except InvalidAction as exc:
        if exc.reason == "malformed":  # the pools refuse what they could never grant
            exc.reason = "never_fits"
        raise


def check_fields(action: Action) -> None:
    """What an action says of itself, whatever the pools."""
    if not action.trajectory or not isinstance(action.trajectory, str):
        raise InvalidAction("an action needs a trajectory id (a non-empty string)")
    eff = action.efficiency
    if eff is not None:
        if not isinstance(eff, (Amdahl, EfficiencyTable)):
            raise InvalidAction("efficiency must be Amdahl or EfficiencyTable")
        eff.check()
    d = action.duration
    if d is not None and not (math.isfinite(d) and d >= 0):
        raise InvalidAction(f"duration must be a non-negative number, got {d}")
    if action.tokens is not None and action.tokens < 0:
        raise InvalidAction(f"tokens must not be negative, got {action.tokens}")
    ttl = action.ttl
    if ttl is not None and not (math.isfinite(ttl) and ttl > 0):
        raise InvalidAction(f"ttl must be a positive number of seconds, got {ttl}")


def check_demands(action: Action, pools: Mapping[str, Manager]) -> None:
    if not action.demands:
        raise InvalidAction("an action must demand at least one pool; pools: " + ", ".join(pools))
    for pool, demand in action.demands.items():
        if pool not in pools:
            raise InvalidAction(
                f"unknown pool {pool!r}; this broker has: " + ", ".join(sorted(pools)),
                "unknown_pool",
            )
        demand.check_shape(pool)


def key_of(action: Action) -> str | None:
    """The pool whose amount sets the action's duration."""
    if action.key is None:
        found = None
        for p, d in action.demands.items():
            if d.max > d.min:  # Demand.elastic, inline: every submit passes here
                if found is not None:
                    return None  # two elastic demands: the action must name its key
                found = p
        return found
    if action.key not in action.demands:
        raise InvalidAction(
            f"key resource {action.key!r} is not among the demands "
            f"({', '.join(action.demands)}); name one of them or leave key out"
        )
    return action.key


def check_service(action: Action, pools: Mapping[str, Manager]) -> None:
    """A service needs a demand on a pool that runs services."""
    if action.service is None or any(pools[p].runs_services for p in action.demands):
        return
    knowing = [n for n, m in pools.items() if m.serves(action.service)]
    hint = f"demand GPUs from {', '.join(knowing)}" if knowing else "no GPU pool knows it"
    raise InvalidAction(f"service {action.service!r} needs a GPU demand; {hint}", "unknown_service")
