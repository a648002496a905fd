"""Bounded queues: past a pool's bound a submit is refused (429 with Retry-After over
HTTP), nothing is queued, and memory cannot grow without bound."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tangram.config import parse_config
from tangram.core.state import Core
from tangram.metrics import Metrics
from tangram.server.app import create_app
from tangram.server.run import LiveServer
from tangram.spec import Action, QueueFull

CONFIG: dict[str, Any] = {
    "max_queued_per_pool": 3,
    "pools": {
        "cpu": {"kind": "cpu", "nodes": [{"name": "n", "cores": 1, "memory_gb": 8}]},
        "api": {"kind": "quota", "concurrency": 1},
    },
}


def test_a_full_pool_refuses_more_and_queues_nothing() -> None:
    cfg = parse_config(CONFIG)
    core = Core(cfg.build_pools(), max_queued_per_pool=cfg.max_queued_per_pool)
    m = Metrics(core, lambda: 0.0, process=False)
    for i in range(3):
        core.submit(Action.build(f"t{i}", {"cpu": 1}), 0.0)
    with pytest.raises(QueueFull, match="'cpu' already has 3 queued actions"):
        core.submit(Action.build("t3", {"cpu": 1}), 0.0)
    assert core.queue_length == 3
    # Another pool is not held back by the full one.
    core.submit(Action.build("q", {"api": 1}), 0.0)
    assert (
        m.registry.get_sample_value(
            "tangram_actions_refused_total", {"reason": "queue_full", "tenant": ""}
        )
        == 1
    )
    core.schedule(0.0)  # one CPU action leaves the queue: there is room again
    core.submit(Action.build("t4", {"cpu": 1}), 0.0)


def test_http_answers_429_with_retry_after_when_a_pool_is_full() -> None:
    cfg = parse_config(CONFIG)
    with LiveServer(create_app(cfg)) as url, httpx.Client(base_url=url) as c:
        codes = [
            c.post(
                "/v1/actions",
                params={"wait": 5} if i == 0 else None,
                json={"trajectory": f"t{i}", "demands": {"cpu": 1}},
            )
            for i in range(5)
        ]
        # One granted, three queued, the fifth refused.
        assert [r.status_code for r in codes] == [200, 202, 202, 202, 429]
        refused = codes[-1]
        assert refused.headers["retry-after"] == "1"
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert "already has 3 queued actions" in refused.json()["detail"]
