"""The API call executor and the ``@tangram.action`` decorator, without Ray."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import tangram
from tangram.executors.api import ApiError, HttpCall, HttpCaller, tokens_in
from tangram.executors.sandbox import Command
from tangram.spec import Demand, InvalidAction


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        reply = {"echo": body, "usage": {"total_tokens": 7 * len(body["prompt"])}}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def api_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1/chat"
    server.shutdown()


async def test_http_call_reads_token_usage(api_url: str):
    caller = HttpCaller()
    res = await caller.call(HttpCall(api_url, json={"prompt": "abc"}))
    await caller.aclose()
    assert res.ok and res.tokens == 21 and res.body["echo"] == {"prompt": "abc"}


def test_tokens_in_tolerates_missing_usage():
    assert tokens_in({"usage": {"total_tokens": 5}}, ("usage", "total_tokens")) == 5
    assert tokens_in({"usage": {}}, ("usage", "total_tokens")) is None
    assert tokens_in("text", ("usage",)) is None
    assert tokens_in({"n": -1}, ("n",)) is None


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (HttpCall("ftp://x"), "url must start"),
        (HttpCall("http://x", method="BREW"), "unsupported HTTP method"),
        (HttpCall("http://x", timeout=0), "timeout"),
    ],
)
async def test_bad_calls_are_refused(call: HttpCall, match: str):
    with pytest.raises(ApiError, match=match):
        await HttpCaller().call(call)


def test_action_decorator_builds_actions():
    @tangram.action(cpu=(1, 8), key="cpu", duration=2.0, efficiency={"amdahl": 0.9})
    def run_tests(path: str) -> Command:
        return Command(f"pytest -n {{dop}} {path}")

    bound = run_tests("tests/")
    assert bound.request == Command("pytest -n {dop} tests/")
    assert bound.name == "run_tests"
    act = bound.action("t1")
    assert act.trajectory == "t1" and act.demands == {"cpu": Demand(1, 8)}
    assert act.profiled
    assert run_tests.action("t2").trajectory == "t2"
    assert run_tests.__name__ == "run_tests"
    # Each action is a fresh object (the core assigns ids to it).
    assert bound.action("t1") is not bound.action("t1")


def test_action_decorator_checks_demands_at_import():
    with pytest.raises(InvalidAction, match="at least one demand"):
        tangram.action()
    with pytest.raises(InvalidAction, match="amounts must be positive"):
        tangram.action(cpu=0)
    with pytest.raises(InvalidAction, match="key 'gpu' is not among"):
        tangram.action(cpu=1, key="gpu")
    with pytest.raises(InvalidAction, match="given twice"):
        tangram.action(cpu=1, demands={"cpu": 2})
    with pytest.raises(InvalidAction, match="trajectory id"):
        tangram.action(cpu=1)(lambda: None).action("")
    # A pool named like a keyword goes through demands=.
    assert tangram.action(demands={"key": 2})(lambda: 1)().action("t").demands["key"].min == 2


def test_import_tangram_does_not_import_ray():
    import subprocess
    import sys

    code = "import sys, tangram; tangram.action; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_live_command_object_registers_on_a_typer_app():
    import typer
    from typer.testing import CliRunner

    from tangram.cli import live_command

    app = typer.Typer()
    app.command("live")(live_command)
    app.command("other")(lambda: None)  # two commands: invoked by name, like `bench live`
    out = CliRunner().invoke(app, ["live", "--help"])
    assert out.exit_code == 0
    assert "--trajectories" in out.output and "--json" in out.output
