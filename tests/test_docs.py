"""Every fenced code block of README.md and docs/*.md, run as written.

- ```python: run as a script in a subprocess (repository root as the working directory,
  a timeout). A block that reads ``TANGRAM_URL`` gets the URL of a live broker on
  loopback with the embedded defaults (what ``make serve`` starts); a block that imports
  Ray gets ``RAY_ADDRESS``, a local Ray cluster the module starts (one per module, so a
  page's Ray blocks run in order against one cluster: the first starts the broker, the
  next use it).
- ```bash / ```sh / ```shell / ```console: run in a shell when every command is on the
  list of quick, safe ones (``SAFE``); background jobs (``tangram serve ... &``) are
  stopped after the block. A block that only starts servers (``tangram serve`` lines,
  alternatives) has each line started, waited for until it answers ``/readyz``, and
  stopped. ``make`` and ``pip install`` blocks are skipped with a named reason, as are
  blocks with commands not on the list.
- ```yaml: parsed; a pool configuration (a mapping with ``pools``) is loaded with
  ``tangram.config.load_config``, which builds its pools too.
- ```json: parsed (one document, or JSON Lines); an action request body (an object with
  ``trajectory`` and ``demands``, and no trace ``kind``) is submitted to the live broker
  with the embedded defaults and must be queued or granted.
- Blocks without a language, ```text and languages without a runner are not code to run:
  skipped, each with its reason.

A block can be marked as not runnable with an HTML comment on the line before it (blank
lines between are allowed)::

    <!-- doctest: skip (needs a GPU) -->

Every skip, marked or not, is a pytest skip naming its reason (``pytest -rs`` lists
them); a marker without a reason fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tangram.config import default_config, load_config
from tangram.errors import TYPE_BASE

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BIN = str(Path(sys.executable).parent)  # the virtual environment's tangram, python

PYTHON_TIMEOUT = 60.0
RAY_TIMEOUT = 120.0
SHELL_TIMEOUT = 60.0
READY_TIMEOUT = 30.0

SHELLS = {"bash", "sh", "shell", "console"}
NOT_CODE = {"", "text", "txt", "output", "plain"}
# Programs a shell block may run: quick, and harmless on a shared machine. `tangram serve`
# is handled on its own (started, then stopped).
SAFE = ("curl", "echo", "printf", "cat", "sleep", "kill", "wait", "true", "jq")
# tangram subcommands that only read and answer at once.
SAFE_TANGRAM = (["config", "check"], ["config", "schema"], ["--help"], ["--version"])

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
MARKER = re.compile(r"^\s*<!--\s*doctest:(?P<body>.*?)-->\s*$")
SKIP = re.compile(r"^\s*skip\s*\((?P<reason>.*\S.*)\)\s*$")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    marker: str | None  # the body of a <!-- doctest: ... --> comment before the fence

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks_of(page: Path) -> Iterator[Block]:
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        indent, fence = m.group("indent"), m.group("fence")
        info = m.group("info").strip()
        lang = info.split()[0].lower() if info else ""
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not (
            lines[j].strip().startswith(fence[0] * len(fence))
            and lines[j].strip().strip(fence[0]) == ""
        ):
            line = lines[j]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            j += 1
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        marker = MARKER.match(lines[k]) if k >= 0 else None
        yield Block(
            page,
            i + 1,
            lang,
            "\n".join(body) + "\n",
            marker.group("body").strip() if marker else None,
        )
        i = j + 1


BLOCKS = [b for page in PAGES for b in blocks_of(page)]


def block_id(block: Block) -> str:
    return f"{block.where}:{block.lang or 'untagged'}"


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def broker_url() -> Iterator[str]:
    """A live broker with the embedded defaults, as `make serve` starts it."""
    from tangram.server import LiveServer, create_app

    with LiveServer(create_app(default_config())) as url:
        yield url


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A local Ray cluster started by this process (and so stopped by it alone)."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (the ray extra)")

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield str(ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()


def environment(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


# ---------------------------------------------------------------------- python
def uses_ray(text: str) -> bool:
    return (
        re.search(
            r"^\s*(import ray\b|from ray\b|import tangram\.ray|from tangram\.ray)", text, re.M
        )
        is not None
    )


def run_python(block: Block, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    extra: dict[str, str] = {}
    if "TANGRAM_URL" in block.text:
        extra["TANGRAM_URL"] = request.getfixturevalue("broker_url")
    timeout = PYTHON_TIMEOUT
    if uses_ray(block.text):
        extra["RAY_ADDRESS"] = request.getfixturevalue("ray_address")
        timeout = RAY_TIMEOUT
    script = tmp_path / "block.py"
    script.write_text(block.text)
    try:
        proc = subprocess.run(
            [sys.executable, str(script)],
            cwd=ROOT,
            env=environment(**extra),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{block.where}: still running after {timeout:.0f} s\n{_text(exc)}")
    assert proc.returncode == 0, (
        f"{block.where} failed (exit status {proc.returncode}):\n"
        f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    )


def _text(exc: subprocess.TimeoutExpired) -> str:
    out = [
        x.decode(errors="replace") if isinstance(x, bytes) else x for x in (exc.stdout, exc.stderr)
    ]
    return "".join(x or "" for x in out)[-3000:]


# ---------------------------------------------------------------------- shell
def shell_lines(block: Block) -> list[str]:
    """The block's commands: continuation lines joined, comments and blank lines
    dropped; in a ```console block only the lines after a ``$`` prompt."""
    raw = block.text.splitlines()
    if block.lang == "console":
        raw = [x.strip()[2:] for x in raw if x.strip().startswith("$ ")]
    joined: list[str] = []
    buf = ""
    for line in raw:
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        joined.append(buf + line)
        buf = ""
    if buf:
        joined.append(buf)
    return [x for x in joined if x.strip() and not x.strip().startswith("#")]


def commands(line: str) -> list[list[str]]:
    """The simple commands of one shell line (split at ``;``, ``&&``, ``|``, ``&``...),
    each as its words, without leading ``VAR=value`` assignments."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.commenters = "#"
    out: list[list[str]] = [[]]
    for tok in lex:
        if tok and set(tok) <= set(";&|()"):
            out.append([])
        else:
            out[-1].append(tok)
    result = []
    for words in out:
        while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
            words = words[1:]
        if words:
            result.append(words)
    return result


def is_serve(words: list[str]) -> bool:
    return words[:2] == ["tangram", "serve"]


def why_not(block: Block) -> str | None:
    """Why a shell block is not run, or None to run it."""
    for line in shell_lines(block):
        for words in commands(line):
            prog = words[0]
            if prog == "make":
                return (
                    f"make: `{' '.join(words)}` installs into .venv and runs until stopped "
                    "or for long (make serve, make test)"
                )
            if "pip" in prog or words[:3] in (["python", "-m", "pip"], ["uv", "pip"]):
                return f"pip install: `{' '.join(words)}` installs packages"
            if prog == "tangram" and not (
                is_serve(words) or any(words[1 : 1 + len(x)] == x for x in SAFE_TANGRAM)
            ):
                return (
                    f"runs `{' '.join(words[:2])}`, not one of the quick, safe tangram "
                    "commands this test runs (serve, config check, config schema, --help)"
                )
            if prog != "tangram" and prog not in SAFE:
                return (
                    f"runs `{prog}`, not on this test's list of quick, safe commands "
                    f"({', '.join(SAFE)}, and some of tangram's)"
                )
    return None


def port_of(words: list[str]) -> int:
    port = 8000
    for i, w in enumerate(words):
        if w == "--port" and i + 1 < len(words):
            port = int(words[i + 1])
        elif w.startswith("--port="):
            port = int(w.split("=", 1)[1])
    return port


def option(words: list[str], name: str) -> str | None:
    for i, w in enumerate(words):
        if w == name and i + 1 < len(words):
            return words[i + 1]
        if w.startswith(name + "="):
            return w.split("=", 1)[1]
    return None


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def skip_if_ports_taken(block: Block) -> None:
    for line in shell_lines(block):
        for words in commands(line):
            if is_serve(words) and (port := port_of(words)) and not port_free(port):
                pytest.skip(f"port {port} is in use on this machine; the block binds it")


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop the process group this test started (the block's shell and its jobs): TERM,
    then KILL what is left after a grace period. The leader is reaped here; jobs whose
    shell has exited are their new parent's to reap."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            proc.poll()
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


def refused(output: str) -> str | None:
    """A Tangram problem answer in a block's output (a request the server refused)."""
    for line in output.splitlines():
        if TYPE_BASE in line:
            return line
    return None


def run_shell(block: Block, tmp_path: Path) -> None:
    lines = shell_lines(block)
    if all(is_serve(words) for line in lines for words in commands(line)) and not any(
        line.rstrip().endswith("&") for line in lines
    ):
        return run_servers(block, lines, tmp_path)
    skip_if_ports_taken(block)
    script = tmp_path / "block.sh"
    script.write_text("set -e\n" + "\n".join(lines) + "\n")
    log = tmp_path / "out.txt"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["bash", str(script)],
            cwd=ROOT,
            env=environment(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: background jobs go with it
        )
        try:
            status = proc.wait(SHELL_TIMEOUT)
        except subprocess.TimeoutExpired:
            status = None
        finally:
            stop_group(proc)
            proc.wait()
    output = log.read_text(errors="replace")
    assert status is not None, f"{block.where}: still running after {SHELL_TIMEOUT:.0f} s\n{output}"
    assert status == 0, f"{block.where} failed (exit status {status}):\n{output[-3000:]}"
    problem = refused(output)
    assert problem is None, f"{block.where}: the server refused a request:\n{problem}"


def run_servers(block: Block, lines: list[str], tmp_path: Path) -> None:
    """A block of ``tangram serve`` alternatives: start each, wait until it is ready,
    stop it."""
    skip_if_ports_taken(block)
    for n, line in enumerate(lines):
        words = commands(line)[0]
        data_dir = option(words, "--data-dir")
        created = data_dir is not None and not (ROOT / data_dir).exists()
        log = tmp_path / f"serve{n}.txt"
        with log.open("wb") as out:
            env = environment()
            exe = shutil.which(words[0], path=env["PATH"]) or words[0]
            proc = subprocess.Popen(
                [exe, *words[1:]],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                url = wait_ready(proc, words, data_dir)
            finally:
                stop_group(proc)
                proc.wait()
                if created and data_dir is not None:
                    shutil.rmtree(ROOT / data_dir, ignore_errors=True)
        output = log.read_text(errors="replace")
        assert url is not None, f"{block.where}: `{line}` did not become ready:\n{output[-3000:]}"
        assert "tangram serve: lease API on" in output, output


def wait_ready(proc: subprocess.Popen[bytes], words: list[str], data_dir: str | None) -> str | None:
    deadline = time.monotonic() + READY_TIMEOUT
    url = None if port_of(words) == 0 else f"http://127.0.0.1:{port_of(words)}"
    while time.monotonic() < deadline and proc.poll() is None:
        if url is None and data_dir is not None:
            serve_json = ROOT / data_dir / "serve.json"
            if serve_json.exists():
                with contextlib.suppress(ValueError, KeyError):  # being written
                    url = str(json.loads(serve_json.read_text())["url"])
        if url is not None:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
        time.sleep(0.1)
    return None


# ---------------------------------------------------------------------- yaml, json
def run_yaml(block: Block, tmp_path: Path) -> None:
    data = yaml.safe_load(block.text)
    if isinstance(data, dict) and "pools" in data:
        path = tmp_path / "pools.yaml"
        path.write_text(block.text)
        load_config(path)  # validates and builds the pools


def json_documents(block: Block) -> list[Any]:
    try:
        return [json.loads(block.text)]
    except ValueError:
        pass
    docs = []
    for n, line in enumerate(block.text.splitlines(), 1):
        if line.strip():
            try:
                docs.append(json.loads(line))
            except ValueError as exc:
                pytest.fail(
                    f"{block.where}: neither one JSON document nor JSON Lines (line {n}): {exc}"
                )
    return docs


def run_json(block: Block, request: pytest.FixtureRequest) -> None:
    for doc in json_documents(block):
        if isinstance(doc, dict) and {"trajectory", "demands"} <= doc.keys() and "kind" not in doc:
            submit(block, doc, request.getfixturevalue("broker_url"))


def submit(block: Block, action: dict[str, Any], url: str) -> None:
    """Submit an action example to the broker `make serve` starts; it must be queued or
    granted (not refused), and is then cancelled or released."""
    r = httpx.post(url + "/v1/actions", json=action, timeout=10)
    assert r.status_code in (200, 202), (
        f"{block.where}: the server `make serve` starts (embedded defaults) refuses this "
        f"action: {r.status_code} {r.text}"
    )
    state = r.json()
    if state.get("lease"):
        httpx.post(url + f"/v1/leases/{state['lease']['id']}/release", timeout=10)
    else:
        httpx.delete(url + f"/v1/actions/{state['id']}", timeout=10)


# ---------------------------------------------------------------------- the tests
def test_blocks_are_found_on_every_page() -> None:
    assert len(BLOCKS) >= 20
    assert {b.page.name for b in BLOCKS} >= {"README.md", "http-api.md", "ray.md"}
    langs = {b.lang for b in BLOCKS}
    assert {"python", "bash", "yaml", "json"} <= langs


def test_every_marker_stands_before_a_block() -> None:
    for page in PAGES:
        markers = sum("<!-- doctest" in line for line in page.read_text().splitlines())
        attached = sum(b.marker is not None for b in BLOCKS if b.page == page)
        assert markers == attached, (
            f"{page.relative_to(ROOT)}: a <!-- doctest: ... --> comment must be one line, "
            "right before a fenced block (blank lines between are fine)"
        )


@pytest.mark.parametrize("block", BLOCKS, ids=block_id)
def test_block_runs_as_written(
    block: Block, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    if block.marker is not None:
        skip = SKIP.match(block.marker)
        assert skip is not None, (
            f"{block.where}: a doctest marker must read <!-- doctest: skip (reason) -->, "
            f"not {block.marker!r}"
        )
        pytest.skip(f"{block.where}: marked: {skip.group('reason').strip()}")
    if block.lang in NOT_CODE:
        pytest.skip(
            f"{block.where}: {block.lang or 'untagged'} block: output or a diagram, not code to run"
        )
    if block.lang == "python":
        run_python(block, request, tmp_path)
    elif block.lang in SHELLS:
        reason = why_not(block)
        if reason is not None:
            pytest.skip(f"{block.where}: {reason}")
        run_shell(block, tmp_path)
    elif block.lang in ("yaml", "yml"):
        run_yaml(block, tmp_path)
    elif block.lang == "json":
        run_json(block, request)
    else:
        pytest.skip(f"{block.where}: no runner for ```{block.lang} blocks")
