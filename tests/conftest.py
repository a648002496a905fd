"""Shared helpers: build a core from a configuration dict.

The helpers are handed out as fixtures (not imported from this module) so the tests do
not depend on how pytest puts tests/ on sys.path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest

from tangram.config import parse_config
from tangram.core.state import Core


def build_core(
    pools: Mapping[str, Any], *, policy: str = "tangram", lease_ttl: float = 60.0
) -> Core:
    cfg = parse_config({"policy": policy, "lease_ttl_seconds": lease_ttl, "pools": dict(pools)})
    return Core(cfg.build_pools(), cfg.build_policy(), lease_ttl=cfg.lease_ttl_seconds)


@pytest.fixture
def make_core() -> Callable[..., Core]:
    """``make_core(pools, policy="tangram", lease_ttl=60.0)`` from a ``pools:`` dict."""
    return build_core
