"""The deployment files (Dockerfile, deploy/compose.yaml, deploy/kuberay/) lint clean,
validate offline and only name files that exist; the image's entrypoint serves the API.

Building and running the image itself is `make test-image` (deploy/image/test-image.sh):
it needs root, podman and minutes, so it is not part of this fast suite.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tangram.config import load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBERAY = DEPLOY / "kuberay"
IMAGE = DEPLOY / "image"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
SCHEMA = KUBERAY / "schema" / "raycluster.ray.io_v1.subset.json"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """A dev-extra command line tool, from this interpreter's venv or the PATH."""
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]'")
    return found


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def one(path: Path) -> dict[str, Any]:
    (doc,) = docs(path)
    return doc


# ---- Dockerfile ------------------------------------------------------------------


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_passes_on_the_dockerfile() -> None:
    run = subprocess.run(
        [tool("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_dockerfile_is_multi_stage_on_a_python_base_and_runs_as_a_user() -> None:
    ins = instructions()
    args = [a for w, a in ins if w == "ARG"]
    assert "BASE=python:3.11-slim-bookworm" in args
    froms = [a for w, a in ins if w == "FROM"]
    assert froms == ["${BASE} AS build", "${BASE} AS runtime"]
    assert any(w == "COPY" and a.startswith("--from=build ") for w, a in ins)
    users = [a for w, a in ins if w == "USER"]
    # Numeric, so Kubernetes' runAsNonRoot can check it; the last USER is what runs.
    assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]), users
    assert "10001" in (KUBERAY / "raycluster.yaml").read_text()
    assert any(w == "VOLUME" and "/var/lib/tangram" in a for w, a in ins)
    health = [a for w, a in ins if w == "HEALTHCHECK"]
    assert len(health) == 1 and "tangram-healthcheck" in health[0]
    (entry,) = [a for w, a in ins if w == "ENTRYPOINT"]
    assert json.loads(entry) == ["/usr/local/bin/tangram-entrypoint"]


def dockerignore_keeps(path: str) -> bool:
    """Whether .dockerignore lets ``path`` into the build context (last match wins, as
    in Docker; enough of its syntax for this file: *, dir/, !negation)."""
    keep = True
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
        if re.fullmatch(f"{regex}(/.*)?", path):
            keep = neg
    return keep


def test_every_copied_file_exists_and_is_in_the_build_context() -> None:
    sources = []
    for word, arg in instructions():
        if word == "COPY" and not arg.startswith("--from"):
            sources += arg.split()[:-1]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), src
        assert dockerignore_keeps(src.rstrip("/")), f"{src} is excluded by .dockerignore"
    for src in ("tangram/server/app.py", "pyproject.toml"):
        assert dockerignore_keeps(src)
    for left_out in (".venv", ".git", "tests/test_deploy_files.py", "results"):
        assert not dockerignore_keeps(left_out), left_out
    assert os.access(IMAGE / "entrypoint.sh", os.X_OK)


# ---- the entrypoint, run on this machine ---------------------------------------------


def run_entrypoint(tmp: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    full = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **env}
    return subprocess.Popen(
        ["sh", str(IMAGE / "entrypoint.sh")],
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def test_entrypoint_serves_the_image_config_with_tokens_from_the_environment(
    tmp_path: Path,
) -> None:
    """The image's configuration, with its tokens_file moved to a temporary path (the
    image writes /run/tangram/tokens.txt), served as the entrypoint starts it."""
    cfg = yaml.safe_load((IMAGE / "tangram.yaml").read_text())
    tokens = tmp_path / "run" / "tokens.txt"
    cfg["server"]["tokens_file"] = str(tokens)
    (tmp_path / "tangram.yaml").write_text(yaml.safe_dump(cfg))
    token = "entrypoint-test-token-0123"
    proc = run_entrypoint(
        tmp_path,
        {
            "TANGRAM_CONFIG": str(tmp_path / "tangram.yaml"),
            "TANGRAM_TOKENS": f"alice {token};bob another-token-0123456789 5",
            "TANGRAM_TOKENS_FILE": str(tokens),
            "TANGRAM_HOST": "127.0.0.1",
            "TANGRAM_PORT": "0",
            "TANGRAM_DATA_DIR": str(tmp_path / "data"),
        },
    )
    try:
        info = tmp_path / "data" / "serve.json"
        deadline = time.monotonic() + 60
        while not info.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        url = json.loads(info.read_text())["url"]
        with urllib.request.urlopen(f"{url}/healthz", timeout=10) as r:
            assert r.status == 200
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(f"{url}/v1/pools", timeout=10)
        assert denied.value.code == 401
        req = urllib.request.Request(f"{url}/v1/pools")
        req.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(req, timeout=10) as r:
            assert set(json.loads(r.read())["pools"]) == {"cpu", "api"}
        assert tokens.read_text().splitlines() == [
            f"alice {token}",
            "bob another-token-0123456789 5",
        ]
        assert tokens.stat().st_mode & 0o077 == 0, "the tokens file is readable by others"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=30)


def test_entrypoint_refuses_without_a_configuration(tmp_path: Path) -> None:
    proc = run_entrypoint(tmp_path, {"TANGRAM_CONFIG": str(tmp_path / "missing.yaml")})
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "no configuration" in err and "deploy/README.md" in err


def test_image_config_needs_its_tenants(tmp_path: Path) -> None:
    """deploy/image/tangram.yaml parses; without the tokens file, tangram serve would
    stop with a clear error rather than serve 0.0.0.0 without tenants."""
    cfg = load_config(IMAGE / "tangram.yaml")
    assert cfg.server.tokens_file == "/run/tangram/tokens.txt"


# ---- YAML ---------------------------------------------------------------------------


def test_yamllint_passes_on_deploy() -> None:
    run = subprocess.run(
        # Relative paths from the root: .yamllint's ignore patterns are relative.
        [tool("yamllint"), "--strict", "-c", ".yamllint", "-f", "parsable", "deploy", ".yamllint"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr


# ---- compose ------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    return one(COMPOSE)


def test_compose_names_only_files_that_exist() -> None:
    doc = compose()
    assert set(doc["services"]) == {"tangram", "prometheus", "grafana"}
    named = set(doc.get("volumes", {}))
    mounts = 0
    for name, svc in doc["services"].items():
        build = svc.get("build")
        if build is not None:
            context = (COMPOSE.parent / build["context"]).resolve()
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if source.startswith((".", "/")):
                assert (COMPOSE.parent / source).exists(), f"{name} mounts {source}"
                mounts += 1
            else:
                assert source in named, f"{name}: volume {source} is not declared"
        for dep in svc.get("depends_on", []):
            assert dep in doc["services"]
    assert mounts >= 4


def mounts_of(service: str) -> dict[str, Path]:
    out = {}
    for vol in compose()["services"][service]["volumes"]:
        source, target = vol.split(":")[:2]
        if source.startswith("."):
            out[target] = (COMPOSE.parent / source).resolve()
    return out


def test_compose_wires_prometheus_to_tangram() -> None:
    svc = compose()["services"]["prometheus"]
    mounts = mounts_of("prometheus")
    (flag,) = [c for c in svc["command"] if c.startswith("--config.file=")]
    in_container = Path(flag.split("=", 1)[1])
    host = mounts[str(in_container.parent)] / in_container.name
    prom = yaml.safe_load(host.read_text())
    targets = [
        t for job in prom["scrape_configs"] for s in job["static_configs"] for t in s["targets"]
    ]
    port = compose()["services"]["tangram"]["ports"][0].split(":")[-1]
    assert targets == [f"tangram:{port}"]
    for rule_file in prom["rule_files"]:
        assert (host.parent / rule_file).is_file()
    # The observability tests' file keeps scraping localhost.
    assert "localhost:8000" in (DEPLOY / "prometheus" / "prometheus.yml").read_text()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_compose_prometheus_config() -> None:
    run = subprocess.run(
        ["promtool", "check", "config", str(DEPLOY / "prometheus" / "prometheus.compose.yml")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_compose_wires_grafana_to_its_provisioning() -> None:
    mounts = mounts_of("grafana")
    prov = mounts["/etc/grafana/provisioning"]
    (provider,) = one(prov / "dashboards" / "tangram.yaml")["providers"]
    dashboards = mounts[provider["options"]["path"]]
    assert sorted(dashboards.glob("*.json")), "no dashboard where the provider looks"
    (source,) = one(prov / "datasources" / "tangram.yaml")["datasources"]
    host = re.match(r"https?://([^:/]+)", source["url"])
    assert host is not None and host.group(1) in compose()["services"]


def test_compose_tangram_mounts_a_config_with_tenants() -> None:
    svc = compose()["services"]["tangram"]
    mounts = mounts_of("tangram")
    cfg = load_config(mounts["/etc/tangram/tangram.yaml"])
    # The entrypoint writes TANGRAM_TOKENS to the default TANGRAM_TOKENS_FILE.
    assert cfg.server.tokens_file == "/run/tangram/tokens.txt"
    assert "TANGRAM_TOKENS" in svc["environment"]
    assert any(v.endswith(":/var/lib/tangram") for v in svc["volumes"])


# ---- Kubernetes -------------------------------------------------------------------


def kustomization() -> dict[str, Any]:
    return one(KUBERAY / "kustomization.yaml")


def kustomize_objects() -> list[dict[str, Any]]:
    """What `kubectl apply -k deploy/kuberay` applies: the resources and the generated
    ConfigMaps (built here as kustomize would, without the name hash it disables)."""
    k = kustomization()
    objs = [d for r in k["resources"] for d in docs(KUBERAY / r)]
    for gen in k["configMapGenerator"]:
        data = {Path(f).name: (KUBERAY / f).read_text() for f in gen["files"]}
        objs.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": gen["name"]},
                "data": data,
            }
        )
    return objs


def raycluster() -> dict[str, Any]:
    return one(KUBERAY / "raycluster.yaml")


def groups() -> list[tuple[str, dict[str, Any]]]:
    spec = raycluster()["spec"]
    return [("head", spec["headGroupSpec"])] + [
        (g["groupName"], g) for g in spec["workerGroupSpecs"]
    ]


def k8s_validate(obj: dict[str, Any]) -> None:
    # strict: unknown fields are errors, as with `kubectl apply --validate=strict`.
    kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)


def test_kustomization_names_only_files_that_exist() -> None:
    k = kustomization()
    for name in k["resources"] + [f for g in k["configMapGenerator"] for f in g["files"]]:
        assert (KUBERAY / name).is_file(), name
    # The extras are applied by hand (README): they exist too.
    for extra in ("podmonitor.yaml", "secret.example.yaml"):
        assert (KUBERAY / extra).is_file()


def test_core_kinds_validate_with_kubernetes_validate() -> None:
    objs = [*kustomize_objects(), one(KUBERAY / "secret.example.yaml")]
    kinds = sorted(o["kind"] for o in objs)
    assert kinds == ["ConfigMap", "ConfigMap", "RayCluster", "Secret", "Service"]
    for obj in objs:
        if obj["kind"] != "RayCluster":
            k8s_validate(obj)


@pytest.mark.parametrize("group", ["head", "sandbox", "gpu"])
def test_raycluster_pod_templates_validate_as_core_pod_templates(group: str) -> None:
    """The CRD embeds core/v1 PodTemplateSpec: each group's template is checked in full
    against the Kubernetes schema, as a PodTemplate."""
    template = dict(groups())[group]["template"]
    k8s_validate(
        {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": f"tangram-{group}"},
            "template": template,
        }
    )


def schema_errors(obj: dict[str, Any]) -> list[str]:
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)
    ]


def test_raycluster_validates_against_the_crd_schema() -> None:
    jsonschema.Draft7Validator.check_schema(json.loads(SCHEMA.read_text()))
    assert schema_errors(raycluster()) == []


def test_the_crd_schema_rejects_common_mistakes() -> None:
    """The schema has teeth: what KubeRay's API server would refuse, it refuses."""
    bad = raycluster()
    bad["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be a string
    assert any("num-cpus" in e for e in schema_errors(bad))
    bad = raycluster()
    del bad["spec"]["workerGroupSpecs"][0]["template"]
    assert schema_errors(bad)
    bad = raycluster()
    bad["spec"]["workerGroupSpecs"][0]["replica"] = 2  # a typo of replicas
    assert schema_errors(bad)
    bad = raycluster()
    bad["apiVersion"] = "ray.io/v1alpha1"
    assert schema_errors(bad)


def test_raycluster_has_the_broker_on_the_head_and_sandbox_and_gpu_workers() -> None:
    g = dict(groups())
    assert set(g) == {"head", "sandbox", "gpu"}
    assert "sandbox_node" in g["sandbox"]["rayStartParams"]["resources"]
    assert "gpu_node" in g["gpu"]["rayStartParams"]["resources"]
    gpu_limits = g["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(gpu_limits["nvidia.com/gpu"]) >= 1
    head = g["head"]["template"]
    assert head["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    (container,) = head["spec"]["containers"]
    assert container["command"][-1] == "/opt/tangram-kuberay/head.sh"
    env = {e["name"]: e["value"] for e in container["env"]}
    # start_broker.py waits for as many nodes as the worker groups start.
    assert int(env["TANGRAM_SANDBOX_NODES"]) == g["sandbox"]["replicas"]
    assert int(env["TANGRAM_GPU_NODES"]) == g["gpu"]["replicas"]
    assert {"name": "http", "containerPort": 8000} in container["ports"]


def test_head_mounts_what_the_kustomization_and_secret_provide() -> None:
    head = dict(groups())["head"]["template"]["spec"]
    volumes = {v["name"]: v for v in head["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    generated = {g["name"]: g["files"] for g in kustomization()["configMapGenerator"]}
    assert volumes["config"]["configMap"]["name"] in generated
    assert volumes["scripts"]["configMap"]["name"] in generated
    secret = one(KUBERAY / "secret.example.yaml")
    assert volumes["tokens"]["secret"]["secretName"] == secret["metadata"]["name"]
    # tangram.yaml names the tokens file where the Secret's key is mounted.
    cfg = yaml.safe_load((KUBERAY / "tangram.yaml").read_text())
    (key,) = secret["stringData"]
    assert cfg["server"]["tokens_file"] == f"{mounts['tokens']}/{key}"
    assert mounts["scripts"] == "/opt/tangram-kuberay"


def test_service_and_podmonitor_select_the_head_pod() -> None:
    cluster = raycluster()["metadata"]["name"]
    head_labels = {"ray.io/cluster": cluster, "ray.io/node-type": "head"}
    service = one(KUBERAY / "service.yaml")
    assert service["spec"]["selector"] == head_labels
    assert service["spec"]["ports"][0]["targetPort"] == 8000
    monitor = one(KUBERAY / "podmonitor.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"] == head_labels
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["port"] == "http"
    ann = dict(groups())["head"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == "8000"


def relabel(labels: dict[str, str], configs: list[dict[str, Any]]) -> dict[str, str]:
    """Prometheus's relabelling (replace, keep, drop, labelmap), enough of it for the
    PodMonitor's endpoint relabelings. A target dropped comes back empty."""
    out = dict(labels)
    for cfg in configs:
        action = cfg.get("action", "replace").lower()
        sources = cfg.get("sourceLabels", [])
        value = cfg.get("separator", ";").join(out.get(s, "") for s in sources)
        regex = re.compile(f"^(?:{cfg.get('regex', '(.*)')})$")
        m = regex.match(value)
        if action == "replace":
            if m is not None:
                target = m.expand(re.sub(r"\$\{?(\w+)\}?", r"\\g<\1>", cfg["targetLabel"]))
                repl = m.expand(re.sub(r"\$\{?(\w+)\}?", r"\\g<\1>", cfg.get("replacement", "$1")))
                if repl:
                    out[target] = repl
                else:
                    out.pop(target, None)
        elif (action == "keep" and m is None) or (action == "drop" and m is not None):
            return {}
        else:
            assert action in ("keep", "drop"), f"relabel action {action} not emulated"
    return out


def operator_job(monitor: dict[str, Any], namespace: str, pod_labels: dict[str, str]) -> str:
    """The job label the Prometheus Operator gives a PodMonitor's targets: the pod's
    ``jobLabel`` label when the PodMonitor names one, else ``NAMESPACE/NAME``; then each
    endpoint's relabelings apply."""
    spec = monitor["spec"]
    job = f"{namespace}/{monitor['metadata']['name']}"
    if spec.get("jobLabel") and spec["jobLabel"] in pod_labels:
        job = pod_labels[spec["jobLabel"]]
    (endpoint,) = spec["podMetricsEndpoints"]
    labels = {"job": job, "namespace": namespace, **{f"__meta_pod_label_{k}": v
              for k, v in pod_labels.items()}}  # fmt: skip
    return relabel(labels, endpoint.get("relabelings", []))["job"]


def down_alert_job() -> str:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    (down,) = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "TangramDown"]
    m = re.fullmatch(r'up\{job="([^"]+)"\} == 0', down["expr"])
    assert m, down["expr"]
    return m.group(1)


def test_every_scrape_config_gives_the_job_the_down_alert_watches() -> None:
    """TangramDown (``up{job="tangram"}``) must match the targets of the PodMonitor as
    the Prometheus Operator labels them (``namespace/name`` by default, which it never
    would), and those of the shipped Prometheus configurations."""
    job = down_alert_job()
    monitor = one(KUBERAY / "podmonitor.yaml")
    head = dict(groups())["head"]["template"]["metadata"].get("labels", {})
    pod_labels = {**head, "ray.io/cluster": "tangram", "ray.io/node-type": "head"}
    for namespace in ("default", "rl"):
        assert operator_job(monitor, namespace, pod_labels) == job
    for name in ("prometheus.yml", "prometheus.compose.yml"):
        prom = yaml.safe_load((DEPLOY / "prometheus" / name).read_text())
        assert [s["job_name"] for s in prom["scrape_configs"]] == [job], name
    # The emulation has teeth: without the relabeling the job is the operator's default.
    bare = json.loads(json.dumps(monitor))
    bare["spec"]["podMetricsEndpoints"][0].pop("relabelings", None)
    assert operator_job(bare, "rl", pod_labels) == "rl/tangram" != job


def test_podmonitor_carries_the_release_label_kube_prometheus_stack_selects() -> None:
    """kube-prometheus-stack's Prometheus selects PodMonitors labelled with its Helm
    release (podMonitorSelector: release=<release>) unless told otherwise: the shipped
    one carries that label, and the docs say to set it to the release's name."""
    monitor = one(KUBERAY / "podmonitor.yaml")
    labels = monitor["metadata"]["labels"]
    assert labels.get("release"), "no release label: kube-prometheus-stack ignores it"
    text = (KUBERAY / "podmonitor.yaml").read_text()
    assert "release:" in text and "Helm release" in text
    doc = (ROOT / "docs" / "observability.md").read_text()
    assert "podMonitorSelector" in doc and f"release: {labels['release']}" in doc


def test_kuberay_config_and_scripts_are_well_formed() -> None:
    """The head's configuration parses once start_broker.py has removed its own keys and
    added the cluster's pools; the scripts compile."""
    cfg = yaml.safe_load((KUBERAY / "tangram.yaml").read_text())
    cfg.pop("gpu_memory_gb")
    cfg.pop("gpu_services")
    cfg["pools"]["cpu"] = {"kind": "cpu", "nodes": [{"name": "n1", "cores": 8, "memory_gb": 32}]}
    parse_config(cfg)
    subprocess.run(
        [sys.executable, "-m", "py_compile", str(KUBERAY / "start_broker.py")], check=True
    )
    subprocess.run(["bash", "-n", str(KUBERAY / "head.sh")], check=True)
    subprocess.run(["sh", "-n", str(IMAGE / "entrypoint.sh")], check=True)


def test_start_broker_script_serves_the_lease_api_from_a_ray_cluster(tmp_path: Path) -> None:
    """deploy/kuberay/start_broker.py against a one-node Ray cluster, as head.sh runs it:
    the broker, a sandbox executor on the node with the sandbox_node resource, the HTTP
    API with the tenants of the tokens file; a second run (head.sh's restart path) reuses
    the running broker."""
    ray = pytest.importorskip("ray")
    import tangram.ray as tr
    from tangram.executors.sandbox import isolation_problem

    cfg = yaml.safe_load((KUBERAY / "tangram.yaml").read_text())
    cfg["server"]["tokens_file"] = str(tmp_path / "tokens.txt")
    (tmp_path / "tokens.txt").write_text("kr kuberay-test-token-0123456789\n")
    (tmp_path / "tangram.yaml").write_text(yaml.safe_dump(cfg))
    with socket.socket() as s:  # a free port for the API
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = ray.init(num_cpus=2, resources={"sandbox_node": 1}, include_dashboard=False)
    try:
        env = {
            **os.environ,
            "RAY_ADDRESS": ctx.address_info["gcs_address"],
            "TANGRAM_CONFIG": str(tmp_path / "tangram.yaml"),
            "TANGRAM_PORT": str(port),
            "TANGRAM_SANDBOX_NODES": "1",
            "TANGRAM_GPU_NODES": "0",
            "TANGRAM_WAIT_SECONDS": "30",
            "TANGRAM_SANDBOX_ISOLATE": "true" if isolation_problem() is None else "false",
        }
        for _ in range(2):
            run = subprocess.run(
                [sys.executable, str(KUBERAY / "start_broker.py")],
                env=env,
                capture_output=True,
                text=True,
                timeout=240,
            )
            assert run.returncode == 0, run.stderr[-3000:]
            assert "broker up: pools ['api', 'cpu']" in run.stderr
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/actions?wait=10",
            method="POST",
            data=json.dumps({"trajectory": "t", "demands": {"cpu": 1}}).encode(),
            headers={
                "Authorization": "Bearer kuberay-test-token-0123456789",
                "Content-Type": "application/json",
            },
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            body = json.loads(r.read())
        assert body["state"] == "granted"
        # The cpu pool's node is the Ray node, by id: its executor runs there.
        assert body["lease"]["allocation"]["cpu"]["node"] == ctx.address_info["node_id"]
    finally:
        tr.stop_broker()
        ray.shutdown()
