"""The container executor on a Docker engine: ``ContainerRunner``'s design through the
``docker`` SDK (``pip install docker``), for hosts that run dockerd rather than giving
the executor runc and root.

One container per trajectory (``containers.run`` with a cpuset, memory, pids and
network settings, as nobody with no capabilities), per action ``update_container`` to the
lease's cores, ``unpause``, ``exec_run``-style exec of the command, every process but
init killed, ``pause``. Docker cannot unset a cpuset once one is set (moby issue
41946), so a container starts with every core of the host in its cpuset and each
action sets a concrete set: it is never unset.

Differences from runc: the image is whatever the engine has (no ``ImageStore``), and
``/work`` is a tmpfs (mode 1777) because the engine creates a missing working directory
owned by root, and nobody without capabilities could not write there; so ``/work``
counts in the memory limit too. Tested with a mock client only.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import io
import os
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tangram.executors.cgroups import cpulist
from tangram.executors.container import INIT, NOBODY, WORKDIR, PerTrajectory, _mems
from tangram.executors.fencing import DEFAULT_SKEW, Fence, SignedGrant
from tangram.executors.sandbox import (
    THREAD_VARS,
    Command,
    CommandResult,
    Limits,
    SandboxError,
    fill,
    granted_cores,
)

LABEL = "tangram.runner"  # containers of one runner carry its key: found again at start
CPU_PERIOD = 100_000
USER = f"{NOBODY}:{NOBODY}"


@dataclass(slots=True)
class _Box:
    trajectory: str
    container: Any  # docker.models.containers.Container
    created: float
    last_used: float
    paused: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class DockerRunner(PerTrajectory):
    """Runs commands for trajectories in containers of a Docker engine; the same calls
    as ``ContainerRunner`` (``run``, ``upload``, ``download``, ``status``,
    ``close_trajectory``, ``close_idle``, ``trajectories``, ``kill_all``).

    ``root`` only names the runner (its containers are labelled with a hash of it and
    ``node``, and those left by an earlier runner of the same name are removed at
    start). ``client`` is a ``docker.DockerClient`` (default ``docker.from_env()``)."""

    def __init__(
        self,
        root: str,
        node: str = "",
        *,
        image: str,
        client: Any = None,
        limits: Limits | None = None,
        tmp_mb: int = 512,
        work_mb: int = 1024,
        network: str = "none",
        pool: str | None = None,
        fencing_key: bytes | None = None,
        trusted: bool = False,
        grant_skew: float = DEFAULT_SKEW,
        idle_timeout: float | None = 600.0,
    ) -> None:
        fence = Fence(fencing_key, verify=not trusted, skew=grant_skew)
        if network not in ("none", "host"):
            raise SandboxError(f"network must be 'none' or 'host', got {network!r}")
        self.client = client if client is not None else _from_env()
        self.key = hashlib.sha256(f"{root}\0{node}".encode()).hexdigest()[:16]
        self.node = node
        self.pool = pool
        self.image = image
        self.limits = limits or Limits()
        self.tmp_mb, self.work_mb = tmp_mb, work_mb
        self.network = network
        self.idle_timeout = idle_timeout
        self.available = frozenset(os.sched_getaffinity(0))
        self.fence = fence
        self.boxes: dict[str, _Box] = {}
        self._creating = asyncio.Lock()
        self.orphans_removed = self._remove_orphans()

    # ------------------------------------------------------------------ public API
    async def run(
        self,
        trajectory: str,
        cmd: Command,
        cores: Sequence[int],
        dop: int | None = None,
        grant: SignedGrant | None = None,
    ) -> CommandResult:
        cmd.check()
        ids = granted_cores(cores, self.available, self.node)
        self.fence.admit(ids, grant, f"node {self.node or 'here'}", node=self.node, pool=self.pool)
        dop = len(ids) if dop is None else dop
        await self.close_idle()
        box = await self._box(trajectory)
        async with box.lock:
            t0 = time.monotonic()
            lim = self.limits
            memory = (cmd.memory_mb or lim.memory_mb or 4096) * 2**20
            await asyncio.to_thread(
                self.client.api.update_container,
                box.container.id,
                cpuset_cpus=cpulist(ids),
                cpuset_mems=_mems(ids),
                cpu_period=CPU_PERIOD,
                cpu_quota=CPU_PERIOD * len(ids),
                mem_limit=memory,
                memswap_limit=memory,
            )
            if box.paused:
                await asyncio.to_thread(box.container.unpause)
                box.paused = False
            try:
                if cmd.files:
                    await asyncio.to_thread(
                        box.container.put_archive,
                        WORKDIR,
                        _tar({k: v.encode() for k, v in cmd.files.items()}),
                    )
                code, out, err, timed_out = await self._exec(box, cmd, ids, dop)
            finally:
                await asyncio.to_thread(self._kill_commands, box)
                await asyncio.to_thread(box.container.pause)
                box.paused = True
                box.last_used = time.monotonic()
            return CommandResult(
                exit_code=code,
                stdout=out,
                stderr=err,
                timed_out=timed_out,
                cores=ids,
                dop=dop,
                wall_seconds=time.monotonic() - t0,
                workdir=WORKDIR,
                node=self.node,
                extra={"container": box.container.id, "image": self.image},
            )

    async def upload(self, trajectory: str, path: str, data: bytes) -> None:
        """Write ``data`` to ``path`` (relative: in ``/work``) through the engine's
        archive API, which resolves paths inside the container."""
        box = await self._box(trajectory)
        full = path if path.startswith("/") else f"{WORKDIR}/{path}"
        parent, name = full.rsplit("/", 1)
        if not name or ".." in full.split("/"):
            raise SandboxError(f"bad path {path!r}")
        ok = await asyncio.to_thread(box.container.put_archive, parent or "/", _tar({name: data}))
        if not ok:
            raise SandboxError(f"cannot write {path!r} in the container")
        box.last_used = time.monotonic()

    async def download(self, trajectory: str, path: str) -> bytes:
        box = self.boxes.get(trajectory)
        if box is None:
            raise SandboxError(f"trajectory {trajectory!r} has no container here")
        full = path if path.startswith("/") else f"{WORKDIR}/{path}"
        stream, _ = await asyncio.to_thread(box.container.get_archive, full)
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            member = tar.next()
            if member is None or not member.isfile():
                raise SandboxError(f"{path!r} is a symbolic link or not a regular file")
            f = tar.extractfile(member)
            assert f is not None
            box.last_used = time.monotonic()
            return f.read()

    async def status(self, trajectory: str) -> dict[str, Any]:
        box = self.boxes.get(trajectory)
        if box is None:
            return {"trajectory": trajectory, "exists": False}
        await asyncio.to_thread(box.container.reload)
        return {
            "trajectory": trajectory,
            "exists": True,
            "container": box.container.id,
            "state": box.container.status,
            "image": self.image,
            **self._times(box),
        }

    def close_trajectory(self, trajectory: str) -> bool:
        box = self.boxes.pop(trajectory, None)
        if box is None:
            return False
        box.container.remove(force=True)
        return True

    # ------------------------------------------------------------------ internals
    async def _box(self, trajectory: str) -> _Box:
        if not isinstance(trajectory, str) or not trajectory:
            raise SandboxError("a trajectory id must be a non-empty string")
        async with self._creating:
            box = self.boxes.get(trajectory)
            if box is None:
                container = await asyncio.to_thread(self._create, trajectory)
                now = time.monotonic()
                box = self.boxes[trajectory] = _Box(trajectory, container, now, now)
        return box

    def _create(self, trajectory: str) -> Any:
        lim = self.limits
        memory = (lim.memory_mb or 4096) * 2**20
        return self.client.containers.run(
            self.image,
            INIT,
            detach=True,
            name=f"tangram-{self.key}-{hashlib.sha256(trajectory.encode()).hexdigest()[:16]}",
            labels={LABEL: self.key, "tangram.trajectory": trajectory},
            user=USER,
            working_dir=WORKDIR,
            environment={"HOME": WORKDIR, "TMPDIR": "/tmp"},
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            network_mode=self.network,
            # Every core now, a concrete set per action: never unset (moby 41946).
            cpuset_cpus=cpulist(sorted(self.available)),
            mem_limit=memory,
            memswap_limit=memory,
            pids_limit=lim.max_procs or 256,
            tmpfs={
                "/tmp": f"size={self.tmp_mb}m,mode=1777",
                WORKDIR: f"size={self.work_mb}m,mode=1777",
            },
        )

    async def _exec(
        self, box: _Box, cmd: Command, ids: tuple[int, ...], dop: int
    ) -> tuple[int, str, str, bool]:
        command = cmd.command
        if isinstance(command, str):
            command = command.replace("{python}", "python3")
        else:
            command = [a.replace("{python}", "python3") for a in command]
        filled = fill(command, dop, ids)
        argv = ["/bin/sh", "-c", filled] if isinstance(filled, str) else list(filled)
        env = {v: str(dop) for v in THREAD_VARS}
        env.update({"TANGRAM_DOP": str(dop), "TANGRAM_CORES": ",".join(map(str, ids))})
        env.update(cmd.env or {})
        api = self.client.api
        exec_id = api.exec_create(
            box.container.id, argv, user=USER, workdir=WORKDIR, environment=env
        )["Id"]
        start = asyncio.ensure_future(asyncio.to_thread(api.exec_start, exec_id, demux=True))
        timed_out = False
        try:
            out, err = await asyncio.wait_for(asyncio.shield(start), cmd.timeout)
        except TimeoutError:
            timed_out = True
            await asyncio.to_thread(self._kill_commands, box)
            out, err = await start  # the stream ends with the killed processes
        code = api.exec_inspect(exec_id).get("ExitCode")
        cap = cmd.max_output
        return (
            code if code is not None else -9,
            (out or b"")[:cap].decode(errors="replace"),
            (err or b"")[:cap].decode(errors="replace"),
            timed_out,
        )

    def _kill_commands(self, box: _Box) -> None:
        """SIGKILL every process of the container but its init: ``kill -9 -1`` as the
        commands' user, which signals everything it may except pid 1 of its namespace."""
        box.container.exec_run(["kill", "-9", "-1"], user=USER)

    def _remove_orphans(self) -> list[str]:
        found = self.client.containers.list(all=True, filters={"label": f"{LABEL}={self.key}"})
        for c in found:
            c.remove(force=True)
        return sorted(c.id for c in found)


def _from_env() -> Any:
    try:
        docker = importlib.import_module("docker")
    except ImportError as exc:
        raise SandboxError("the Docker backend needs the docker SDK (pip install docker)") from exc
    try:
        return docker.from_env()
    except Exception as exc:  # docker.errors.DockerException: no engine answers
        raise SandboxError(f"no Docker engine answers here: {exc}") from exc


def _tar(files: dict[str, bytes]) -> bytes:
    """A tar of ``files`` (relative paths) owned by the commands' user."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            info.uid = info.gid = NOBODY
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
