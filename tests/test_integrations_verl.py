"""``tangram.integrations.verl``: the sandbox and API tools driven as verl's
``ToolAgentLoop`` drives a ``BaseTool`` (``create``, ``execute(..., agent_data=...)``,
``release``, once per tool call, from concurrent asyncio tasks), against the broker
actor and its sandbox executor on one real local Ray cluster shared by the module.

verl's own modules are used: ``verl.tools.base_tool``, ``verl.tools.schemas`` and
``verl.tools.tool_registry``. ``import verl`` imports torch (``verl/__init__.py`` loads
``verl.protocol``); where torch is missing (this project's dev setup installs verl
with ``pip install --no-deps verl``), the real files of those modules are loaded under
bare ``verl`` and ``verl.utils`` packages that skip the two package ``__init__``s, and
``verl.tools.function_tool`` (which needs transformers) is replaced by its two names.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
import types
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest


def _load_verl_tools() -> str:
    """Make ``verl.tools.base_tool`` importable; say how (or skip)."""
    try:
        importlib.import_module("verl.tools.base_tool")
        return "verl"
    except ImportError:
        pass
    for name in [n for n in sys.modules if n == "verl" or n.startswith("verl.")]:
        del sys.modules[name]
    spec = importlib.util.find_spec("verl")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(
            "verl is not installed (the `verl` extra; `pip install --no-deps verl` "
            "is enough for these tests)",
            allow_module_level=True,
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    for name, path in (("verl", root), ("verl.utils", root / "utils")):
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(path)]
        sys.modules[name] = pkg
    if importlib.util.find_spec("transformers") is None:
        stub = types.ModuleType("verl.tools.function_tool")

        class FunctionTool:  # never an instance here: only BaseTool tools are declared
            pass

        stub.FunctionTool = FunctionTool  # type: ignore[attr-defined]
        stub.load_function_tools_from_path = lambda path: []  # type: ignore[attr-defined]
        sys.modules["verl.tools.function_tool"] = stub
    try:
        importlib.import_module("verl.tools.base_tool")
    except ImportError as exc:
        pytest.skip(f"verl's tool modules do not import: {exc}", allow_module_level=True)
    return "verl files without torch"


HOW = _load_verl_tools()
ray = pytest.importorskip("ray", reason="ray is not installed (the `ray` extra)")

import httpx  # noqa: E402
import pytest_asyncio  # noqa: E402
from verl.tools.base_tool import BaseTool  # noqa: E402
from verl.tools.schemas import OpenAIFunctionToolSchema, ToolResponse  # noqa: E402

import tangram.ray as tr  # noqa: E402
from tangram.executors.sandbox import isolation_problem  # noqa: E402
from tangram.integrations import verl as tv  # noqa: E402
from tangram.spec import Action, Lease  # noqa: E402

CORES = sorted(os.sched_getaffinity(0))[:2]
CONFIG: dict[str, Any] = {
    "lease_ttl_seconds": 30,
    # verl has no end-of-trajectory hook: the broker closes idle trajectories itself.
    "trajectory_idle_seconds": 1.0,
    "pools": {
        "cpu": {"kind": "cpu", "nodes": [{"name": "local", "cores": CORES, "memory_gb": 8}]},
        "api": {"kind": "quota", "concurrency": 2, "tokens_per_minute": 100_000},
        "search": {"kind": "quota", "concurrency": 3, "tokens_per_minute": 100_000},
    },
}
ROLLOUTS = 16

# What the sandboxed code reports: which call it was, its CPU affinity, the core ids and
# parallelism the executor gave it, its argv (where {dop} and {cores} were filled) and
# when it ran. The "code" call writes answer.txt; the "test" call, a later call of the
# same rollout, finds it in the trajectory's working directory.
PROBE = """\
import json, os, sys, time
t0 = time.time()
%s
time.sleep(0.15)
print(json.dumps({
    "kind": %r,
    "affinity": sorted(os.sched_getaffinity(0)),
    "cores": os.environ["TANGRAM_CORES"],
    "dop": int(os.environ["TANGRAM_DOP"]),
    "argv": sys.argv[1:],
    "t0": t0,
    "t1": time.time(),
}))
"""
CODE = PROBE % ("open('answer.txt', 'w').write('55')", "code")
TEST = PROBE % ("assert open('answer.txt').read() == '55', 'no answer.txt'", "test")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    ray.init(num_cpus=2, include_dashboard=False)
    handle = tr.start_broker(
        CONFIG,
        detached=False,
        data_dir=None,
        sandbox_root=str(tmp_path_factory.mktemp("sandboxes")),
        sandbox_isolate=isolation_problem() is None,
    )
    yield handle
    tr.stop_broker()
    ray.shutdown()


class Recording(tr.Client):
    """A client that records every release and its usage."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.released: list[tuple[str, str, dict[str, Any]]] = []

    async def release_lease(
        self, lease: Lease, outcome: str = "ok", usage: Mapping[str, Any] | None = None
    ) -> None:
        self.released.append((lease.id, outcome, dict(usage or {})))
        await super().release_lease(lease, outcome, usage)


@pytest_asyncio.fixture
async def client(cluster: Any) -> AsyncIterator[Recording]:
    c = Recording(cluster)
    yield c
    await c.aclose()


class AgentData:
    """The part of verl's ``AgentData`` a tool sees: the rollout's ``request_id``."""

    def __init__(self) -> None:
        self.request_id = uuid.uuid4().hex


async def call_tool(
    tool: Any, args: dict[str, Any], agent_data: AgentData, create_kwargs: Any = None
) -> tuple[Any, float, dict[str, Any]]:
    """One tool call as ``ToolAgentLoop._call_tool`` makes it for a ``BaseTool``."""
    instance_id, _ = await tool.create(create_kwargs=create_kwargs or {})
    try:
        response, reward, metrics = await tool.execute(instance_id, args, agent_data=agent_data)
        return response, reward, metrics
    finally:
        await tool.release(instance_id)


async def until(c: tr.Client, ok: Any, within: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        snap = await c.snapshot()
        if ok(snap):
            return snap
        assert time.monotonic() < deadline, f"the broker did not settle: {snap}"
        await asyncio.sleep(0.1)


def test_the_tools_are_verls_base_tools() -> None:
    assert tv.VERL_AVAILABLE, HOW
    assert issubclass(tv.TangramSandboxTool, BaseTool)
    assert issubclass(tv.TangramApiTool, BaseTool)
    tool = tv.TangramSandboxTool({"type": "native"}, None)
    assert isinstance(tool.tool_schema, OpenAIFunctionToolSchema)
    assert tool.name == "code_interpreter"
    assert tool.tool_schema.function.parameters.required == ["code"]
    assert tv.ToolResponse is ToolResponse


# ---------------------------------------------------------------------- rollouts
class SearchServer:
    """A fake search API on 127.0.0.1: ``POST`` a query, get hits and a usage block."""

    TOKENS = 9

    def __init__(self) -> None:
        self.queries: list[str] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
                with server.lock:
                    server.queries.append(body["query"])
                time.sleep(0.05)
                hits = [f"{body['query']} {i}" for i in range(3)]
                raw = json.dumps(
                    {"hits": hits, "usage": {"total_tokens": SearchServer.TOKENS}}
                ).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/search"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class CheckedSearch(tv.TangramApiTool):
    """The API tool, failing if a permit of its pool is ever held by two calls at once."""

    def __init__(self, config: dict[str, Any] | None = None, tool_schema: Any = None) -> None:
        super().__init__(config, tool_schema)
        self.held: dict[Any, str] = {}
        self.peak = 0

    async def call(self, parameters: dict[str, Any], lease: Lease, **kwargs: Any) -> Any:
        units = list(lease.allocation[self.pool].units)
        for u in units:
            assert u not in self.held, f"permit {u} held by {self.held[u]} and {lease.id}"
            self.held[u] = lease.id
        self.peak = max(self.peak, len(self.held))
        try:
            return await super().call(parameters, lease, **kwargs)
        finally:
            for u in units:
                del self.held[u]


async def test_rollouts_of_code_test_and_search_calls_never_share_a_unit(
    client: Recording,
) -> None:
    """16 rollouts at once, each calling code (sandbox), search (quota pool, HTTP) and
    test (sandbox, in the code call's working directory), as verl's agent loop does."""
    sandbox = {
        "type": "native",
        "pool": "cpu",
        "demand": {"min": 1, "max": 2},
        "duration": 0.15,
        "efficiency": {"amdahl": 0.9},
        "timeout": 60,
        "run_timeout": 30,
    }
    code = tv.TangramSandboxTool(
        {**sandbox, "command": "{python} solution.py --dop {dop} --cores {cores}"}, None
    )
    test = tv.TangramSandboxTool(
        {
            **sandbox,
            "code_param": "tests",
            "filename": "test_solution.py",
            "command": "{python} test_solution.py --dop {dop} --cores {cores}",
        },
        None,
    )
    server = SearchServer()
    search = CheckedSearch(
        {"type": "native", "pool": "search", "url": server.url, "tokens": 50, "timeout": 60},
        None,
    )
    for tool in (code, test, search):
        tool.tangram_client = client
    rollouts = [AgentData() for _ in range(ROLLOUTS)]

    async def rollout(n: int, agent: AgentData) -> list[tuple[str, Any, dict[str, Any]]]:
        out = []
        for kind, tool, args in (
            ("code", code, {"code": CODE}),
            ("search", search, {"query": f"q{n}"}),
            ("test", test, {"tests": TEST}),
        ):
            await asyncio.sleep(0.01)  # "generation" between tool calls
            response, reward, metrics = await call_tool(tool, args, agent)
            assert reward == 0.0
            out.append((kind, response, metrics))
        return out

    try:
        results = await asyncio.gather(*(rollout(n, a) for n, a in enumerate(rollouts)))
    finally:
        await search.aclose()
        server.close()
    runs = []
    for agent, calls in zip(rollouts, results, strict=True):
        assert [kind for kind, _, _ in calls] == ["code", "search", "test"]
        for kind, response, metrics in calls:
            assert isinstance(response, ToolResponse)
            assert "tangram_error" not in metrics, response.text
            assert metrics["trajectory"] == f"verl-{agent.request_id}"
            if kind == "search":
                assert metrics["tokens"] == SearchServer.TOKENS
                assert len(json.loads(response.text)["hits"]) == 3
                continue
            assert metrics["exit_code"] == 0, response.text
            seen = json.loads(response.text)
            assert seen["kind"] == kind
            # The command ran on exactly the granted cores, {dop} and {cores} filled in.
            assert seen["affinity"] == sorted(metrics["cores"])
            assert seen["cores"] == ",".join(map(str, metrics["cores"]))
            assert seen["dop"] == metrics["dop"] == len(metrics["cores"])
            assert seen["argv"] == ["--dop", str(metrics["dop"]), "--cores", seen["cores"]]
            assert set(seen["affinity"]) <= set(CORES)
            runs.append(seen)
    assert len(runs) == 2 * ROLLOUTS
    # No core ran two commands at once.
    for i, a in enumerate(runs):
        for b in runs[i + 1 :]:
            if a["t0"] < b["t1"] and b["t0"] < a["t1"]:
                assert not set(a["affinity"]) & set(b["affinity"]), (a, b)
    # Every search reached the server, never more at once than the pool's permits.
    assert sorted(server.queries) == sorted(f"q{n}" for n in range(ROLLOUTS))
    assert 1 <= search.peak <= CONFIG["pools"]["search"]["concurrency"]
    assert len(client.released) == 3 * ROLLOUTS
    assert all(outcome == "ok" for _, outcome, _ in client.released)
    tokens = [u for _, _, u in client.released if u.get("tokens") is not None]
    assert tokens == [{"tokens": SearchServer.TOKENS}] * ROLLOUTS
    for tool in (code, test, search):
        assert tool._instances == {}  # every instance released
    snap = await client.snapshot()
    assert snap["leases"] == 0
    assert snap["pools"]["cpu"]["in_use"] == 0 and snap["pools"]["search"]["in_use"] == 0
    # The trajectories stay open (verl never says a rollout ended) until they are idle
    # for trajectory_idle_seconds; then the broker closes them.
    snap = await until(client, lambda s: s["pools"]["cpu"]["trajectories"] == 0)
    assert snap["counts"]["idle_closed"] >= ROLLOUTS


# ---------------------------------------------------------------------- the sandbox
async def test_sandbox_trajectory_from_create_kwargs_and_bad_calls(client: Recording) -> None:
    tool = tv.TangramSandboxTool({"type": "native", "command": "{python} solution.py"}, None)
    tool.tangram_client = client
    response, _, metrics = await call_tool(
        tool,
        {"code": "import sys; print('hi'); sys.exit(3)"},
        AgentData(),
        create_kwargs={"tangram_trajectory": "traj-7"},
    )
    assert metrics["trajectory"] == "traj-7" and metrics["exit_code"] == 3
    assert response.text == "hi\n\n[exit code 3]"
    response, _, metrics = await call_tool(tool, {"code": 42}, AgentData())
    assert metrics == {"tangram_error": "invalid"} and "must be a string" in response.text
    await client.close_trajectory("traj-7")


# ---------------------------------------------------------------------- the API tool
async def test_api_calls_respect_the_pools_concurrency_and_report_tokens(
    client: Recording,
) -> None:
    tool = tv.TangramApiTool({"type": "native", "pool": "api", "tokens": 100}, None)
    tool.tangram_client = client
    held: dict[int, str] = {}
    peak = 0

    async def fake_api(parameters: dict[str, Any], lease: Lease) -> tuple[str, int]:
        nonlocal peak
        units = list(lease.allocation["api"].units)
        for u in units:
            assert u not in held, f"permit {u} held by {held[u]} and {lease.id}"
            held[u] = lease.id
        peak = max(peak, len(held))
        await asyncio.sleep(0.05)
        for u in units:
            del held[u]
        return f"answer {parameters['q']}", 7

    tool.function = fake_api
    agents = [AgentData() for _ in range(10)]
    out = await asyncio.gather(*(call_tool(tool, {"q": i}, a) for i, a in enumerate(agents)))
    assert [r.text for r, _, _ in out] == [f"answer {i}" for i in range(10)]
    assert peak == 2  # the pool's concurrency, reached and never passed
    assert all(m["tokens"] == 7 for _, _, m in out)
    trajectories = [m["trajectory"] for _, _, m in out]
    assert trajectories == [f"verl-{a.request_id}" for a in agents]
    assert [(o, u) for _, o, u in client.released] == [("ok", {"tokens": 7})] * 10
    snap = await client.snapshot()
    assert snap["leases"] == 0 and snap["pools"]["api"]["in_use"] == 0


async def test_api_tool_over_http_errors_and_a_busy_pool(client: Recording) -> None:
    seen: list[dict[str, Any]] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        if body.get("fail"):
            return httpx.Response(500, json={"error": "boom"})
        return httpx.Response(200, json={"answer": body["q"], "usage": {"total_tokens": 11}})

    tool = tv.TangramApiTool(
        {"type": "native", "url": "http://api.test/v1/ask", "tokens": 50, "timeout": 0.5}, None
    )
    tool.tangram_client = client
    tool.http = httpx.AsyncClient(transport=httpx.MockTransport(upstream))
    response, _, metrics = await call_tool(tool, {"q": "x"}, AgentData())
    assert json.loads(response.text) == {"answer": "x", "usage": {"total_tokens": 11}}
    assert metrics["tokens"] == 11 and client.released[-1][1:] == ("ok", {"tokens": 11})

    response, _, metrics = await call_tool(tool, {"q": "y", "fail": True}, AgentData())
    assert metrics == {"tangram_error": "call_failed"} and "HTTP 500" in response.text
    assert client.released[-1][1] == "error"

    # Both permits held elsewhere: the call waits `timeout`, then says the pool is busy.
    other = [await client.acquire(Action.build("other", {"api": 1})) for _ in range(2)]
    response, _, metrics = await call_tool(tool, {"q": "z"}, AgentData())
    assert metrics == {"tangram_error": "TimeoutError"} and "did not run" in response.text
    for lease in other:
        await client.release(lease.id)
    assert len(seen) == 2
    await tool.http.aclose()
    snap = await until(client, lambda s: s["queued"] == 0 and s["leases"] == 0)
    assert snap["pools"]["api"]["in_use"] == 0


# ---------------------------------------------------------------------- registration
def test_tools_register_from_verls_tool_config_yaml(tmp_path: Path) -> None:
    pytest.importorskip("omegaconf", reason="verl's tool registry needs omegaconf")
    registry = importlib.import_module("verl.tools.tool_registry")
    path = tmp_path / "tools.yaml"
    path.write_text(
        """\
tools:
  - class_name: tangram.integrations.verl.TangramSandboxTool
    config:
      type: native
      pool: cpu
      demand: {min: 1, max: 4}
      timeout: 120
      command: "{python} -m pytest -q -n {dop} tests"
  - class_name: tangram.integrations.verl.TangramApiTool
    config:
      type: native
      pool: api
      broker: tangram
      url: http://judge:8000/v1/score
      tokens: 800
    tool_schema:
      type: function
      function:
        name: judge
        description: Score an answer.
        parameters:
          type: object
          properties:
            answer: {type: string, description: The answer.}
          required: [answer]
"""
    )
    sandbox, api = registry.initialize_tools_from_config(str(path))
    assert isinstance(sandbox, tv.TangramSandboxTool) and isinstance(api, tv.TangramApiTool)
    assert sandbox.name == "code_interpreter" and api.name == "judge"
    assert sandbox.demand == {"min": 1, "max": 4} and sandbox.timeout == 120.0
    assert sandbox.command == "{python} -m pytest -q -n {dop} tests"
    assert api.pool == "api" and api.tokens == 800 and api.broker_name == "tangram"
    assert api.tool_schema.function.parameters.required == ["answer"]


async def test_trajectory_fallbacks() -> None:
    assert tv.trajectory_of("i1", {"agent_data": AgentData()}).startswith("verl-")
    agent = AgentData()
    assert tv.trajectory_of("i1", {"agent_data": agent}) == f"verl-{agent.request_id}"
    assert tv.trajectory_of("i1", {"agent_data": agent}, "mine") == "mine"
    assert tv.trajectory_of("i1", {}) == "verl-i1"  # no agent_data: the call's own
    tool = tv.TangramApiTool({"type": "native", "trajectory_prefix": "r-"}, None)
    iid, response = await tool.create(tangram_trajectory="t-9")
    assert isinstance(response, ToolResponse)
    assert tool.trajectory(iid, {"agent_data": agent}) == "t-9"
    await tool.release(iid)
    iid, _ = await tool.create("fixed", create_kwargs={})
    assert iid == "fixed" and tool.trajectory(iid, {}) == "r-fixed"
    assert tv._resolve("json:dumps") is json.dumps


WITHOUT_VERL = """
import asyncio, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "verl":
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None
sys.meta_path.insert(0, Block())
from tangram.integrations import verl as tv
assert not tv.VERL_AVAILABLE
tool = tv.TangramSandboxTool({"type": "native"}, None)
assert tool.name == "code_interpreter"
assert tool.tool_schema.function.parameters["required"] == ["code"]
iid, response = asyncio.run(tool.create(create_kwargs={}))
assert response.text is None and isinstance(iid, str)
print("ok")
"""


def test_without_verl_the_tools_keep_verls_interface() -> None:
    """verl not importable (no torch): a local base with the same methods."""
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_VERL], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
