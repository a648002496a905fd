"""End to end against a real Prometheus: `tangram serve` and Prometheus on loopback,
a small load through the HTTP API, then every PromQL expression of every dashboard panel
and every rule (template variables substituted) must return data."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"

CONFIG = {
    "lease_ttl_seconds": 30,
    "pools": {
        "cpu": {"kind": "cpu", "nodes": [{"name": "n0", "cores": 4, "numa": 2, "memory_gb": 8}]},
        "gpu": {
            "kind": "gpu",
            "nodes": [{"name": "g0", "gpus": 2, "memory_gb": 10}],
            "services": {
                "judge": {"memory_gb": 8, "restore_seconds": 0.5, "parallelism": [1]},
                "critic": {"memory_gb": 8, "restore_seconds": 0.5, "parallelism": [1]},
            },
        },
        "search": {
            "kind": "quota",
            "concurrency": 2,
            "rate": {"per_second": 4, "burst": 1},
            "tokens_per_minute": 100000,
            "default_tokens": 100,
        },
    },
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", "prometheus"],
            env=env, capture_output=True, timeout=900,
        )  # fmt: skip
        path = shutil.which("prometheus")
    if path is None:
        pytest.skip(
            "PROMETHEUS MISSING AND NOT INSTALLABLE HERE: the end-to-end metrics test did "
            "not run (install Debian's prometheus package)"
        )
    return path


def wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not come up")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    prom = prometheus_binary()
    tmp = tmp_path_factory.mktemp("prom")
    (tmp / "tangram.yaml").write_text(yaml.safe_dump(CONFIG))
    api_port, prom_port = free_port(), free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tangram.cli", "serve", "--config", str(tmp / "tangram.yaml"),
         "--host", "127.0.0.1", "--port", str(api_port), "--data-dir", str(tmp / "data")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    # The shipped Prometheus configuration, pointed at this server, scraping every second.
    pcfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    pcfg["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    pcfg["rule_files"] = [str(DEPLOY / "prometheus" / "rules.yml")]
    pcfg["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{api_port}"]}]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(pcfg))
    prometheus = subprocess.Popen(
        [prom, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        api, prom_url = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{prom_port}"
        wait_http(api + "/healthz")
        wait_http(prom_url + "/-/ready")
        yield api, prom_url
    finally:
        for p in (server, prometheus):
            p.terminate()
        for p in (server, prometheus):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def grant(c: httpx.Client, body: dict[str, Any], wait: float = 10.0) -> dict[str, Any]:
    r = c.post("/v1/actions", params={"wait": wait}, json=body)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    assert out["state"] == "granted"
    return out


def drive_load(api: str) -> None:
    """Touch every metric: elastic CPU actions, GPU restores, hits and evictions, quota
    throttling with token usage, a refusal, a cancellation, an expiry, an error outcome."""
    with httpx.Client(base_url=api, timeout=30.0) as c:
        for i in range(12):
            cpu = {"trajectory": f"t{i % 3}", "task": "coding",
                   "demands": {"cpu": {"min": 1, "max": 4}}, "key": "cpu",
                   "duration": 0.05, "efficiency": {"amdahl": 0.9}}  # fmt: skip
            lease = grant(c, cpu)["lease"]
            time.sleep(0.02)
            outcome = "error" if i == 5 else "ok"
            c.post(f"/v1/leases/{lease['id']}/release", json={"outcome": outcome})
        for i, service in enumerate(["judge", "critic", "judge", "judge", "critic"]):
            gpu = {"trajectory": f"g{i}", "task": "reward", "demands": {"gpu": 1},
                   "service": service, "duration": 0.05}  # fmt: skip
            lease = grant(c, gpu)["lease"]
            c.post(f"/v1/leases/{lease['id']}/release", json={"outcome": "ok"})
        for i in range(4):  # burst 1 at 4/s: all but the first wait for the bucket
            q = {"trajectory": f"q{i}", "task": "search", "demands": {"search": 1}, "tokens": 100}
            lease = grant(c, q)["lease"]
            c.post(f"/v1/leases/{lease['id']}/release",
                   json={"outcome": "ok", "usage": {"tokens": 120}})  # fmt: skip
        r = c.post("/v1/actions", json={"trajectory": "x", "demands": {"cpu": 64}})
        assert r.status_code == 422
        # Hold all 4 cores, queue one behind, cancel it.
        hog = grant(c, {"trajectory": "hog", "task": "coding", "demands": {"cpu": 4}})["lease"]
        queued = c.post("/v1/actions", json={"trajectory": "w", "task": "coding",
                                             "demands": {"cpu": 1}})  # fmt: skip
        assert queued.status_code == 202, queued.text
        time.sleep(1.5)  # a queue for a few scrapes
        assert c.delete(f"/v1/actions/{queued.json()['id']}").status_code in (200, 204)
        c.post(f"/v1/leases/{hog['id']}/release", json={"outcome": "ok"})
        # A lease whose holder "dies": a 1 s TTL and no heartbeat.
        dies = {"trajectory": "dies", "task": "coding", "demands": {"cpu": 1}, "ttl": 1}
        r = c.post("/v1/actions", params={"wait": 10}, json=dies)
        assert r.status_code == 200, r.text
        time.sleep(2.5)


def substitute(expr: str, instance: str) -> str:
    return (
        expr.replace("$__rate_interval", "1m")
        .replace("$instance", instance)
        .replace("$pool", ".*")
        .replace("$task", ".*")
        .replace("${datasource}", "")
    )


def expressions(instance: str) -> list[tuple[str, str]]:
    """Every dashboard query (panels and variables) and rule; ``instance`` is the broker
    the dashboards' ``instance`` variable picks (a regular expression)."""
    out: list[tuple[str, str]] = []
    for path in sorted((DEPLOY / "grafana" / "dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text())
        for var in dashboard["templating"]["list"]:  # label_values(SELECTOR, label)
            m = re.fullmatch(r"label_values\((.+), *(\w+)\)", var.get("definition", ""))
            if m:
                name = f"{path.stem} / variable {var['name']}"
                out.append((name, substitute(m.group(1), instance)))
        for panel in dashboard["panels"]:
            for t in panel["targets"]:
                out.append(
                    (
                        f"{path.stem} / {panel['title']} / {t['refId']}",
                        substitute(t["expr"], instance),
                    )
                )
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            expr = rule["expr"]
            if "alert" in rule:  # the measured quantity, without its threshold
                m = re.fullmatch(r"(.+) (>|<|>=|<=|==) [0-9.]+", expr)
                assert m, rule["alert"]
                expr = m.group(1)
            out.append((f"rule {rule.get('record') or rule.get('alert')}", expr))
    return out


def test_every_dashboard_and_rule_expression_returns_data(stack: tuple[str, str]) -> None:
    api, prom = stack
    drive_load(api)
    # The dashboards show the broker their instance variable names: this one (its
    # host:port as Grafana puts it in, unescaped; a "." matches itself too).
    exprs = expressions(api.split("//", 1)[1])
    assert len(exprs) > 40
    missing: list[str] = []
    deadline = time.monotonic() + 30.0
    pending = exprs
    while pending:  # give the scrapes and rule evaluations a few seconds to catch up
        missing = []
        for name, expr in pending:
            r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10.0)
            body = r.json()
            assert body["status"] == "success", f"{name}: {body}"
            if not body["data"]["result"]:
                missing.append(name)
        pending = [(n, e) for n, e in pending if n in missing]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert not missing, "no data for:\n  " + "\n  ".join(missing)
