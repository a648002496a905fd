"""The Grafana dashboards and Prometheus files in deploy/ are well formed and only name
metrics that Tangram exports. (tests/test_prometheus_e2e.py runs them against a real
Prometheus.)"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tangram.config import parse_config
from tangram.metrics import Metrics
from tangram.server.app import create_app

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
RULES = DEPLOY / "prometheus" / "rules.yml"
METRIC = re.compile(r"\b(tangram_[a-z_]+|process_[a-z_]+)\b")


def dashboard_exprs() -> list[tuple[str, str]]:
    out = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                out.append((f"{path.name}: {panel['title']}", target["expr"]))
    return out


def rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def test_there_are_four_dashboards() -> None:
    assert {p.stem for p in DASHBOARDS} == {
        "tangram-overview", "tangram-gpu", "tangram-quota", "tangram-scheduler",
    }  # fmt: skip


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_a_valid_grafana_dashboard(path: Path) -> None:
    d = json.loads(path.read_text())
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
    assert d["uid"] and d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("pool", "task"):
        assert variables[name]["type"] == "query"
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in d["panels"]:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], f"{p['title']} has no query"
        for t in p["targets"]:
            assert t["expr"].strip() and t["refId"]
            assert t["datasource"]["uid"] == "${datasource}"
        pos = p["gridPos"]
        assert pos["w"] > 0 and pos["h"] > 0 and 0 <= pos["x"] < 24


def exported_names() -> set[str]:
    cfg = parse_config(
        {
            "pools": {
                "cpu": {"kind": "cpu", "nodes": [{"cores": 2, "memory_gb": 1}]},
                "gpu": {"kind": "gpu", "nodes": [{"gpus": 2}]},
                "api": {"kind": "quota", "concurrency": 1},
            }
        }
    )
    app = create_app(cfg)  # the server adds its request metrics to the same registry
    m = Metrics.of(app.state.service.broker.core, lambda: 0.0)
    names = set()
    for line in m.exposition().decode().splitlines():
        if line.startswith("# TYPE"):
            name, kind = line.split()[2:4]
            names.add(name)
            if kind == "counter":
                names.add(name + "_total")
            if kind == "histogram":
                names.update(name + s for s in ("_bucket", "_sum", "_count"))
    return names


def test_dashboards_and_rules_only_use_exported_metrics() -> None:
    names = exported_names()
    used = {n for _, e in dashboard_exprs() for n in METRIC.findall(e)}
    used |= {n for r in rules() for n in METRIC.findall(r["expr"])}
    assert used, "no metric names found"
    assert used <= names, f"not exported: {sorted(used - names)}"
    recorded = {r["record"] for r in rules() if "record" in r}
    for r in rules():
        for ref in re.findall(r"\btangram:[a-z_0-9:]+", r["expr"]):
            assert ref in recorded, f"{ref} is not a recording rule"


def test_every_alert_is_expression_op_threshold() -> None:
    alerts = [r for r in rules() if "alert" in r]
    assert len(alerts) >= 5
    for r in alerts:
        assert re.fullmatch(r".+ (>|<|>=|<=|==) [0-9.]+", r["expr"]), r["alert"]
        assert r["annotations"]["summary"]


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip(
            "PROMTOOL MISSING: install Debian's prometheus package (.ci/run does) to "
            "check the Prometheus files"
        )
    return path


def test_promtool_accepts_config_and_rules() -> None:
    tool = promtool()
    for args in (["check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
                 ["check", "rules", str(RULES)]):  # fmt: skip
        out = subprocess.run([tool, *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr


# ---- runbooks, one broker per dashboard, links between the dashboards ----------------

OBSERVABILITY = DEPLOY.parent / "docs" / "observability.md"


def slug(heading: str) -> str:
    """The anchor GitHub (and most Markdown renderers) give a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def runbook_anchors() -> dict[str, str]:
    """Headings of the "Runbooks" section of docs/observability.md, by anchor."""
    text = OBSERVABILITY.read_text()
    m = re.search(r"^## Runbooks\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, "docs/observability.md has no Runbooks section"
    return {slug(h): h for h in re.findall(r"^### (.+)$", m.group(1), re.M)}


def test_every_alert_has_a_description_and_a_runbook_in_the_docs() -> None:
    anchors = runbook_anchors()
    alerts = [r for r in rules() if "alert" in r]
    for r in alerts:
        ann = r["annotations"]
        assert len(ann.get("description", "")) > 40, r["alert"]
        url = ann.get("runbook_url", "")
        assert re.fullmatch(r"https://\S+/observability(\.md)?#[\w-]+", url), url
        anchor = url.split("#", 1)[1]
        assert anchor == slug(r["alert"]), (r["alert"], url)
        assert anchor in anchors, f"{r['alert']}: no runbook heading #{anchor}"
    # One runbook per alert, no stale ones.
    assert set(anchors) == {slug(r["alert"]) for r in alerts}


def test_rules_keep_each_broker_apart() -> None:
    """Two brokers scraped by one Prometheus: every aggregation in the rules keeps
    ``job`` and ``instance``, so recorded series and alerts are per broker, never sums."""
    for r in rules():
        clauses = re.findall(r"\b(by|on)\s*\(([^)]*)\)", r["expr"])
        if "sum" in r["expr"] or "on (" in r["expr"]:
            assert clauses, r
        for _, labels in clauses:
            names = {x.strip() for x in labels.split(",")}
            assert {"job", "instance"} <= names, (r.get("record") or r.get("alert"), labels)


SELECTOR = re.compile(r"\b((?:tangram|process)_[a-z_]+)(\{[^}]*\})?")


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_shows_one_broker_and_links_to_the_others(path: Path) -> None:
    d = json.loads(path.read_text())
    variables = {v["name"]: v for v in d["templating"]["list"]}
    inst = variables["instance"]
    assert inst["type"] == "query" and not inst.get("multi") and not inst.get("includeAll")
    assert inst["datasource"]["uid"] == "${datasource}"
    assert "tangram_build_info" in inst["definition"]
    for name in ("pool", "task"):  # their values are the chosen broker's
        assert 'instance=~"$instance"' in variables[name]["definition"]
    for p in d["panels"]:
        for t in p["targets"]:
            for metric, selector in SELECTOR.findall(t["expr"]):
                assert selector and 'instance=~"$instance"' in selector, (p["title"], metric)
    assert "tangram" in d["tags"]
    links = [link for link in d["links"] if link["type"] == "dashboards"]
    assert links, "no links to the other dashboards"
    for link in links:
        assert link["tags"] == ["tangram"] and link["includeVars"] and link["keepTime"]
    others = {json.loads(p.read_text())["uid"] for p in DASHBOARDS} - {d["uid"]}
    tagged = {json.loads(p.read_text())["uid"] for p in DASHBOARDS
              if "tangram" in json.loads(p.read_text())["tags"]}  # fmt: skip
    assert others <= tagged
