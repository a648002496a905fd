"""verl agent-loop tools whose calls run under Tangram leases.

Two tools for verl's ``ToolAgentLoop``, registered by class path in verl's tool-config
YAML like any other ``BaseTool``:

- ``TangramSandboxTool`` runs the model's code in the broker's CPU sandbox: each call
  leases cores of a CPU pool (elastic: ``demand: {min: 1, max: 4}``), writes the code
  into the trajectory's working directory and runs a command there on exactly the
  granted cores (``{dop}``, ``{cores}`` and ``{python}`` filled in by the executor).
- ``TangramApiTool`` leases units of a quota pool around an API call: an HTTP request
  (``url:``), a user-supplied async function (``function: "pkg.mod:fn"``) or the
  ``call`` method of a subclass, and reports the tokens the call used at release.

    tools:
      - class_name: tangram.integrations.verl.TangramSandboxTool
        config: {type: native, pool: cpu, demand: {min: 1, max: 4}, timeout: 120}

verl's ``ToolAgentLoop`` calls ``create``, ``execute`` and ``release`` once per tool call,
from the asyncio tasks of its agent-loop workers (Ray actors), and passes the
trajectory's state to ``execute`` as ``agent_data``; its ``request_id`` is the Tangram
trajectory (``verl-<request_id>``), so one rollout's calls share one trajectory (one
pinned node, one sandbox working directory). verl has no end-of-trajectory hook: the
broker closes a trajectory after ``trajectory_idle_seconds`` with nothing queued or held.

verl is used when it can be imported (``verl.tools.base_tool``, which imports torch
through ``verl/__init__.py``); otherwise the tools subclass a local base with the same
interface (``__init__(config, tool_schema)``, ``create``, ``execute``, ``calc_reward``,
``release``) and return a local ``ToolResponse`` with ``text``, ``image`` and ``video``.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import httpx
from pydantic import BaseModel, Field

from tangram.executors.api import tokens_in
from tangram.executors.sandbox import Command, CommandResult
from tangram.ray.client import Client
from tangram.ray.transport import DEFAULT_NAME, DEFAULT_NAMESPACE
from tangram.spec import Action, Lease, TangramError

__all__ = [
    "VERL_AVAILABLE",
    "TangramApiTool",
    "TangramSandboxTool",
    "TangramTool",
    "ToolResponse",
    "trajectory_of",
]

log = logging.getLogger(__name__)

TRAJECTORY_KEY = "tangram_trajectory"


# ---------------------------------------------------------------------- the base
class _LocalToolResponse(BaseModel):
    """What a tool call answers (the fields of verl's ``ToolResponse``)."""

    text: str | None = None
    image: list[Any] | None = None
    video: list[Any] | None = None


class _LocalFunction(BaseModel):
    name: str
    description: str
    parameters: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object", "properties": {}, "required": []}
    )
    strict: bool = False


class _LocalToolSchema(BaseModel):
    """A tool's OpenAI function schema (the fields of verl's ``OpenAIFunctionToolSchema``)."""

    type: str
    function: _LocalFunction


class _LocalBaseTool:
    """verl's ``BaseTool`` interface, for when verl cannot be imported."""

    def __init__(self, config: dict[str, Any], tool_schema: Any) -> None:
        self.config = config
        self.tool_schema = tool_schema or self.get_openai_tool_schema()
        assert self.tool_schema is not None, "no tool schema"
        self.name: str = self.tool_schema.function.name

    def get_openai_tool_schema(self) -> Any:
        return self.tool_schema

    async def create(
        self, instance_id: str | None = None, **kwargs: Any
    ) -> tuple[str, _LocalToolResponse]:
        return instance_id or str(uuid.uuid4()), _LocalToolResponse()

    async def execute(
        self, instance_id: str, parameters: dict[str, Any], **kwargs: Any
    ) -> tuple[_LocalToolResponse, float, dict[str, Any]]:
        return _LocalToolResponse(text=""), 0.0, {}

    async def calc_reward(self, instance_id: str, **kwargs: Any) -> float:
        return 0.0

    async def release(self, instance_id: str, **kwargs: Any) -> None:
        return None


def _verl() -> tuple[Any, Any, Any, bool]:
    """verl's ``BaseTool``, ``ToolResponse`` and ``OpenAIFunctionToolSchema``, or the
    local ones (and whether verl's they are)."""
    try:
        base = importlib.import_module("verl.tools.base_tool")
        schemas = importlib.import_module("verl.tools.schemas")
    except ImportError as exc:
        log.debug("verl not importable (%s): Tangram's tools use a local BaseTool", exc)
        return _LocalBaseTool, _LocalToolResponse, _LocalToolSchema, False
    return base.BaseTool, schemas.ToolResponse, schemas.OpenAIFunctionToolSchema, True


if TYPE_CHECKING:
    _BaseTool = _LocalBaseTool
    ToolResponse = _LocalToolResponse
    _ToolSchema = _LocalToolSchema
    VERL_AVAILABLE: bool
else:
    _BaseTool, ToolResponse, _ToolSchema, VERL_AVAILABLE = _verl()


def trajectory_of(
    instance_id: str, kwargs: Mapping[str, Any], default: str | None = None, prefix: str = "verl-"
) -> str:
    """The Tangram trajectory of a tool call: ``default`` when set (a sample's
    ``create_kwargs["tangram_trajectory"]``), else ``prefix`` + the ``request_id`` of the
    ``agent_data`` verl's ``ToolAgentLoop`` passes to ``execute``, else ``prefix`` + the
    tool instance id (the call is then a trajectory of its own)."""
    if default:
        return default
    agent_data = kwargs.get("agent_data")
    request_id = getattr(agent_data, "request_id", None)
    if request_id:
        return f"{prefix}{request_id}"
    return f"{prefix}{instance_id}"


class TangramTool(_BaseTool):
    """What both tools share: the config, the client, the trajectory of each call.

    Config keys (from the tool-config YAML): ``pool`` (the pool to lease), ``demand``
    (units of it: a number, ``{min, max}`` or a list of sizes), ``timeout`` (seconds to
    wait for the grant; then the call answers that the pool is busy), ``ttl`` (the lease's
    time to live; the broker's default when unset), ``broker`` and ``namespace`` (the
    broker actor's name), ``trajectory_prefix`` (``verl-``), ``task`` and ``tenant``.

    ``tangram_client``: the ``tangram.ray.Client`` to lease through; set it on the class
    or the instance to choose one, else one client per event loop is made for the
    configured broker (a client is bound to the loop that first uses it)."""

    default_pool = "cpu"
    default_name = "tangram_tool"
    default_description = "A tool whose calls run under Tangram leases."
    tangram_client: Client | None = None

    def __init__(self, config: dict[str, Any] | None = None, tool_schema: Any = None) -> None:
        config = dict(config or {})
        self.pool: str = str(config.get("pool", self.default_pool))
        self.demand: Any = config.get("demand", 1)
        timeout = config.get("timeout", 60.0)
        self.timeout: float | None = None if timeout is None else float(timeout)
        ttl = config.get("ttl")
        self.ttl: float | None = None if ttl is None else float(ttl)
        self.broker_name: str = str(config.get("broker", DEFAULT_NAME))
        self.namespace: str = str(config.get("namespace", DEFAULT_NAMESPACE))
        self.prefix: str = str(config.get("trajectory_prefix", "verl-"))
        self.task: str = str(config.get("task", "default"))
        tenant = config.get("tenant")
        self.tenant: str | None = None if tenant is None else str(tenant)
        # Instance id -> the trajectory its sample named in create_kwargs (or None).
        self._instances: dict[str, str | None] = {}
        self._clients: dict[asyncio.AbstractEventLoop, Client] = {}
        super().__init__(config, tool_schema)

    # ---- the schema -----------------------------------------------------------------
    def parameters_schema(self) -> dict[str, Any]:
        return {"type": "object", "properties": {}, "required": []}

    def get_openai_tool_schema(self) -> Any:
        schema = self.__dict__.get("tool_schema")
        if schema is not None:
            return schema
        return _ToolSchema.model_validate(
            {
                "type": "function",
                "function": {
                    "name": self.default_name,
                    "description": self.default_description,
                    "parameters": self.parameters_schema(),
                },
            }
        )

    # ---- the client -----------------------------------------------------------------
    def client(self) -> Client:
        """The client this call leases through (on the running event loop)."""
        if self.tangram_client is not None:
            return self.tangram_client
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            for old in [x for x in self._clients if x.is_closed()]:
                del self._clients[old]
            client = Client(name=self.broker_name, namespace=self.namespace)
            self._clients[loop] = client
        return client

    async def aclose(self) -> None:
        """Close the client this tool made on the running event loop."""
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()

    # ---- verl's lifecycle -----------------------------------------------------------
    async def create(
        self, instance_id: str | None = None, **kwargs: Any
    ) -> tuple[str, _LocalToolResponse]:
        """A tool instance for one call. ``ToolAgentLoop`` passes the sample's
        ``tools_kwargs[<tool>]["create_kwargs"]`` as ``create_kwargs``; a
        ``tangram_trajectory`` there (or as a keyword) names the call's trajectory."""
        instance_id = instance_id or uuid.uuid4().hex
        create_kwargs = kwargs.get("create_kwargs") or {}
        named = kwargs.get(TRAJECTORY_KEY) or create_kwargs.get(TRAJECTORY_KEY)
        self._instances[instance_id] = None if named is None else str(named)
        return instance_id, ToolResponse()

    def trajectory(self, instance_id: str, kwargs: Mapping[str, Any]) -> str:
        """The trajectory of ``execute(instance_id, ..., **kwargs)`` (``trajectory_of``)."""
        return trajectory_of(instance_id, kwargs, self._instances.get(instance_id), self.prefix)

    def action(self, trajectory: str, **fields: Any) -> Action:
        """The action of one call: ``demand`` units of ``pool`` (``fields``: more of
        ``Action.build``'s, such as ``tokens`` or ``duration``)."""
        fields.setdefault("ttl", self.ttl)
        fields.setdefault("task", self.task)
        fields.setdefault("tenant", self.tenant)
        return Action.build(trajectory, {self.pool: self.demand}, **fields)

    async def calc_reward(self, instance_id: str, **kwargs: Any) -> float:
        return 0.0

    async def release(self, instance_id: str, **kwargs: Any) -> None:
        """Forget the instance; the call's lease was released when ``execute`` returned
        (the trajectory stays open on the broker until it is idle)."""
        self._instances.pop(instance_id, None)


def _refusal(
    tool: str, pool: str, exc: BaseException
) -> tuple[_LocalToolResponse, float, dict[str, Any]]:
    why = "no grant in time" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
    text = f"Tool {tool!r} did not run: pool {pool!r} refused or was busy ({why})."
    return ToolResponse(text=text), 0.0, {"tangram_error": type(exc).__name__}


# ---------------------------------------------------------------------- the sandbox
class TangramSandboxTool(TangramTool):
    """Runs the model's code in the Tangram CPU sandbox on leased cores.

    Each ``execute`` leases ``demand`` cores of ``pool`` (``{min, max}``: elastic, the
    broker picks how many), writes ``parameters[code_param]`` to ``filename`` in the
    trajectory's working directory (kept between the trajectory's calls) and runs
    ``command`` there on exactly the granted cores, then releases the cores. In
    ``command``, ``{dop}`` is the number of cores granted (``pytest -n {dop}``),
    ``{cores}`` their ids and ``{python}`` the executor's Python.

    More config keys: ``command`` (``"{python} {filename}"``), ``code_param`` (``code``),
    ``filename`` (``solution.py``), ``run_timeout`` (the command's wall-clock limit, 30 s),
    ``memory_gb`` (the trajectory's memory reservation on its node), ``duration`` and
    ``efficiency`` (the scheduler's estimate and speed-up model, for elastic demands),
    ``memory_mb``, ``max_procs``, ``max_file_mb``, ``env`` (the command's limits and
    environment), ``max_output`` (characters of stdout and stderr in the answer)."""

    default_pool = "cpu"
    default_name = "code_interpreter"
    default_description = "Run Python code in a sandbox and return its output."

    def __init__(self, config: dict[str, Any] | None = None, tool_schema: Any = None) -> None:
        cfg = dict(config or {})
        self.code_param: str = str(cfg.get("code_param", "code"))
        self.filename: str = str(cfg.get("filename", "solution.py"))
        self.command: str = str(cfg.get("command", "{python} " + self.filename))
        self.run_timeout: float = float(cfg.get("run_timeout", 30.0))
        self.memory_gb: float = float(cfg.get("memory_gb", 0.0))
        duration = cfg.get("duration")
        self.duration: float | None = None if duration is None else float(duration)
        self.efficiency: Any = cfg.get("efficiency")
        self.limits: dict[str, Any] = {
            k: cfg[k] for k in ("memory_mb", "max_procs", "max_file_mb", "env") if k in cfg
        }
        self.max_output: int = int(cfg.get("max_output", 8000))
        super().__init__(cfg, tool_schema)

    def parameters_schema(self) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {self.code_param: {"type": "string", "description": "The code to run."}},
            "required": [self.code_param],
        }

    def command_for(self, parameters: Mapping[str, Any]) -> Command:
        """The sandbox command of one call (override to run something else)."""
        code = parameters.get(self.code_param)
        if not isinstance(code, str):
            raise ValueError(f"parameter {self.code_param!r} must be a string of code")
        return Command(
            self.command, timeout=self.run_timeout, files={self.filename: code}, **self.limits
        )

    def format(self, result: CommandResult) -> str:
        """The text the model sees: stdout, stderr, and the exit unless it was 0."""
        parts = [result.stdout]
        if result.stderr:
            parts.append(f"[stderr]\n{result.stderr}")
        if result.timed_out:
            parts.append(f"[timed out after {self.run_timeout:g} s]")
        elif result.exit_code != 0:
            parts.append(f"[exit code {result.exit_code}]")
        text = "\n".join(p for p in parts if p)
        if len(text) > self.max_output:
            text = text[: self.max_output] + "...(truncated)"
        return text

    async def execute(
        self, instance_id: str, parameters: dict[str, Any], **kwargs: Any
    ) -> tuple[_LocalToolResponse, float, dict[str, Any]]:
        try:
            command = self.command_for(parameters)
            command.check()
        except ValueError as exc:
            return ToolResponse(text=f"Invalid call: {exc}"), 0.0, {"tangram_error": "invalid"}
        traj = self.trajectory(instance_id, kwargs)
        action = self.action(
            traj,
            key=self.pool,
            duration=self.duration,
            efficiency=self.efficiency,
            memory_gb=self.memory_gb,
        )
        client = self.client()
        t0 = time.monotonic()
        try:
            async with client.lease(action, timeout=self.timeout) as lease:
                waited = time.monotonic() - t0
                result: CommandResult = await client.run_on(lease, command)
        except (TangramError, TimeoutError) as exc:
            return _refusal(self.name, self.pool, exc)
        metrics = {
            "trajectory": traj,
            "lease": lease.id,
            "node": result.node,
            "cores": list(result.cores),
            "dop": result.dop,
            "exit_code": result.exit_code,
            "timed_out": result.timed_out,
            "wall_seconds": result.wall_seconds,
            "lease_wait_seconds": waited,
        }
        return ToolResponse(text=self.format(result)), 0.0, metrics


# ---------------------------------------------------------------------- the API
ApiFunction = Callable[..., Awaitable[Any]]


class TangramApiTool(TangramTool):
    """Calls an API under a quota pool's lease.

    Each ``execute`` leases ``demand`` permits (default 1) of ``pool`` (default ``api``),
    declaring ``tokens`` (the call's estimate, for a ``tokens_per_minute`` limit), runs
    ``call`` and releases with the tokens the call used, so the pool charges what was
    really used. ``call`` is, by the config: ``url`` (``method``, ``headers``,
    ``request_timeout``): an HTTP request with the call's parameters as its JSON body,
    the response's ``usage.total_tokens`` (``usage_path``) as the tokens used; or
    ``function: "pkg.mod:fn"``: ``await fn(parameters, lease)``. A subclass may override
    ``call`` instead. A call returns text, a ``ToolResponse``, a mapping (shown as JSON)
    or a pair ``(any of these, tokens used or None)``.

    More config keys: ``description`` and ``parameters`` (the tool's schema when the
    YAML gives no ``tool_schema``), ``name``."""

    default_pool = "api"
    default_name = "api_call"
    default_description = "Call an API with the given arguments."

    def __init__(self, config: dict[str, Any] | None = None, tool_schema: Any = None) -> None:
        cfg = dict(config or {})
        url = cfg.get("url")
        self.url: str | None = None if url is None else str(url)
        self.method: str = str(cfg.get("method", "POST")).upper()
        self.headers: dict[str, str] = {
            str(k): str(v) for k, v in (cfg.get("headers") or {}).items()
        }
        self.request_timeout: float = float(cfg.get("request_timeout", 60.0))
        self.usage_path: tuple[str, ...] = tuple(cfg.get("usage_path", ("usage", "total_tokens")))
        tokens = cfg.get("tokens")
        self.tokens: int | None = None if tokens is None else int(tokens)
        function = cfg.get("function")
        self.function: ApiFunction | None = None if function is None else _resolve(str(function))
        self._schema_parameters: dict[str, Any] | None = cfg.get("parameters")
        self._name: str = str(cfg.get("name", self.default_name))
        self._description: str = str(cfg.get("description", self.default_description))
        # The HTTP client of the ``url`` calls, one per event loop (set ``http`` to choose).
        self.http: httpx.AsyncClient | None = None
        self._http: dict[asyncio.AbstractEventLoop, httpx.AsyncClient] = {}
        super().__init__(cfg, tool_schema)

    def get_openai_tool_schema(self) -> Any:
        schema = self.__dict__.get("tool_schema")
        if schema is not None:
            return schema
        return _ToolSchema.model_validate(
            {
                "type": "function",
                "function": {
                    "name": self._name,
                    "description": self._description,
                    "parameters": self._schema_parameters or self.parameters_schema(),
                },
            }
        )

    def _client_http(self) -> httpx.AsyncClient:
        if self.http is not None:
            return self.http
        loop = asyncio.get_running_loop()
        client = self._http.get(loop)
        if client is None:
            client = self._http[loop] = httpx.AsyncClient()
        return client

    async def call(self, parameters: dict[str, Any], lease: Lease, **kwargs: Any) -> Any:
        """The API call, made while ``lease`` is held (see the class)."""
        if self.function is not None:
            return await self.function(parameters, lease)
        if self.url is None:
            raise NotImplementedError(
                f"{type(self).__name__} needs config url: or function:, or a call() override"
            )
        resp = await self._client_http().request(
            self.method,
            self.url,
            json=parameters if self.method != "GET" else None,
            params=parameters if self.method == "GET" else None,
            headers=self.headers or None,
            timeout=self.request_timeout,
        )
        try:
            body: Any = resp.json()
        except ValueError:
            body = resp.text
        if resp.status_code >= 400:
            raise _HttpStatus(resp.status_code, body)
        return body, tokens_in(body, self.usage_path)

    async def execute(
        self, instance_id: str, parameters: dict[str, Any], **kwargs: Any
    ) -> tuple[_LocalToolResponse, float, dict[str, Any]]:
        traj = self.trajectory(instance_id, kwargs)
        action = self.action(traj, tokens=self.tokens)
        client = self.client()
        t0 = time.monotonic()
        try:
            ctx = client.lease(action, timeout=self.timeout)
            async with ctx as lease:
                waited = time.monotonic() - t0
                try:
                    out = await self.call(parameters, lease, **kwargs)
                except Exception as exc:
                    # The call failed: the lease goes back with outcome "error" (the
                    # estimate is charged); the model sees why.
                    raise _CallFailed(exc) from exc
                value, used = out if _is_pair(out) else (out, None)
                if used is not None:
                    ctx.report(tokens=int(used))
        except _CallFailed as failed:
            cause = failed.__cause__ or failed
            text = f"Error calling {self.name!r}: {type(cause).__name__}: {cause}"
            return ToolResponse(text=text), 0.0, {"tangram_error": "call_failed"}
        except (TangramError, TimeoutError) as exc:
            return _refusal(self.name, self.pool, exc)
        metrics: dict[str, Any] = {
            "trajectory": traj,
            "lease": lease.id,
            "units": list(lease.allocation[self.pool].units),
            "lease_wait_seconds": waited,
        }
        if used is not None:
            metrics["tokens"] = int(used)
        return _response(value), 0.0, metrics

    async def aclose(self) -> None:
        http = self._http.pop(asyncio.get_running_loop(), None)
        if http is not None:
            await http.aclose()
        await super().aclose()


class _HttpStatus(Exception):
    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {str(body)[:500]}")
        self.status = status


class _CallFailed(Exception):
    """The user's call raised (its exception is the cause)."""


def _is_pair(out: Any) -> bool:
    return (
        isinstance(out, tuple)
        and len(out) == 2
        and (out[1] is None or (isinstance(out[1], int | float) and not isinstance(out[1], bool)))
    )


def _response(value: Any) -> _LocalToolResponse:
    if isinstance(value, ToolResponse):
        return value
    if hasattr(value, "text") and hasattr(value, "image") and hasattr(value, "video"):
        return ToolResponse(text=value.text, image=value.image, video=value.video)
    if isinstance(value, str):
        return ToolResponse(text=value)
    try:
        return ToolResponse(text=json.dumps(value))
    except (TypeError, ValueError):
        return ToolResponse(text=str(value))


def _resolve(path: str) -> ApiFunction:
    """``"pkg.mod:fn"`` (or ``"pkg.mod.fn"``): the async function it names."""
    module, _, name = path.partition(":") if ":" in path else path.rpartition(".")
    if not module or not name:
        raise ValueError(f"function must be 'module:function', got {path!r}")
    fn = getattr(importlib.import_module(module), name)
    if not callable(fn):
        raise ValueError(f"{path!r} is not callable")
    return fn  # type: ignore[no-any-return]
