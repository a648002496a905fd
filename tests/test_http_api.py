"""The v1 endpoints against a real uvicorn server on a free loopback port."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from tangram.config import parse_config
from tangram.server import LiveServer, create_app

POOLS: dict[str, Any] = {
    "cpu": {"kind": "cpu", "nodes": [{"name": "n", "cores": 2, "memory_gb": 8}]},
    "api": {"kind": "quota", "concurrency": 1},
}


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    cfg = parse_config({"pools": POOLS, "lease_ttl_seconds": 30})
    with LiveServer(create_app(cfg)) as u:
        yield u


@pytest.fixture
async def http(url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
        yield c


def api(traj: str = "t", **kw: Any) -> dict[str, Any]:
    return {"trajectory": traj, "demands": {"api": 1}, **kw}


async def grant(http: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    r = await http.post("/v1/actions", json=body, params={"wait": 5})
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    assert data["state"] == "granted"
    return data


async def release(http: httpx.AsyncClient, lease_id: str) -> httpx.Response:
    return await http.post(f"/v1/leases/{lease_id}/release", json={"outcome": "ok"})


# --------------------------------------------------------------------------- submit


async def test_submit_with_wait_is_granted_with_exact_units(http):
    data = await grant(http, {"trajectory": "s1", "demands": {"cpu": 2}})
    lease = data["lease"]
    assert data["trajectory"] == "s1"
    assert lease["allocation"]["cpu"] == {"amount": 2, "node": "n", "units": [0, 1]}
    assert lease["dop"] == 1 and lease["restore"] is False and lease["ttl"] == 30
    assert abs(lease["expires_at"] - (time.time() + 30)) < 2  # Unix time, not monotonic
    assert (await release(http, lease["id"])).status_code == 200


async def test_submit_without_wait_answers_202_while_queued(http):
    first = await grant(http, api("q1"))
    r = await http.post("/v1/actions", json=api("q2"))
    assert r.status_code == 202
    body = r.json()
    waiting = body.pop("waiting")
    assert body == {"id": body["id"], "state": "queued", "trajectory": "q2"}
    assert (waiting["pool"], waiting["reason"], waiting["limit"]) == (
        "api",
        "insufficient_units",
        "concurrency",
    )
    await release(http, first["lease"]["id"])
    r2 = await http.get(f"/v1/actions/{r.json()['id']}", params={"wait": 5})
    assert r2.json()["state"] == "granted"
    await release(http, r2.json()["lease"]["id"])


async def test_plain_submit_answers_what_the_round_it_triggered_decided(http):
    # No wait: on an idle broker the round the submit triggers grants it, and the answer
    # says so (200 with the lease) instead of a 202 that needs a second call.
    r = await http.post("/v1/actions", json=api("plain1"))
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "granted" and r.json()["lease"]["allocation"]["api"]["amount"] == 1
    # That round found no unit for the next one: 202, queued.
    q = await http.post("/v1/actions", json=api("plain2"))
    assert q.status_code == 202 and q.json()["state"] == "queued"
    await release(http, r.json()["lease"]["id"])
    r2 = await http.get(f"/v1/actions/{q.json()['id']}", params={"wait": 5})
    assert r2.json()["state"] == "granted"
    await release(http, r2.json()["lease"]["id"])


@pytest.mark.parametrize("journal", [False, True], ids=["memory", "journal"])
async def test_plain_submits_are_granted_and_still_batched(tmp_path, journal):
    """Concurrent plain submits share scheduling rounds (each waits for the broker's next
    round, it does not run one of its own) and are answered with their grants; with a
    journal, grants durable before they are answered."""
    from tangram.metrics import Metrics

    cfg = parse_config({"pools": {"api": {"kind": "quota", "concurrency": 64}}})
    data_dir = tmp_path if journal else None
    app = create_app(cfg, data_dir=data_dir)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        n = 32
        answers = await asyncio.gather(
            *(c.post("/v1/actions", json=api(f"b{i}")) for i in range(n))
        )
        assert [a.status_code for a in answers] == [200] * n
        assert all(a.json()["state"] == "granted" for a in answers)
        broker = app.state.service.broker
        assert broker.snapshot()["pools"]["api"]["in_use"] == n
        m = Metrics.of(broker.core, broker.clock)
        rounds = m.registry.get_sample_value("tangram_scheduler_round_seconds_count")
        assert rounds is not None and rounds < n / 4, rounds
    if not journal:
        return
    # Durable: a new server on the same directory has every lease back.
    app2 = create_app(cfg, data_dir=tmp_path)
    async with app2.router.lifespan_context(app2):
        assert app2.state.service.broker.snapshot()["pools"]["api"]["in_use"] == n


async def test_long_poll_ends_by_grant_when_the_holder_releases(http):
    first = await grant(http, api("lp1"))

    async def later() -> None:
        await asyncio.sleep(0.2)
        await release(http, first["lease"]["id"])

    t0 = time.monotonic()
    task = asyncio.create_task(later())
    r = await http.post("/v1/actions", json=api("lp2"), params={"wait": 5})
    took = time.monotonic() - t0
    await task
    assert r.status_code == 200 and r.json()["state"] == "granted"
    assert 0.15 < took < 4  # generous: this machine is shared
    await release(http, r.json()["lease"]["id"])


async def test_long_poll_ends_by_timeout_and_the_action_stays_queued(http):
    first = await grant(http, api("to1"))
    t0 = time.monotonic()
    r = await http.post("/v1/actions", json=api("to2"), params={"wait": 0.3})
    assert r.status_code == 202 and 0.25 < time.monotonic() - t0 < 4
    aid = r.json()["id"]
    r = await http.get(f"/v1/actions/{aid}", params={"wait": 0.2})
    assert r.status_code == 200 and r.json()["state"] == "queued"
    await release(http, first["lease"]["id"])
    r = await http.get(f"/v1/actions/{aid}", params={"wait": 5})
    assert r.json()["state"] == "granted"
    await release(http, r.json()["lease"]["id"])
    r = await http.get(f"/v1/actions/{aid}")
    assert r.json()["state"] == "released"


async def test_idempotency_key_returns_the_same_action(http):
    hdr = {"Idempotency-Key": "k-same"}
    a = await http.post("/v1/actions", json=api("idem"), headers=hdr, params={"wait": 5})
    b = await http.post("/v1/actions", json=api("idem"), headers=hdr, params={"wait": 5})
    assert a.status_code == b.status_code == 200
    assert a.json()["id"] == b.json()["id"]
    assert a.json()["lease"]["id"] == b.json()["lease"]["id"]
    pools = (await http.get("/v1/pools")).json()
    assert pools["pools"]["api"]["in_use"] == 1  # one action, not two
    # The same key for another action is a client bug, said so.
    c = await http.post("/v1/actions", json=api("other"), headers=hdr)
    assert c.status_code == 409 and "different action" in c.json()["detail"]
    await release(http, a.json()["lease"]["id"])
    d = await http.post("/v1/actions", json=api("idem"), headers=hdr)
    assert d.status_code == 200 and d.json()["state"] == "released"


async def test_impossible_action_is_refused_with_the_cores_message(http):
    r = await http.post("/v1/actions", json={"trajectory": "x", "demands": {"cpu": 64}})
    assert r.status_code == 422
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["status"] == 422 and body["title"] == "Unprocessable Entity"
    assert "can never fit" in body["detail"] and "2 cores" in body["detail"]
    r = await http.post("/v1/actions", json={"trajectory": "x", "demands": {"gpu": 1}})
    assert r.status_code == 422 and "unknown pool 'gpu'" in r.json()["detail"]
    r = await http.post(
        "/v1/actions", json={"trajectory": "x", "demands": {"cpu": 1}, "key": "api"}
    )
    assert r.status_code == 422 and "key resource" in r.json()["detail"]


@pytest.mark.parametrize(
    ("content", "where"),
    [
        (b"{not json", "body"),
        (b'{"demands": {"cpu": 1}}', "body.trajectory"),
        (b'{"trajectory": "t", "demands": {"cpu": 0}}', "body.demands"),
        (b'{"trajectory": "t", "demands": {"cpu": 1}, "duration": -1}', "body.duration"),
        (b'{"trajectory": "t", "demands": {"cpu": 1}, "colour": "red"}', "body.colour"),
        (b"[]", "body"),
        (b'{"trajectory": "t", "demands": {"cpu": true}}', "body.demands.cpu.amount"),
        (b'{"trajectory": "t", "demands": {"cpu": {"min": 1}}}', "body.demands.cpu.range.max"),
        (b"", "body: Field required"),
    ],
)
async def test_malformed_requests_get_a_problem_naming_the_field(http, content, where):
    r = await http.post(
        "/v1/actions", content=content, headers={"content-type": "application/json"}
    )
    assert r.status_code == 422
    assert r.headers["content-type"] == "application/problem+json"
    assert where in r.json()["detail"]


async def test_bad_wait_and_unknown_paths_are_problems_not_crashes(http):
    r = await http.post("/v1/actions", json=api(), params={"wait": "soon"})
    assert r.status_code == 422 and "query.wait" in r.json()["detail"]
    r = await http.post("/v1/actions", json=api(), params={"wait": "nan"})
    assert r.status_code == 422
    r = await http.get("/v2/nothing")
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
    r = await http.put("/v1/actions")
    assert r.status_code == 405 and r.json()["status"] == 405


# --------------------------------------------------------------------------- actions


async def test_get_unknown_action_is_404(http):
    r = await http.get("/v1/actions/nope")
    assert r.status_code == 404 and "no action 'nope'" in r.json()["detail"]


async def test_cancel_queued_action_then_409_for_a_granted_one(http):
    first = await grant(http, api("c1"))
    queued = (await http.post("/v1/actions", json=api("c2"))).json()
    r = await http.delete(f"/v1/actions/{queued['id']}")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    again = await http.delete(f"/v1/actions/{queued['id']}")
    assert again.status_code == 200 and again.json()["state"] == "cancelled"
    r = await http.delete(f"/v1/actions/{first['id']}")
    assert r.status_code == 409 and "release the lease" in r.json()["detail"]
    assert (await http.delete("/v1/actions/a999999")).status_code == 404
    await release(http, first["lease"]["id"])


async def test_close_trajectory_cancels_its_queued_actions(http):
    first = await grant(http, api("other-traj"))
    q = (await http.post("/v1/actions", json=api("closing"))).json()
    r = await http.post("/v1/trajectories/closing/close")
    assert r.status_code == 200 and r.json() == {"trajectory": "closing", "cancelled": 1}
    assert (await http.get(f"/v1/actions/{q['id']}")).json()["state"] == "cancelled"
    await release(http, first["lease"]["id"])


# --------------------------------------------------------------------------- leases


async def test_release_is_idempotent_and_unknown_lease_is_404(http):
    data = await grant(http, api("r1"))
    lid = data["lease"]["id"]
    r1 = await http.post(f"/v1/leases/{lid}/release", json={"outcome": "error"})
    r2 = await http.post(f"/v1/leases/{lid}/release")
    assert r1.status_code == r2.status_code == 200
    assert r2.json() == {**r1.json(), "state": "released"}
    assert (await http.post("/v1/leases/l999999/release")).status_code == 404
    hb = await http.post(f"/v1/leases/{lid}/heartbeat")
    assert hb.status_code == 409 and "already released" in hb.json()["detail"]


async def test_release_reports_token_usage(http):
    data = await grant(http, api("u1"))
    r = await http.post(
        f"/v1/leases/{data['lease']['id']}/release",
        json={"outcome": "ok", "usage": {"tokens": 120, "seconds": 1.5}},
    )
    assert r.status_code == 200


async def test_heartbeat_extends_and_expiry_returns_units(http):
    data = await grant(http, api("hb", ttl=1.0))
    lid = data["lease"]["id"]
    for _ in range(6):  # kept alive past its TTL by heartbeats
        await asyncio.sleep(0.25)
        r = await http.post(f"/v1/leases/{lid}/heartbeat")
        assert r.status_code == 200, r.text
    assert r.json()["expires_at"] > data["lease"]["expires_at"]
    r = await http.post(f"/v1/leases/{lid}/heartbeat", json={"ttl": 0.2})
    assert r.status_code == 200 and r.json()["ttl"] == 0.2
    # The client "crashes": no more heartbeats. The units come back by themselves.
    for _ in range(100):
        await asyncio.sleep(0.05)
        pools = (await http.get("/v1/pools")).json()
        if pools["pools"]["api"]["in_use"] == 0:
            break
    assert pools["pools"]["api"]["in_use"] == 0
    assert (await http.get(f"/v1/actions/{data['id']}")).json()["state"] == "expired"
    r = await http.post(f"/v1/leases/{lid}/heartbeat")
    assert r.status_code == 410 and r.headers["content-type"] == "application/problem+json"
    r = await release(http, lid)
    assert r.status_code == 410 and "expired" in r.json()["detail"]


async def test_an_expired_lease_lets_a_waiter_in(http):
    data = await grant(http, api("crash", ttl=0.3))
    t0 = time.monotonic()
    r = await http.post("/v1/actions", json=api("next"), params={"wait": 5})
    assert r.json()["state"] == "granted" and time.monotonic() - t0 < 4
    assert r.json()["lease"]["fencing_token"] > data["lease"]["fencing_token"]
    await release(http, r.json()["lease"]["id"])


async def test_no_unit_is_ever_held_by_two_leases(http, url):
    held: dict[int, str] = {}
    clash: list[tuple[int, str, str]] = []

    async def worker(i: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=10) as c:
            for j in range(15):
                body = {"trajectory": f"w{i}-{j}", "demands": {"cpu": 1 + (i + j) % 2}}
                r = await c.post("/v1/actions", json=body, params={"wait": 10})
                lease = r.json()["lease"]
                for u in lease["allocation"]["cpu"]["units"]:
                    if u in held:
                        clash.append((u, held[u], lease["id"]))
                    held[u] = lease["id"]
                await asyncio.sleep(0.001)
                for u in lease["allocation"]["cpu"]["units"]:
                    held.pop(u, None)
                await c.post(f"/v1/leases/{lease['id']}/release")

    await asyncio.gather(*(worker(i) for i in range(8)))
    assert clash == []
    assert (await http.get("/v1/pools")).json()["pools"]["cpu"]["in_use"] == 0


# --------------------------------------------------------------------------- observation


async def test_pools_health_and_readiness(http):
    r = await http.get("/v1/pools")
    assert r.status_code == 200
    body = r.json()
    assert body["policy"] == "tangram"
    cpu = body["pools"]["cpu"]
    assert cpu["kind"] == "cpu" and cpu["capacity"] == 2 and cpu["queued"] == 0
    assert cpu["topology"]["n"]["cores"] == 2
    assert body["pools"]["api"]["topology"]["concurrency"] == 1
    assert (await http.get("/healthz")).json() == {"status": "ok"}
    assert (await http.get("/readyz")).json() == {"status": "ready"}


async def test_openapi_describes_every_endpoint(http):
    doc = (await http.get("/openapi.json")).json()
    paths = {(p, m) for p, ops in doc["paths"].items() for m in ops}
    assert paths == {
        ("/v1/actions", "post"),
        ("/v1/actions/{action_id}", "get"),
        ("/v1/actions/{action_id}", "delete"),
        ("/v1/leases/{lease_id}/heartbeat", "post"),
        ("/v1/leases/{lease_id}/release", "post"),
        ("/v1/trajectories/{trajectory_id}/close", "post"),
        ("/v1/pools", "get"),
        ("/v1/status", "get"),
        ("/healthz", "get"),
        ("/readyz", "get"),
    }
    post = doc["paths"]["/v1/actions"]["post"]
    assert set(post["responses"]) == {"200", "202", "409", "422", "429", "503"}
    assert "application/problem+json" in post["responses"]["422"]["content"]
    assert "securitySchemes" not in doc.get("components", {})  # no tenants here


async def test_openapi_operation_ids_tags_and_submit_example(http):
    doc = (await http.get("/openapi.json")).json()
    ops = {op["operationId"]: op for ops in doc["paths"].values() for op in ops.values()}
    assert set(ops) == {
        "submitAction",
        "getAction",
        "cancelAction",
        "heartbeatLease",
        "releaseLease",
        "closeTrajectory",
        "getPools",
        "getStatus",
        "liveness",
        "readiness",
    }
    tags = [t["name"] for t in doc["tags"]]
    assert tags == ["actions", "leases", "trajectories", "pools", "health"]
    assert all(len(op["tags"]) == 1 and op["tags"][0] in tags for op in ops.values())
    assert ops["releaseLease"]["tags"] == ["leases"]
    examples = ops["submitAction"]["requestBody"]["content"]["application/json"]["examples"]
    for ex in examples.values():  # every example is a body the server takes
        r = await http.post("/v1/actions", json=ex["value"])
        assert r.status_code in (200, 202), r.text
        if r.status_code == 200:
            await release(http, r.json()["lease"]["id"])
        else:
            assert (await http.delete(f"/v1/actions/{r.json()['id']}")).status_code == 200


async def test_an_app_can_serve_a_broker_shared_with_another_door():
    from tangram.broker import Broker

    cfg = parse_config({"pools": POOLS})
    broker = Broker.from_config(cfg)
    app = create_app(cfg, broker=broker)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        r = await c.post("/v1/actions", json=api("shared"), params={"wait": 1})
        assert r.json()["state"] == "granted"
        assert broker.snapshot()["pools"]["api"]["in_use"] == 1  # the very same broker
        await c.post(f"/v1/leases/{r.json()['lease']['id']}/release")
    assert broker.snapshot()["pools"]["api"]["in_use"] == 0
    await broker.close()
