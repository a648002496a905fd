"""Every ``examples/*.py`` run as a user runs it: ``python examples/<file>.py`` in a
subprocess from the repository root, with a timeout. Each starts its own local Ray
cluster and broker (about 10 s on a 2-core machine) and must exit 0 and print its
summary line. An example whose framework is not installed is skipped, naming what to
install; a new example without an entry in ``EXAMPLES`` fails."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted((ROOT / "examples").glob("*.py"))
TIMEOUT = 120.0  # seconds; each runs in well under 60 s on 2 cores


@dataclass(frozen=True)
class Example:
    expect: tuple[str, ...]  # lines (or parts of lines) the output must hold
    needs: tuple[str, ...] = ("ray",)  # modules that must be importable
    install: str = "pip install 'tangram-broker[ray]'"


EXAMPLES = {
    "ray_rollout.py": Example(("{'actions': 12, 'failed': 0}",)),
    "verl_tools.py": Example(
        (
            "tools registered from YAML: code_interpreter, run_tests, search",
            "'search': 16}, errors: 0",
            "trajectories still open after the idle timeout: 0",
            "verl example: 16/16 rollouts passed",
        ),
        # verl's tool modules load without torch after `pip install --no-deps verl`.
        ("ray", "verl", "omegaconf"),
        "pip install --no-deps 'verl>=0.7' (the Makefile's dev setup does)",
    ),
    "skyrl_env.py": Example(
        (
            "cores held twice at once: 0",
            "after close(): 0 trajectories, 0 leases on the broker",
            "skyrl example: 16/16 environments solved",
        ),
        ("ray", "skyrl_gym"),
        "pip install 'tangram-broker[skyrl,ray]'",
    ),
    "litellm_quota.py": Example(
        (
            "most calls in flight upstream: 2 (pool concurrency 2)",
            "used 240 (8 x 30); leases left: 0",
            "litellm example: 8 calls",
        ),
        ("ray", "litellm"),
        "pip install 'tangram-broker[litellm,ray]'",
    ),
}


def importable(module: str) -> bool:
    """Whether ``module`` is installed; without importing it (``import verl`` needs
    torch). A module already loaded counts, even one whose ``__spec__`` is None (as
    tests/test_integrations_verl.py leaves ``verl`` when it loads verl without torch)."""
    if module in sys.modules:
        return True
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def test_every_example_is_run_here() -> None:
    assert FILES, "no examples/*.py"
    assert sorted(EXAMPLES) == sorted(f.name for f in FILES)


@pytest.mark.parametrize("path", FILES, ids=[f.name for f in FILES])
def test_example_runs(path: Path) -> None:
    example = EXAMPLES.get(path.name)
    if example is None:
        pytest.fail(f"{path.name} has no entry in EXAMPLES")
    missing = [m for m in example.needs if not importable(m)]
    if missing:
        pytest.skip(f"{path.name} needs {', '.join(missing)}: {example.install}")
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # each example starts a local cluster of its own
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, str(path.relative_to(ROOT))],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
        pytest.fail(f"{path.name} still running after {TIMEOUT:.0f} s\n{out[-3000:]}")
    took = time.monotonic() - t0
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, (
        f"{path.name} exited {proc.returncode} after {took:.1f} s:\n{output[-4000:]}"
    )
    for line in example.expect:
        assert line in proc.stdout, f"{path.name}: {line!r} not in its output:\n{proc.stdout}"
