"""verl: Tangram's tools in a verl-style agent loop.

verl registers an agent loop's tools from a tool-config YAML
(``actor_rollout_ref.rollout.multi_turn.tool_config_path``) with
``verl.tools.tool_registry.initialize_tools_from_config``; this example does the same
with three tools:

- ``code_interpreter``: ``TangramSandboxTool``, the model's code written to
  ``solution.py`` in the trajectory's sandbox and run on leased cores of a CPU pool;
- ``run_tests``: ``TangramSandboxTool`` again, writing ``test_solution.py`` beside it
  (one rollout's calls share a working directory) and running it;
- ``search``: ``TangramApiTool``, a POST to a small fake search server on 127.0.0.1 that
  this example starts, under a permit of a quota pool.

16 rollouts run at once, as concurrent asyncio tasks of one agent-loop worker; a
scripted "model" makes one call of each tool per rollout, and every call goes through
``create``, ``execute(..., agent_data=...)`` and ``release`` as verl's
``ToolAgentLoop._call_tool`` makes it.

    pip install 'tangram-broker[ray]' omegaconf && pip install --no-deps 'verl>=0.7'
    python examples/verl_tools.py

``import verl`` imports torch. Where torch is missing, this example loads verl's tool
modules (``verl.tools.base_tool``, ``schemas``, ``tool_registry``) from the installed
package without verl's two package ``__init__`` files, as tests/test_integrations_verl.py
does; a real trainer has torch and needs none of that.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import io
import json
import os
import sys
import tempfile
import threading
import time
import types
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROLLOUTS = 16


def load_verl_tools() -> str:
    """Make ``verl.tools.tool_registry`` importable (without torch if need be)."""
    try:
        importlib.import_module("verl.tools.tool_registry")
        return "verl"
    except ImportError:
        pass
    for name in [n for n in sys.modules if n == "verl" or n.startswith("verl.")]:
        del sys.modules[name]
    spec = importlib.util.find_spec("verl")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("verl is not installed: pip install --no-deps 'verl>=0.7' (and omegaconf)")
    root = Path(next(iter(spec.submodule_search_locations)))
    for name, path in (("verl", root), ("verl.utils", root / "utils")):
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(path)]
        sys.modules[name] = pkg
    if importlib.util.find_spec("transformers") is None:
        # verl.tools.function_tool needs transformers; the registry only names its two
        # exports, and this example declares no function tools.
        stub = types.ModuleType("verl.tools.function_tool")
        stub.FunctionTool = type("FunctionTool", (), {})  # type: ignore[attr-defined]
        stub.load_function_tools_from_path = lambda path: []  # type: ignore[attr-defined]
        sys.modules["verl.tools.function_tool"] = stub
    importlib.import_module("verl.tools.tool_registry")
    return "verl's tool modules, without torch"


# ---------------------------------------------------------------------- a fake search API
class SearchServer:
    """``POST /search`` on 127.0.0.1: three hits for the query and a usage block; it
    counts the requests in flight at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.in_flight = self.peak = self.calls = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
                with server.lock:
                    server.calls += 1
                    server.in_flight += 1
                    server.peak = max(server.peak, server.in_flight)
                time.sleep(0.05)  # the search engine thinks
                query = str(body.get("query", ""))
                hits = [
                    {"title": f"{query} #{i}", "url": f"https://example.org/{i}"} for i in (1, 2, 3)
                ]
                raw = json.dumps({"results": hits, "usage": {"total_tokens": 40}}).encode()
                with server.lock:
                    server.in_flight -= 1
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/search"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ---------------------------------------------------------------------- the tool config
TOOLS_YAML = """\
tools:
  - class_name: tangram.integrations.verl.TangramSandboxTool
    config:
      type: native
      pool: cpu
      demand: {{min: 1, max: 2}}
      duration: 0.2
      efficiency: {{amdahl: 0.9}}
      run_timeout: 30
      timeout: 60
  - class_name: tangram.integrations.verl.TangramSandboxTool
    config:
      type: native
      pool: cpu
      code_param: tests
      filename: test_solution.py
      command: "{{python}} test_solution.py"
      run_timeout: 30
      timeout: 60
    tool_schema:
      type: function
      function:
        name: run_tests
        description: Run tests against solution.py.
        parameters:
          type: object
          properties:
            tests: {{type: string, description: The test code.}}
          required: [tests]
  - class_name: tangram.integrations.verl.TangramApiTool
    config:
      type: native
      pool: search
      url: {url}
      tokens: 100
      timeout: 60
    tool_schema:
      type: function
      function:
        name: search
        description: Search the web.
        parameters:
          type: object
          properties:
            query: {{type: string, description: What to look for.}}
          required: [query]
"""


def broker_config() -> dict[str, Any]:
    cores = sorted(os.sched_getaffinity(0))[:4]
    return {
        "lease_ttl_seconds": 30,
        # verl has no end-of-rollout hook for tools: the broker closes a trajectory
        # that had nothing queued or held for this long.
        "trajectory_idle_seconds": 1.0,
        "pools": {
            "cpu": {"kind": "cpu", "nodes": [{"name": "local", "cores": cores, "memory_gb": 8}]},
            "search": {"kind": "quota", "concurrency": 4, "tokens_per_minute": 100_000},
        },
    }


# ---------------------------------------------------------------------- the agent loop
class AgentData:
    """What a tool sees of verl's ``AgentData``: the rollout's ``request_id``."""

    def __init__(self) -> None:
        self.request_id = uuid.uuid4().hex


async def call_tool(tools: dict[str, Any], name: str, arguments: str, agent: AgentData) -> Any:
    """One tool call as ``ToolAgentLoop._call_tool`` makes it for a ``BaseTool``."""
    tool = tools[name]
    instance_id, _ = await tool.create(create_kwargs={})
    try:
        return await tool.execute(instance_id, json.loads(arguments), agent_data=agent)
    finally:
        await tool.release(instance_id)


def scripted_model(n: int) -> list[tuple[str, str]]:
    """The tool calls a "model" makes in rollout ``n``: code, search, tests."""
    code = f"def solve(k):\n    return k * (k + 1) // 2\n\nprint('solve({n}) =', solve({n}))\n"
    tests = "from solution import solve\nassert solve(10) == 55\nprint('tests passed')\n"
    return [
        ("code_interpreter", json.dumps({"code": code})),
        ("search", json.dumps({"query": f"triangular number {n}"})),
        ("run_tests", json.dumps({"tests": tests})),
    ]


async def rollout(tools: dict[str, Any], n: int) -> dict[str, Any]:
    agent = AgentData()
    out: dict[str, Any] = {"calls": Counter(), "errors": 0, "reward": 0.0, "cores": set()}
    for name, arguments in scripted_model(n):
        await asyncio.sleep(0.02)  # the model generates; nothing is held meanwhile
        response, _, metrics = await call_tool(tools, name, arguments, agent)
        out["calls"][name] += 1
        if "tangram_error" in metrics or metrics.get("exit_code", 0) != 0:
            out["errors"] += 1
        out["cores"].update(metrics.get("cores", ()))
        if name == "run_tests" and "tests passed" in (response.text or ""):
            out["reward"] = 1.0
    return out


async def run_rollouts(tools: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    import tangram.ray as tr

    client = tr.Client()  # one client (one batched exchange) for every tool of the worker
    for tool in tools.values():
        tool.tangram_client = client
    try:
        results = await asyncio.gather(*(rollout(tools, n) for n in range(ROLLOUTS)))
        # Each rollout's trajectory stays open until it is idle for
        # trajectory_idle_seconds; then the broker closes it (and its sandbox).
        deadline = time.monotonic() + 15
        snap = await client.snapshot()
        while snap["pools"]["cpu"]["trajectories"] and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            snap = await client.snapshot()
        return results, snap
    finally:
        await client.aclose()


def main() -> int:
    how = load_verl_tools()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import ray
    from verl.tools.tool_registry import initialize_tools_from_config

    import tangram.ray as tr
    from tangram.executors.sandbox import isolation_problem

    t0 = time.monotonic()
    search = SearchServer()
    workdir = tempfile.TemporaryDirectory(prefix="tangram-verl-")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        isolate = isolation_problem() is None
        tr.start_broker(
            broker_config(),
            detached=False,
            data_dir=None,
            sandbox_root=os.path.join(workdir.name, "sandboxes"),
            sandbox_isolate=isolate,  # without bubblewrap: unisolated (this code is ours)
        )
        config = Path(workdir.name, "tools.yaml")
        config.write_text(TOOLS_YAML.format(url=search.url))
        with contextlib.redirect_stdout(io.StringIO()):  # verl's BaseTool prints its schema
            registered = initialize_tools_from_config(str(config))
        tools = {tool.name: tool for tool in registered}
        results, snap = asyncio.run(run_rollouts(tools))
    finally:
        tr.stop_broker()
        ray.shutdown()
        search.close()
        workdir.cleanup()

    calls = sum((r["calls"] for r in results), Counter())
    errors = sum(r["errors"] for r in results)
    passed = sum(r["reward"] == 1.0 for r in results)
    cores = sorted(set().union(*(r["cores"] for r in results)))
    print(f"verl tools loaded from: {how}; sandbox isolated: {isolate}")
    print(f"tools registered from YAML: {', '.join(sorted(tools))}")
    print(f"tool calls: {dict(sorted(calls.items()))}, errors: {errors}, cores used: {cores}")
    print(f"search: {search.calls} requests, at most {search.peak} at once (pool concurrency 4)")
    print(f"trajectories still open after the idle timeout: {snap['pools']['cpu']['trajectories']}")
    print(f"verl example: {passed}/{ROLLOUTS} rollouts passed in {time.monotonic() - t0:.1f} s")
    ok = passed == ROLLOUTS and errors == 0 and search.peak <= 4
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
