"""The HTTP server's metrics, scraped from a real server: request metrics labelled by
route template (the hand-read hot routes included), every refused submit counted with
its reason, build information, no ``*_created`` series, quota availability by unit."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import tangram
from tangram.config import parse_config
from tangram.server import LiveServer, create_app

A = "alice-token-0123456789"
B = "bob-token-0123456789ab"
POOLS: dict[str, Any] = {
    "api": {"kind": "quota", "concurrency": 1, "tokens_per_minute": 6000},
    "cpu": {"kind": "cpu", "nodes": [{"name": "n", "cores": 2, "memory_gb": 8}]},
}


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name, frozenset(s.labels.items())] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    cfg = parse_config({"pools": POOLS, "lease_ttl_seconds": 30})
    with LiveServer(create_app(cfg)) as u:
        yield u


def test_every_matched_request_is_labelled_with_its_route_template(url: str) -> None:
    with httpx.Client(base_url=url, timeout=10) as c:
        r = c.post(
            "/v1/actions", params={"wait": 5}, json={"trajectory": "r", "demands": {"api": 1}}
        )
        assert r.status_code == 200, r.text
        action, lease = r.json()["id"], r.json()["lease"]["id"]
        assert c.post(f"/v1/leases/{lease}/heartbeat").status_code == 200
        assert c.get(f"/v1/actions/{action}").status_code == 200
        assert c.post(f"/v1/leases/{lease}/release").status_code == 200
        assert c.post("/v1/leases/l-nope/release").status_code == 404  # matched: a template
        assert c.put("/v1/actions").status_code == 405  # matched too, by path
        assert c.get("/metrics").status_code == 200
        assert c.get("/no/such/path").status_code == 404
        text = c.get("/metrics").text
    req = "tangram_http_requests_total"
    assert value(text, req, method="POST", route="/v1/actions", status="200") == 1
    release = "/v1/leases/{lease_id}/release"
    assert value(text, req, method="POST", route=release, status="200") == 1
    assert value(text, req, method="POST", route=release, status="404") == 1
    assert value(text, req, method="POST", route="/v1/leases/{lease_id}/heartbeat", status="200")
    assert value(text, req, method="GET", route="/v1/actions/{action_id}", status="200") == 1
    assert value(text, req, method="PUT", route="/v1/actions", status="405") == 1
    assert value(text, req, method="GET", route="/metrics", status="200") >= 1
    # Only the request no route matched is "unmatched".
    unmatched = {
        dict(labels)["status"]: v
        for (name, labels), v in samples(text).items()
        if name == req and dict(labels)["route"] == "unmatched"
    }
    assert unmatched == {"404": 1}
    hist = "tangram_http_request_duration_seconds_count"
    assert value(text, hist, method="POST", route="/v1/actions") == 1
    assert value(text, hist, method="POST", route=release) == 2


def test_build_info_no_created_series_and_quota_availability_by_unit(url: str) -> None:
    text = httpx.get(url + "/metrics", timeout=10).text
    assert value(text, "tangram_build_info", version=tangram.__version__) == 1
    assert "_created" not in text
    names = {name for name, _ in samples(text)}
    assert "tangram_quota_available" not in names  # no name mixes permits and tokens
    assert value(text, "tangram_quota_available_permits", pool="api", limit="concurrency") == 1
    assert value(text, "tangram_quota_available_tokens", pool="api") == 6000


def test_every_refused_submit_is_counted_with_its_reason() -> None:
    cfg = parse_config(
        {
            "pools": POOLS,
            "server": {
                "tenants": {"alice": {"token": A, "max_queued": 1}, "bob": {"token": B}},
                "max_body_bytes": 2000,
            },
        }
    )
    with (
        LiveServer(create_app(cfg)) as url,
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {A}"}, timeout=10) as c,
    ):
        ok = {"trajectory": "t", "demands": {"api": 1}}
        refusals = [
            # (answer, reason) for every way a submit is refused
            (c.post("/v1/actions", json={"trajectory": "t"}), 422, "malformed"),
            (c.post("/v1/actions", content=b"{no", headers={"content-type": "application/json"}),
             422, "malformed"),
            (c.post("/v1/actions", params={"wait": "soon"}, json=ok), 422, "malformed"),
            (c.post("/v1/actions", json={"trajectory": "t", "demands": {"tpu": 1}}),
             422, "unknown_pool"),
            (c.post("/v1/actions", json={"trajectory": "t", "demands": {"cpu": 9}}),
             422, "never_fits"),
            (httpx.post(url + "/v1/actions", json=ok), 401, "unauthorized"),
            (c.post("/v1/actions", json={**ok, "task": "x" * 3000}), 413, "too_large"),
            # Chunked: no Content-Length, refused once the bytes pass the limit.
            (c.post("/v1/actions", content=iter([b'{"task": "', b"x" * 3000, b'"}']),
                    headers={"content-type": "application/json"}), 413, "too_large"),
        ]  # fmt: skip
        held = c.post("/v1/actions", json=ok, params={"wait": 5})
        assert held.status_code == 200, held.text
        queued = c.post("/v1/actions", json=ok, headers={"Idempotency-Key": "k1"})
        assert queued.status_code == 202, queued.text
        refusals += [
            (c.post("/v1/actions", json=ok), 429, "queue_full"),  # alice's bound is 1
            (c.post("/v1/actions", json={**ok, "task": "other"},
                    headers={"Idempotency-Key": "k1"}), 409, "idempotency_key_reused"),
        ]  # fmt: skip
        for r, status, reason in refusals:
            assert r.status_code == status, (reason, r.text)
        text = c.get("/metrics").text
    counted = {
        (dict(labels)["reason"], dict(labels)["tenant"]): v
        for (name, labels), v in samples(text).items()
        if name == "tangram_actions_refused_total"
    }
    assert sum(counted.values()) == len(refusals), counted
    expect: dict[tuple[str, str], float] = {}
    for _, status, reason in refusals:
        tenant = "" if status == 401 else "alice"
        expect[reason, tenant] = expect.get((reason, tenant), 0) + 1
    assert counted == expect
