"""Start the Tangram broker on a KubeRay head: the detached broker actor, its executors
on the sandbox and GPU worker nodes, and the HTTP lease API on 0.0.0.0:$TANGRAM_PORT.

Run by deploy/kuberay/head.sh after `ray start --head`, from the head pod, so the driver
joins the local cluster. The configuration (/etc/tangram/tangram.yaml, a ConfigMap) holds
the policy, the quota pools and ``server.tokens_file`` (the Secret's mount); the CPU and
GPU pools are built from the Ray nodes that declare the ``sandbox_node`` and ``gpu_node``
resources (deploy/kuberay/raycluster.yaml), named by Ray node id so that each node's
executor is placed on it.

Environment: TANGRAM_CONFIG, TANGRAM_PORT (8000), TANGRAM_SANDBOX_NODES and
TANGRAM_GPU_NODES (how many of each to wait for; the worker groups' replicas),
TANGRAM_WAIT_SECONDS (600), TANGRAM_SERVICES (optional "module:attribute" naming the
GPU services' ``ServiceSpec`` list), TANGRAM_SANDBOX_ISOLATE ("true"; "false" runs sandbox
commands without bubblewrap), TANGRAM_DATA_DIR (the broker's journal, on a volume of the
head; default: the Ray session directory), TANGRAM_BROKER_RESOURCE (a custom resource only
the head declares: the broker actor asks for it, so Ray runs and restarts it on the head,
where the journal and the Service are), RAY_ADDRESS (default "auto").
"""

from __future__ import annotations

import importlib
import os
import sys
import time
import urllib.request
from typing import Any

import ray
import yaml

import tangram.ray as tr
from tangram.ray.executors import alive_nodes


def log(msg: str) -> None:
    print(f"tangram start_broker: {msg}", file=sys.stderr, flush=True)


def nodes_with(resource: str) -> list[dict[str, Any]]:
    return [n for n in alive_nodes() if n.get("Resources", {}).get(resource, 0) > 0]


def wait_for_nodes(resource: str, want: int, deadline: float) -> list[dict[str, Any]]:
    """Worker pods start after the head: the pools are sized from the nodes present, so
    wait for the expected number (a node joining later is not in the pool)."""
    while True:
        found = nodes_with(resource)
        if len(found) >= want or time.monotonic() > deadline:
            if len(found) < want:
                log(f"only {len(found)} of {want} {resource} nodes after the wait; going on")
            return found
        time.sleep(2)


def gpu_pool(nodes: list[dict[str, Any]], memory_gb: float) -> dict[str, Any]:
    return {
        "kind": "gpu",
        "nodes": [
            {"name": n["NodeID"], "gpus": int(n["Resources"]["GPU"]), "memory_gb": memory_gb}
            for n in sorted(nodes, key=lambda n: str(n["NodeID"]))
            if n["Resources"].get("GPU", 0) >= 1
        ],
    }


def main() -> int:
    path = os.environ.get("TANGRAM_CONFIG", "/etc/tangram/tangram.yaml")
    port = int(os.environ.get("TANGRAM_PORT", "8000"))
    deadline = time.monotonic() + float(os.environ.get("TANGRAM_WAIT_SECONDS", "600"))
    with open(path) as f:
        cfg: dict[str, Any] = yaml.safe_load(f) or {}
    # Keys of ours, not of the Tangram configuration: removed before it is parsed.
    gpu_memory = float(cfg.pop("gpu_memory_gb", 80))
    services_conf = cfg.pop("gpu_services", {})

    # KubeRay sets RAY_ADDRESS in its pods; "auto" finds the head started by head.sh.
    ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), namespace="tangram")
    pools = dict(cfg.get("pools") or {})
    want_cpu = int(os.environ.get("TANGRAM_SANDBOX_NODES", "1"))
    want_gpu = int(os.environ.get("TANGRAM_GPU_NODES", "0"))
    if want_cpu > 0:
        wait_for_nodes("sandbox_node", want_cpu, deadline)
        pools["cpu"] = tr.cpu_pool_from_ray(resource="sandbox_node")
    gpus = wait_for_nodes("gpu_node", want_gpu, deadline) if want_gpu > 0 else []
    if gpus:
        pools["gpu"] = gpu_pool(gpus, gpu_memory) | {"services": services_conf}
    cfg["pools"] = pools
    services = []
    if spec := os.environ.get("TANGRAM_SERVICES"):
        mod, _, attr = spec.partition(":")
        services = list(getattr(importlib.import_module(mod), attr))

    # The journal is on the head's disk: the broker must run, and restart, there.
    resource = os.environ.get("TANGRAM_BROKER_RESOURCE")
    try:
        broker = tr.start_broker(
            cfg,
            data_dir=os.environ.get("TANGRAM_DATA_DIR") or tr.DEFAULT_DATA_DIR,
            broker_options={"resources": {resource: 1}} if resource else None,
            services=services,
            device_kind="cuda" if gpus else "cpu",
            # Isolation needs bubblewrap (in the image) and user namespaces in the
            # worker pods; without them the sandbox executors refuse to start, unless
            # this is "false" (trusted code only: docs/reliability.md).
            sandbox_isolate=os.environ.get("TANGRAM_SANDBOX_ISOLATE", "true") != "false",
        )
    except ValueError:
        # The head container restarted while Ray kept the detached broker: reuse it.
        log("a broker already runs; reusing it")
        broker = tr.get_broker()
    try:
        got = ray.get(broker.serve_http.remote(host="0.0.0.0", port=port))
    except ray.exceptions.RayTaskError as exc:
        if "already serves HTTP" not in str(exc):
            raise
        got = port
    # The Service routes to the head pod: the broker actor must run here. Ray places a
    # zero-resource actor on the driver's node when it can; check rather than assume.
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{got}/healthz", timeout=10) as r:
            ok = r.status == 200
    except OSError:
        ok = False
    if not ok:
        log(
            f"the broker's HTTP API is not on this pod's port {got}: the actor was placed "
            "on another node; the Service cannot reach it"
        )
        return 1
    log(f"broker up: pools {sorted(pools)}, HTTP on 0.0.0.0:{got}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
