"""``tangram serve`` as users start it: a subprocess, its start-up line, its refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tangram.client import SyncHttpClient
from tangram.spec import Action

TANGRAM = [sys.executable, "-m", "tangram.cli"]


def start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*TANGRAM, "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def wait_for(info: Path, proc: subprocess.Popen[str], limit: float = 60) -> str:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if info.exists() and info.read_text().endswith("\n"):
            return str(json.loads(info.read_text())["url"])
        if proc.poll() is not None:
            raise AssertionError(f"tangram serve exited: {proc.communicate()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("tangram serve did not start")


def test_serve_logs_one_line_serves_leases_and_stops_cleanly(tmp_path: Path):
    proc = start("--port", "0", "--data-dir", str(tmp_path))
    try:
        url = wait_for(tmp_path / "serve.json", proc)
        with SyncHttpClient(url) as client:
            with client.lease(Action.build("t", {"cpu": 1})) as lease:
                assert lease.allocation["cpu"].amount == 1
                assert client.pools()["pools"]["cpu"]["in_use"] == 1
            assert client.pools()["pools"]["cpu"]["in_use"] == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    # uvicorn shuts down cleanly, then re-raises the signal: the status says SIGTERM.
    assert proc.returncode in (0, -signal.SIGTERM), err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"tangram serve: lease API on {url} for pools cpu (cpu, ")
    assert "no tenants (loopback only)" in lines[0] and "embedded defaults" in lines[0]
    assert not (tmp_path / "serve.json").exists()


def test_serve_refuses_a_public_address_without_tenants():
    proc = start("--host", "0.0.0.0", "--port", "0")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "refusing to serve on 0.0.0.0 without tenants" in err


def test_serve_binds_a_public_address_with_tenants(tmp_path: Path):
    cfg = tmp_path / "pools.yaml"
    cfg.write_text(
        "pools:\n  api: {kind: quota, concurrency: 2}\n"
        "server:\n  tenants:\n    rl: {token: rl-token-0123456789abcdef}\n"
    )
    proc = start(
        "--config", str(cfg), "--host", "0.0.0.0", "--port", "0", "--data-dir", str(tmp_path)
    )
    try:
        url = wait_for(tmp_path / "serve.json", proc).replace("0.0.0.0", "127.0.0.1")
        with SyncHttpClient(url, token="rl-token-0123456789abcdef") as client:
            assert client.pools()["pools"]["api"]["capacity"] == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert "1 tenants" in err and str(cfg) in err


@pytest.mark.parametrize(
    ("text", "message"),
    [("pools: {}\n", "pools"), ("pools: [\n", "not valid YAML")],
)
def test_serve_refuses_a_bad_config_with_its_message(tmp_path: Path, text: str, message: str):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    proc = start("--config", str(cfg), "--port", "0")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and message in err


def test_default_config_has_a_gpu_pool_only_when_gpus_are_present(tmp_path: Path, monkeypatch):
    from tangram.config import default_config

    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi: no GPU pool
    assert "gpu" not in default_config().pools
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nprintf '81559\\n81559\\n81559\\n'\n")
    fake.chmod(0o755)
    cfg = default_config()
    node = cfg.pools["gpu"].nodes[0]  # type: ignore[union-attr]
    assert (node.gpus, node.memory_gb) == (2, 79.6)  # 3 GPUs: chunks of a power of two
    assert set(cfg.build_pools()) == {"cpu", "api", "gpu"}
