"""Packaging: the distribution's name, metadata and extras by role; the wheel's contents;
and a clean install of the wheel into a fresh virtual environment: the base install
(the in-process broker, the HTTP client, the command) with no server, Ray or
matplotlib, then the ``server`` extra serving for real.

The clean install takes some 20-40 s (a venv without pip, the wheel with ``--no-deps``,
then only the base requirements, from pip's cache once ``make test`` has filled it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import tangram

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
EXTRAS: dict[str, list[str]] = PROJECT["optional-dependencies"]
# What only the extras bring: none of it may be needed to import the base modules.
OPTIONAL_MODULES = ("ray", "matplotlib", "fastapi", "starlette", "uvicorn", "prometheus_client")
BASE_MODULES = (
    "tangram",
    "tangram.broker",
    "tangram.client",
    "tangram.config",
    "tangram.spec",
    "tangram.journal",
    "tangram.leasing",
    "tangram.actions",
    "tangram.executors",
    "tangram.cli",
)


def names(reqs: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in reqs}


# ---- metadata --------------------------------------------------------------------


def test_distribution_name_and_metadata() -> None:
    # `tangram` on PyPI is an unrelated project; the import name stays `tangram`.
    assert PROJECT["name"] == "tangram-broker"
    assert PROJECT["version"] == tangram.__version__
    assert PROJECT["license"] == "Apache-2.0"
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]
    assert PROJECT["scripts"] == {"tangram": "tangram.cli:main"}
    assert "Typing :: Typed" in PROJECT["classifiers"]
    assert "2603.13019" in PROJECT["urls"]["Paper"]
    assert (ROOT / "tangram" / "py.typed").exists()
    # setuptools reads an SPDX expression in project.license from 77 on.
    (setuptools,) = [r for r in PYPROJECT["build-system"]["requires"] if "setuptools" in r]
    assert Requirement(setuptools).specifier.contains("77") and not Requirement(
        setuptools
    ).specifier.contains("76.9")
    citation = (ROOT / "CITATION.cff").read_text()
    assert "2603.13019" in citation and "cff-version" in citation
    assert f"## {tangram.__version__}" in (ROOT / "CHANGELOG.md").read_text()


def test_extras_by_role() -> None:
    base = names(PROJECT["dependencies"])
    heavy = {"ray", "matplotlib", "fastapi", "uvicorn", "prometheus-client", "uvloop"}
    assert not base & heavy, base & heavy
    assert {"fastapi", "uvicorn", "prometheus-client"} <= names(EXTRAS["server"])
    assert "ray" in names(EXTRAS["ray"])
    # The Ray actor serves the HTTP API too: [ray] holds everything [server] does.
    assert set(EXTRAS["server"]) <= set(EXTRAS["ray"])
    # The plots; the live benchmark's workload (a pytest suite, with xdist).
    assert names(EXTRAS["bench"]) == {"matplotlib", "pytest", "pytest-xdist"}
    # [dev] is everything the tests need: every extra, with the same specifiers.
    for extra in ("server", "ray", "bench"):
        assert set(EXTRAS[extra]) <= set(EXTRAS["dev"]), extra
    # The extras name packages, never this distribution (the Dockerfile installs the
    # requirements of [server] and [ray] from a list, without the project itself).
    for reqs in EXTRAS.values():
        assert PROJECT["name"] not in names(reqs)


def test_the_readme_installs_by_the_distribution_name() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "pip install tangram-broker" in readme
    assert "pip install 'tangram-broker[server]'" in readme
    assert "pip install tangram\n" not in readme


# ---- imports without the extras, in this environment -------------------------------

BLOCK = """
import sys
BLOCKED = {blocked!r}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
        return None
sys.meta_path.insert(0, Block())
"""


def run_blocked(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    script = BLOCK.format(blocked=OPTIONAL_MODULES) + code
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_base_modules_import_without_the_extras() -> None:
    """Every base module imports, and the broker leases, with the extras' packages
    unimportable: none of them is imported at import time."""
    code = f"""
import asyncio, importlib
for m in {BASE_MODULES!r}:
    importlib.import_module(m)
from tangram.broker import Broker
from tangram.config import default_config
from tangram.spec import Action

async def main():
    broker = Broker.from_config(default_config())
    async with broker.lease(Action.build("t", {{"cpu": 1}})) as lease:
        assert lease.allocation["cpu"].amount == 1
    await broker.close()

asyncio.run(main())
print(sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
"""
    run = run_blocked(code)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["--version"], 0, f"tangram-broker {tangram.__version__}"),
        (["serve"], 1, "pip install 'tangram-broker[server]'"),
        (["serve", "--port", "99999"], 2, "'--port'"),
        (["bench", "live"], 1, "pip install 'tangram-broker[ray,bench]'"),
        (["bench", "sim", "-b", "4"], 1, "pip install 'tangram-broker[bench]'"),
        (["config", "check", "deploy/pools.example.yaml"], 0, "valid"),
    ],
)
def test_the_command_without_the_extras(args: list[str], status: int, message: str) -> None:
    """What needs an extra says which one to install, before doing anything."""
    code = "import runpy\nsys.argv = ['tangram', *sys.argv[1:]]\n"
    code += "runpy.run_module('tangram.cli', run_name='__main__')\n"
    run = run_blocked(code, *args)
    assert run.returncode == status, run.stdout + run.stderr
    assert message in run.stdout + run.stderr
    assert "Traceback" not in run.stderr


# ---- the wheel and a clean install -----------------------------------------------


def pip(*args: str, python: Path | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    if python is not None:
        cmd += ["--python", str(python)]
    run = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"pip {' '.join(args)}:\n{run.stdout}\n{run.stderr}"
    return run


def build_wheel(tmp: Path) -> Path:
    """The wheel, built from a copy of the sources (the build writes build/ and
    *.egg-info next to them, which the working tree should not get)."""
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "tangram", src / "tangram", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    args = ["wheel", "-q", "--no-deps", "--wheel-dir", str(tmp / "dist"), str(src)]
    try:  # no isolated build environment to set up when this one can build
        import setuptools

        if int(setuptools.__version__.split(".")[0]) >= 77:
            args.insert(1, "--no-build-isolation")
    except ImportError:
        pass
    pip(*args)
    (wheel,) = (tmp / "dist").glob("*.whl")
    return wheel


def check_wheel(wheel: Path) -> None:
    assert wheel.name == f"tangram_broker-{tangram.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as z:
        files = set(z.namelist())
        dist = f"tangram_broker-{tangram.__version__}.dist-info"
        meta = z.read(f"{dist}/METADATA").decode()
    assert "tangram/py.typed" in files
    assert f"{dist}/licenses/LICENSE" in files
    assert "Name: tangram-broker" in meta and "License-Expression: Apache-2.0" in meta
    for extra in ("server", "ray", "bench", "dev"):
        assert f"Provides-Extra: {extra}" in meta
    # Every module of the source tree is in the wheel (no subpackage left behind).
    sources = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "tangram").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert sources <= files, sorted(sources - files)
    assert not [f for f in files if f.startswith(("tests/", "benchmarks/", "deploy/"))]


def in_venv(venv: Path, *args: str, cwd: Path, **kw: Any) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        [str(venv / "bin" / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**env, "PATH": f"{venv / 'bin'}:{env.get('PATH', '')}"},
        **kw,
    )


CLEAN_CHECK = """
import asyncio, importlib.util, sys
absent = [m for m in {optional!r} if importlib.util.find_spec(m) is not None]
assert not absent, f"installed in the base venv: {{absent}}"
import tangram.broker, tangram.client
from tangram.broker import Broker
from tangram.client import HttpClient, SyncHttpClient
from tangram.config import default_config
from tangram.spec import Action

async def main():
    broker = Broker.from_config(default_config())
    async with broker.lease(Action.build("t", {{"cpu": 1}})) as lease:
        assert lease.allocation["cpu"].amount == 1
    await broker.close()

asyncio.run(main())
assert tangram.__file__.startswith(sys.prefix), tangram.__file__  # the wheel's, not ours
print("ok")
"""


@pytest.mark.timeout(600)
def test_wheel_installs_clean_base_then_server(tmp_path: Path) -> None:
    t0 = time.monotonic()
    wheel = build_wheel(tmp_path)
    check_wheel(wheel)

    # The base install: the wheel without dependencies, then only its own requirements.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    pip("install", "-q", "--no-deps", str(wheel), python=python)
    pip("install", "-q", *PROJECT["dependencies"], python=python)
    pip("check", python=python)
    work = tmp_path / "work"  # a clean working directory: nothing importable by accident
    work.mkdir()
    run = in_venv(venv, "python", "-c", CLEAN_CHECK.format(optional=OPTIONAL_MODULES), cwd=work)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
    run = in_venv(venv, "tangram", "--version", cwd=work)
    assert run.stdout.strip() == f"tangram-broker {tangram.__version__}", run.stderr
    run = in_venv(venv, "tangram", "serve", cwd=work)
    assert run.returncode == 1 and "tangram-broker[server]" in run.stderr
    run = in_venv(
        venv, "tangram", "config", "check", str(ROOT / "deploy/pools.example.yaml"), cwd=work
    )
    assert run.returncode == 0, run.stderr

    # The server extra: its requirements added, `tangram serve` serves and `status` reads it.
    pip("install", "-q", *EXTRAS["server"], python=python)
    pip("check", python=python)
    data = tmp_path / "data"
    proc = subprocess.Popen(
        [str(venv / "bin" / "tangram"), "serve", "--port", "0", "--data-dir", str(data)],
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        info = data / "serve.json"
        end = time.monotonic() + 60
        while not (info.exists() and info.read_text().endswith("\n")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < end, "tangram serve did not start"
            time.sleep(0.05)
        url = json.loads(info.read_text())["url"]
        run = in_venv(venv, "tangram", "status", "--url", url, cwd=work)
        assert run.returncode == 0, run.stderr
        assert run.stdout.startswith(f"Tangram broker at {url}")
    finally:
        proc.terminate()
        proc.communicate(timeout=20)
    print(f"wheel, clean base install and server extra: {time.monotonic() - t0:.1f} s")
