"""A resource kind is one module and one registry line: the toy kind of toy_kind.py,
registered here, is configured, scheduled, described, measured and served like the
built-in ones, with no other change to the code."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from tangram import kinds
from tangram.broker import Broker
from tangram.config import ConfigError, parse_config
from tangram.metrics import Metrics
from tangram.server.app import create_app
from tangram.server.cli import describe
from tangram.server.run import LiveServer
from tangram.spec import Action

sys.path.insert(0, str(Path(__file__).resolve().parent))
import toy_kind

CONFIG = {
    "pools": {
        "lic": {"kind": "toy", "nodes": {"a": 2, "b": 3}},
        "cpu": {"kind": "cpu", "nodes": [{"name": "n", "cores": 2, "memory_gb": 4}]},
    }
}


@pytest.fixture
def toy() -> Iterator[None]:
    kinds.register(toy_kind.KIND)  # the one registry line
    yield
    kinds.unregister("toy")


def test_an_unregistered_kind_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="toy"):
        parse_config(CONFIG)


def test_a_registered_kind_is_configured_scheduled_and_described(toy: None) -> None:
    cfg = parse_config(CONFIG)
    assert describe(cfg) == "lic (toy, 5 licences on 2 nodes), cpu (cpu, 2 cores on 1 node)"

    async def main() -> None:
        broker = Broker.from_config(cfg)
        leases = [await broker.acquire(Action.build(f"t{i}", {"lic": 1, "cpu": 1})) for i in (0, 1)]
        units = [(x.allocation["lic"].node, x.allocation["lic"].units) for x in leases]
        assert units == [("b", (0,)), ("a", (0,))]  # the node with most free, then the other
        with pytest.raises(asyncio.TimeoutError):  # 2 cores held: the third waits
            await broker.acquire(Action.build("t2", {"lic": 1, "cpu": 1}), timeout=0.1)
        for lease in leases:
            broker.release(lease.id)
        assert broker.snapshot()["pools"]["lic"]["in_use"] == 0
        await broker.close()

    asyncio.run(main())


def test_a_registered_kind_is_measured_and_served(toy: None) -> None:
    cfg = parse_config(CONFIG)
    app = create_app(cfg)
    with LiveServer(app) as url:
        body = {"trajectory": "t", "demands": {"lic": 2}}
        r = httpx.post(f"{url}/v1/actions?wait=5", json=body)
        assert r.json()["state"] == "granted"
        pools = httpx.get(f"{url}/v1/pools").json()["pools"]
        assert pools["lic"]["kind"] == "toy" and pools["lic"]["in_use"] == 2
        text = httpx.get(f"{url}/metrics").text
        assert 'tangram_pool_units_in_use{kind="toy",node="b",pool="lic"} 2.0' in text


def test_the_metrics_of_a_kind_come_from_its_manager(toy: None) -> None:
    registry = CollectorRegistry()
    broker = Broker.from_config(parse_config(CONFIG))
    Metrics(broker.core, broker.clock, registry, process=False)
    text = generate_latest(registry).decode()
    assert 'tangram_pool_capacity_units{kind="toy",node="a",pool="lic"} 2.0' in text
