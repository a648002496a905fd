"""``promtool check metrics`` on a real scrape: a broker served by uvicorn on loopback, a
small load over every pool kind (a cpu pool, a gpu pool with a service, a quota pool with
a window and a tokens-per-minute limit: grants, releases, an expiry, a refusal), then
``GET /metrics`` piped to promtool, which must find nothing to say about names, help
texts, types or units. Skipped, saying so, where promtool is not installed (.ci/run
installs it)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tangram.config import parse_config
from tangram.server import LiveServer, create_app

POOLS: dict[str, Any] = {
    "cpu": {"kind": "cpu", "nodes": [{"name": "n0", "cores": 4, "numa": 2, "memory_gb": 8}]},
    "gpu": {
        "kind": "gpu",
        "nodes": [{"name": "g0", "gpus": 2, "memory_gb": 10}],
        "services": {"judge": {"memory_gb": 8, "restore_seconds": 0.05, "parallelism": [1]}},
    },
    "search": {
        "kind": "quota",
        "concurrency": 2,
        "window": {"limit": 10, "seconds": 60},
        "tokens_per_minute": 100000,
        "default_tokens": 100,
    },
}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip(
            "PROMTOOL MISSING: `promtool check metrics` did not run (install Debian's "
            "prometheus package; .ci/run does)"
        )
    return path


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    cfg = parse_config({"pools": POOLS, "lease_ttl_seconds": 30})
    with LiveServer(create_app(cfg)) as u:
        yield u


def grant(c: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    r = c.post("/v1/actions", params={"wait": 10}, json=body)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    assert out["state"] == "granted", out
    return out["lease"]  # type: ignore[no-any-return]


def expired(text: str) -> float:
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "tangram_actions_expired_total"
    )


def drive_load(url: str) -> None:
    with httpx.Client(base_url=url, timeout=30.0) as c:
        for i in range(3):
            cpu = {"trajectory": f"t{i}", "task": "coding",
                   "demands": {"cpu": {"min": 1, "max": 2}}, "key": "cpu",
                   "duration": 0.05, "efficiency": {"amdahl": 0.9}}  # fmt: skip
            lease = grant(c, cpu)
            c.post(f"/v1/leases/{lease['id']}/release", json={"outcome": "ok"})
        gpu = {"trajectory": "g", "task": "reward", "demands": {"gpu": 1}, "service": "judge"}
        lease = grant(c, gpu)
        c.post(f"/v1/leases/{lease['id']}/release", json={"outcome": "ok"})
        for i in range(2):
            q = {"trajectory": f"q{i}", "task": "search", "demands": {"search": 1}, "tokens": 100}
            lease = grant(c, q)
            c.post(
                f"/v1/leases/{lease['id']}/release",
                json={"outcome": "ok", "usage": {"tokens": 120}},
            )
        refused = c.post("/v1/actions", json={"trajectory": "x", "demands": {"cpu": 64}})
        assert refused.status_code == 422, refused.text
        # A lease whose holder "dies": a 1 s TTL, no heartbeat, no release.
        grant(c, {"trajectory": "dies", "task": "coding", "demands": {"cpu": 1}, "ttl": 1})
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            time.sleep(0.3)
            if expired(c.get("/metrics").text) > 0:
                break
        assert expired(c.get("/metrics").text) > 0, "the 1 s lease did not expire"


def test_promtool_finds_nothing_wrong_with_a_real_scrape(url: str) -> None:
    tool = promtool()
    drive_load(url)
    text = httpx.get(url + "/metrics", timeout=10.0).text
    for pool in POOLS:  # the load reached every pool kind
        assert f'pool="{pool}"' in text, pool
    problems = check(tool, text)
    assert not problems, problems


def check(tool: str, text: str) -> str:
    """What promtool says about ``text``: one line per lint problem (exit 3) or a parse
    error (exit 1); empty when it passes."""
    res = subprocess.run(
        [tool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    out = (res.stdout + res.stderr).strip()
    return out or ("" if res.returncode == 0 else f"promtool exited {res.returncode}")


def test_promtool_does_complain_about_a_bad_exposition() -> None:
    """The check above can fail: a metric without help text is reported."""
    assert "no help text" in check(promtool(), "# TYPE bar gauge\nbar 1\n")
