"""A trajectory's sandbox as one object: ``exec``, ``upload``, ``download``, ``status``,
``close``, each through the broker.

    async with client.sandbox("traj-7", pool="cpu") as box:   # closed on exit
        await box.upload("solution.py", code)
        result = await box.exec("pytest -q -n {dop}", cores=(1, 8))
        report = await box.download("report.xml")

The sandbox is whatever the pool's executors run (bubblewrap working directories or a
container per trajectory, docs/sandboxes.md); it lives on the node the broker pinned
the trajectory to. ``exec`` leases ``cores`` (a number, or ``(min, max)`` for the
scheduler to choose), runs the command on exactly the granted cores and releases them.
``upload`` and ``download`` run under a lease of one core of the same pool, so they are
fenced like commands (a file never moves for a trajectory whose lease went to another
client) and land on the trajectory's node; ``status`` asks that node's executor
directly. This is the shape agent frameworks' sandbox providers expect (create, exec,
upload, download, status, close), so adapters stay thin.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tangram.executors.sandbox import Command, CommandResult
from tangram.spec import Action

if TYPE_CHECKING:
    from tangram.ray.client import Client

Cores = int | tuple[int, int]


class Sandbox:
    """One trajectory's sandbox on a CPU pool (``Client.sandbox`` makes one)."""

    def __init__(
        self,
        client: Client,
        trajectory: str,
        pool: str = "cpu",
        *,
        task: str = "sandbox",
        timeout: float | None = None,
    ) -> None:
        if not isinstance(trajectory, str) or not trajectory:
            raise ValueError("a sandbox needs a non-empty trajectory id")
        self.client = client
        self.trajectory = trajectory
        self.pool = pool
        self.task = task
        self.timeout = timeout  # how long an operation may wait for its lease

    def _action(self, cores: Cores, task: str, duration: float | None = None) -> Action:
        demand: Any = list(cores) if isinstance(cores, tuple) else cores
        return Action.build(
            self.trajectory, {self.pool: demand}, task=task, key=self.pool, duration=duration
        )

    async def exec(
        self,
        command: str | list[str],
        *,
        cores: Cores = 1,
        timeout: float = 600.0,
        files: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
        duration: float | None = None,
        **limits: Any,
    ) -> CommandResult:
        """Run ``command`` (``{dop}``, ``{cores}``, ``{python}`` filled) on leased cores;
        ``limits`` are ``Command``'s (``memory_mb``, ``max_procs``, ``tmp_mb``, ...).
        ``duration`` (seconds, if known) helps the scheduler choose the cores."""
        cmd = Command(command, timeout=timeout, files=files, env=env, **limits)
        result: CommandResult = await self.client.run(
            self._action(cores, self.task, duration), cmd, timeout=self.timeout
        )
        return result

    async def upload(self, path: str, data: bytes | str) -> None:
        """Write ``data`` to ``path`` (relative to the working directory)."""
        raw = data.encode() if isinstance(data, str) else bytes(data)
        await self._under_lease("upload", path, raw)

    async def download(self, path: str) -> bytes:
        """The bytes of the regular file ``path`` (relative to the working directory)."""
        data: bytes = await self._under_lease("download", path)
        return data

    async def status(self) -> dict[str, Any]:
        """Where the sandbox is and what its executor says of it; ``exists`` is False
        before the first operation and after ``close``."""
        pins: dict[str, str] = await self.client.broker.pins.remote(self.trajectory)
        node = pins.get(self.pool)
        if node is None:
            return {"trajectory": self.trajectory, "pool": self.pool, "exists": False}
        status = await self.client._runner.sandbox_status(self.trajectory, self.pool, node)
        return {"trajectory": self.trajectory, "pool": self.pool, "node": node, **status}

    async def close(self) -> None:
        """Close the trajectory: its sandbox (files, container) is removed."""
        await self.client.close_trajectory(self.trajectory)

    async def _under_lease(self, method: str, *args: Any) -> Any:
        pools = await self.client.pools()
        # A task of its own: a file's move is not a command, for the learned durations.
        action = self._action(1, f"{self.task}-files")
        async with self.client.lease(action, timeout=self.timeout) as lease:
            return await self.client._runner.sandbox_call(lease, pools, method, *args)

    async def __aenter__(self) -> Sandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
