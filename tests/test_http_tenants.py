"""Tenants: bearer tokens, isolation (another tenant's things are absent), queued bounds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tangram.config import ConfigError, load_config, parse_config
from tangram.server import LiveServer, create_app

A = "alice-token-0123456789"
B = "bob-token-0123456789ab"
POOLS: dict[str, Any] = {"api": {"kind": "quota", "concurrency": 1}}


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    cfg = parse_config(
        {
            "pools": POOLS,
            "server": {
                "tenants": {"alice": {"token": A, "max_queued": 2}, "bob": {"token": B}},
                "retry_after_seconds": 3,
            },
        }
    )
    with LiveServer(create_app(cfg)) as u:
        yield u


def client(url: str, token: str | None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(base_url=url, headers=headers, timeout=10)


def api(traj: str) -> dict[str, Any]:
    return {"trajectory": traj, "demands": {"api": 1}}


@pytest.mark.parametrize("token", [None, "wrong-token-0123456789"])
async def test_every_v1_call_needs_a_tenant_token(url, token):
    async with client(url, token) as c:
        for method, path in [
            ("POST", "/v1/actions"),
            ("GET", "/v1/actions/a1"),
            ("DELETE", "/v1/actions/a1"),
            ("POST", "/v1/leases/l1/heartbeat"),
            ("POST", "/v1/leases/l1/release"),
            ("POST", "/v1/trajectories/t/close"),
            ("GET", "/v1/pools"),
        ]:
            body = api("t") if path == "/v1/actions" else None
            r = await c.request(method, path, json=body)
            assert r.status_code == 401, (method, path, r.text)
            assert r.headers["content-type"] == "application/problem+json"
            assert r.headers["www-authenticate"].startswith("Bearer")
        assert (await c.get("/healthz")).status_code == 200  # probes stay open


async def test_a_tenant_cannot_see_or_touch_another_tenants_actions(url):
    async with client(url, A) as alice, client(url, B) as bob:
        r = await alice.post("/v1/actions", json=api("t"), params={"wait": 5})
        action, lease = r.json()["id"], r.json()["lease"]["id"]
        queued = (await bob.post("/v1/actions", json=api("t"))).json()["id"]
        for method, path in [
            ("GET", f"/v1/actions/{action}"),
            ("DELETE", f"/v1/actions/{action}"),
            ("POST", f"/v1/leases/{lease}/heartbeat"),
            ("POST", f"/v1/leases/{lease}/release"),
        ]:
            r = await bob.request(method, path)
            assert r.status_code == 404, (method, path)
            assert "for tenant 'bob'" in r.json()["detail"]
        assert (await alice.get(f"/v1/actions/{queued}")).status_code == 404
        # Same trajectory name, different tenants: closing bob's "t" leaves alice's alone.
        r = await bob.post("/v1/trajectories/t/close")
        assert r.json() == {"trajectory": "t", "cancelled": 1}
        r = await alice.get(f"/v1/actions/{action}")
        assert r.json()["state"] == "granted" and r.json()["trajectory"] == "t"
        assert (await alice.post(f"/v1/leases/{lease}/release")).status_code == 200
        # Idempotency keys are per tenant too.
        k = {"Idempotency-Key": "shared-key"}
        ra = await alice.post("/v1/actions", json=api("k"), headers=k, params={"wait": 5})
        rb = await bob.post("/v1/actions", json=api("other"), headers=k)
        assert rb.status_code == 202 and rb.json()["id"] != ra.json()["id"]
        await alice.post(f"/v1/leases/{ra.json()['lease']['id']}/release")
        rb = await bob.get(f"/v1/actions/{rb.json()['id']}", params={"wait": 5})
        await bob.post(f"/v1/leases/{rb.json()['lease']['id']}/release")


async def test_queued_bound_answers_429_with_retry_after(url):
    async with client(url, A) as alice, client(url, B) as bob:
        holder = (await bob.post("/v1/actions", json=api("h"), params={"wait": 5})).json()
        ids = []
        for i in range(2):
            r = await alice.post("/v1/actions", json=api(f"q{i}"))
            assert r.status_code == 202
            ids.append(r.json()["id"])
        r = await alice.post("/v1/actions", json=api("q2"))
        assert r.status_code == 429
        assert r.headers["retry-after"] == "3"
        assert "bound is 2" in r.json()["detail"]
        # Refused by the core, so counted like every other refusal.
        metrics = (await alice.get("/metrics")).text
        assert 'tangram_actions_refused_total{reason="queue_full",tenant="alice"} 1.0' in metrics
        # The bound is per tenant: bob still gets in.
        assert (await bob.post("/v1/actions", json=api("b"))).status_code == 202
        # A retried submit of an action already queued is not a new one: no 429.
        k = {"Idempotency-Key": "retry-me"}
        await alice.delete(f"/v1/actions/{ids.pop()}")
        first = await alice.post("/v1/actions", json=api("k"), headers=k)
        again = await alice.post("/v1/actions", json=api("k"), headers=k)
        assert first.status_code == again.status_code == 202
        await bob.post("/v1/trajectories/b/close")
        await bob.post(f"/v1/leases/{holder['lease']['id']}/release")
        for aid in [*ids, first.json()["id"]]:
            r = await alice.get(f"/v1/actions/{aid}", params={"wait": 5})
            if r.json()["state"] == "granted":
                await alice.post(f"/v1/leases/{r.json()['lease']['id']}/release")


async def test_openapi_declares_bearer_auth_and_401(url):
    async with client(url, None) as c:
        doc = (await c.get("/openapi.json")).json()
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    op = doc["paths"]["/v1/actions"]["post"]
    assert op["security"] == [{"bearer": []}] and "401" in op["responses"]
    assert "security" not in doc["paths"]["/healthz"]["get"]


def test_tokens_file_is_read_relative_to_the_config(tmp_path: Path):
    (tmp_path / "tokens").write_text(
        "# tenant token [max queued]\nteam-a aaaaaaaaaaaaaaaaaaaa 5\nteam-b bbbbbbbbbbbbbbbbbbbb\n"
    )
    (tmp_path / "pools.yaml").write_text(
        "pools:\n  api: {kind: quota}\nserver:\n  tokens_file: tokens\n  max_queued: 7\n"
    )
    tenants = load_config(tmp_path / "pools.yaml").tenants()
    assert {n: t.max_queued for n, t in tenants.items()} == {"team-a": 5, "team-b": 7}
    assert "aaaa" not in repr(tenants["team-a"])  # tokens stay out of logs


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("team-a short\n", "under 16 characters"),
        ("team-a aaaaaaaaaaaaaaaaaaaa\nteam-a bbbbbbbbbbbbbbbbbbbb\n", "listed twice"),
        ("team-a aaaaaaaaaaaaaaaaaaaa\nteam-b aaaaaaaaaaaaaaaaaaaa\n", "share a token"),
        ("team-a aaaaaaaaaaaaaaaaaaaa many\n", "TENANT TOKEN"),
        ("team/a aaaaaaaaaaaaaaaaaaaa\n", "must be letters"),
    ],
)
def test_bad_tokens_files_are_refused_with_the_line(tmp_path: Path, text: str, message: str):
    (tmp_path / "tokens").write_text(text)
    cfg = parse_config({"pools": POOLS, "server": {"tokens_file": str(tmp_path / "tokens")}})
    with pytest.raises(ConfigError, match=message):
        cfg.tenants()


def test_missing_tokens_file_is_a_config_error():
    cfg = parse_config({"pools": POOLS, "server": {"tokens_file": "/nonexistent/tokens"}})
    with pytest.raises(ConfigError, match="cannot read"):
        cfg.tenants()
