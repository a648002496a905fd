"""The resource kinds by name: each kind's pool configuration model and the factory of
its manager. Configuration, metrics, the CLI and Ray iterate over pools through the
``Manager`` interface; this registry is the one place outside tangram/core/managers/
that names a concrete manager. A new kind is one module (its manager, its model, its
``Kind``) and one ``register`` line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tangram.core.managers.base import Manager
from tangram.kinds import cpu, gpu, quota
from tangram.kinds.base import ConfigError, Kind

__all__ = ["KINDS", "ConfigError", "Kind", "build_pool", "register", "unregister"]

KINDS: dict[str, Kind] = {}
_on_register: list[Callable[[], None]] = []  # the configuration rebuilds its schema


def register(kind: Kind) -> None:
    """Add (or replace) a kind; configurations parsed from now on may use it."""
    KINDS[kind.name] = kind
    for hook in _on_register:
        hook()


def unregister(name: str) -> None:
    """Remove a kind (a plugin's, a test's); configurations using it no longer parse."""
    del KINDS[name]
    for hook in _on_register:
        hook()


def on_register(hook: Callable[[], None]) -> None:
    _on_register.append(hook)


def build_pool(name: str, cfg: Any) -> Manager:
    """The manager of pool ``name`` from its validated configuration."""
    return KINDS[cfg.kind].build(name, cfg)


register(cpu.KIND)
register(gpu.KIND)
register(quota.KIND)
