"""The container executor: one long-lived runc container per trajectory.

Where ``SandboxRunner`` gives a trajectory a working directory on the host, this runner
gives it a whole container from an OCI image (``tangram.executors.images``): created at
the trajectory's first action, kept with its filesystem between actions, removed when
the trajectory closes or has been idle for ``idle_timeout`` seconds.

- Filesystem: an overlay per trajectory, the image's unpacked root (shared, read-only)
  below and the trajectory's own upper directory above; a copy of the image's root where
  overlayfs is not available. A tmpfs ``/tmp`` of ``tmp_mb``, a working directory
  ``/work`` owned by nobody.
- Processes: an init that only waits (``sleep infinity`` with SIGCHLD ignored, so that
  the kernel reaps the orphans it adopts), commands run with ``runc exec`` as nobody
  (65534) with no capabilities and ``noNewPrivileges``; new PID, IPC, UTS, mount, cgroup
  and network namespaces (only a loopback unless ``network="host"``), runc's default
  masked and read-only paths.
- Resources: a cgroup per container. Before an action ``runc update`` sets its cpuset to
  exactly the granted cores (and a CPU quota of as many cores), its memory limit (the
  whole container, the tmpfs included) and its pids limit; ``runc resume`` thaws it.
  After the action every process but init is killed and ``runc pause`` freezes the
  container, so nothing of it runs on cores that went back to the pool.

Every call needs the lease's signed grant, exactly as for ``SandboxRunner`` (see
docs/reliability.md, "Executor fencing"). Needs root (mounts, cgroups) and runc.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tangram.executors.cgroups import cpulist, numa_nodes
from tangram.executors.fencing import DEFAULT_SKEW, Fence, SignedGrant
from tangram.executors.images import Image, ImageStore
from tangram.executors.sandbox import (
    THREAD_VARS,
    Command,
    CommandResult,
    Limits,
    SandboxError,
    fill,
    granted_cores,
    wait_pid,
)

NOBODY = 65534
WORKDIR = "/work"
# The container's first process: it only waits. With SIGCHLD ignored (which survives
# exec on Linux) the kernel reaps at once the orphans it adopts, so killed commands leave
# no zombies counting against the pids limit: coreutils' env can set that up, else the
# image's Python; an image with neither gets a plain sleep, which does not reap.
INIT = [
    "/bin/sh",
    "-c",
    "env --ignore-signal=CHLD true 2>/dev/null && exec env --ignore-signal=CHLD sleep infinity;"
    " command -v python3 >/dev/null && exec python3 -c 'import signal;"
    " signal.signal(signal.SIGCHLD, signal.SIG_IGN); signal.pause()';"
    " exec sleep infinity",
]
RUNC_TIMEOUT = 60.0  # seconds for one runc management call (create, update, pause)
KILL_WAIT = 5.0  # seconds to wait until the killed processes of an action are gone
KILL_GRACE = 2.0  # seconds to drain output pipes once the processes are gone
CPU_PERIOD = 100_000  # microseconds
# Host file systems mounted inside the container: the executor (root on the host) must
# never write or read there on the container's behalf (/proc/sys is the host kernel's).
NO_TRANSFER = frozenset({"proc", "sys", "dev"})


def runc_problem() -> str | None:
    """Why containers cannot run here, or None when they can (as far as can be told
    without starting one)."""
    if shutil.which("runc") is None:
        return "runc is not installed (apt-get install runc; .ci/run does it)"
    if os.geteuid() != 0:
        return "the container executor needs root (overlay mounts, cgroups)"
    return None


@dataclass(slots=True)
class _Box:
    """One trajectory's container, as this runner knows it."""

    trajectory: str
    cid: str
    bundle: Path
    image: Image
    rootfs_mode: str  # "overlay" or "copy"
    pid: int  # init's pid on the host
    root_fd: int  # the container's root directory, as its own mounts see it
    created: float
    last_used: float
    paused: bool = False
    applied: tuple[str, ...] = ()  # the last `runc update` settings
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class PerTrajectory:
    """What every container backend shares: one container per trajectory (``boxes``,
    each with ``created``, ``last_used`` and a ``lock`` held while it runs), removed
    by ``close_trajectory`` or after ``idle_timeout`` seconds unused."""

    boxes: dict[str, Any]
    idle_timeout: float | None

    def close_trajectory(self, trajectory: str) -> bool:
        raise NotImplementedError

    async def close_idle(self) -> list[str]:
        """Remove the containers idle for ``idle_timeout`` seconds; their trajectories."""
        if self.idle_timeout is None:
            return []
        cutoff = time.monotonic() - self.idle_timeout
        idle = [t for t, b in self.boxes.items() if b.last_used < cutoff and not b.lock.locked()]
        for t in idle:
            await asyncio.to_thread(self.close_trajectory, t)
        return idle

    def trajectories(self) -> list[str]:
        """The trajectories with a container here."""
        return sorted(self.boxes)

    def kill_all(self) -> None:
        """Remove every container of this runner (the executor is going away)."""
        for t in list(self.boxes):
            self.close_trajectory(t)

    @staticmethod
    def _times(box: Any) -> dict[str, float]:
        """A box's creation and last use as Unix times (kept on the monotonic clock)."""
        now, mono = time.time(), time.monotonic()
        return {
            "created": now - (mono - box.created),
            "last_used": now - (mono - box.last_used),
        }


class ContainerRunner(PerTrajectory):
    """Runs commands for trajectories in runc containers under ``root``.

    ``image`` is an image reference (``tangram.executors.images``), unpacked through
    ``images`` (an ``ImageStore``; by default one at ``$TANGRAM_IMAGE_STORE`` or
    ``~/.cache/tangram/images``). ``limits`` are the defaults a command's own
    ``memory_mb``, ``max_procs`` and ``max_file_mb`` override: the container's memory
    limit (all its processes and its ``/tmp``), its pids limit, and the file size limit.
    ``network="host"`` shares the host's network; the default ``"none"`` leaves a
    loopback only. ``overlay=False`` copies the image per trajectory instead of an
    overlay (None: overlay when it mounts). Fencing (``pool``, ``fencing_key``,
    ``trusted``, ``grant_skew``) is the same as ``SandboxRunner``'s.

    At start, containers, mounts and bundles a previous runner left under ``root`` (a
    crash) are removed."""

    def __init__(
        self,
        root: str | Path,
        node: str = "",
        *,
        image: str,
        images: ImageStore | None = None,
        limits: Limits | None = None,
        tmp_mb: int | None = None,
        network: str = "none",
        overlay: bool | None = None,
        pool: str | None = None,
        fencing_key: bytes | None = None,
        trusted: bool = False,
        grant_skew: float = DEFAULT_SKEW,
        idle_timeout: float | None = 600.0,
    ) -> None:
        # Before anything is created: a runner that cannot fence must not start.
        fence = Fence(fencing_key, verify=not trusted, skew=grant_skew)
        if (problem := runc_problem()) is not None:
            raise SandboxError(f"cannot run containers: {problem}")
        if network not in ("none", "host"):
            raise SandboxError(f"network must be 'none' or 'host', got {network!r}")
        # The container's /tmp is mounted once, at creation: its size is the runner's.
        tmp_mb = tmp_mb if tmp_mb is not None else (limits or Limits()).tmp_mb or 512
        if isinstance(tmp_mb, bool) or not isinstance(tmp_mb, int) or tmp_mb <= 0:
            raise SandboxError(f"tmp_mb must be a positive whole number, got {tmp_mb!r}")
        if idle_timeout is not None and not idle_timeout > 0:
            raise SandboxError(f"idle_timeout must be positive seconds or None: {idle_timeout!r}")
        self.root = Path(root).resolve()
        self.node = node
        self.pool = pool
        self.image_ref = image
        self.images = images or ImageStore()
        self.limits = limits or Limits()
        self.tmp_mb = tmp_mb
        self.network = network
        self.overlay = overlay
        self.idle_timeout = idle_timeout
        self.available = frozenset(os.sched_getaffinity(0))
        self.fence = fence
        self.state_dir = self.root / "runc"  # runc --root: this runner's containers only
        self.bundles = self.root / "bundles"
        self.boxes: dict[str, _Box] = {}
        self._image: Image | None = None
        self._creating = asyncio.Lock()  # one creation at a time: no two per trajectory
        for d in (self.state_dir, self.bundles):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o700)
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
        """Run ``cmd`` in the trajectory's container on exactly ``cores`` under
        ``grant`` (checked as ``SandboxRunner.run`` checks it, before anything runs)."""
        cmd.check()
        ids = granted_cores(cores, self.available, self.node)
        self.fence.admit(ids, grant, f"node {self.node or 'here'}", node=self.node, pool=self.pool)
        dop = len(ids) if dop is None else dop
        await self.close_idle()
        box = await self._box(trajectory)
        async with box.lock:
            t0 = time.monotonic()
            try:
                await self._lease_cores(box, cmd, ids)
                try:
                    for rel, text in (cmd.files or {}).items():
                        _transfer(box.root_fd, _inside(rel), text.encode(), write=True)
                    result = await self._exec(box, cmd, ids, dop)
                finally:
                    box.last_used = time.monotonic()
                    await self._idle(box)
            except SandboxError:
                await self._forget_if_dead(box)
                raise
            result.wall_seconds = time.monotonic() - t0
            return result

    async def upload(self, trajectory: str, path: str, data: bytes) -> None:
        """Write ``data`` to ``path`` in the trajectory's container (relative: to its
        working directory), owned by the container's user; never through a symbolic
        link."""
        box = await self._box(trajectory)
        box.last_used = time.monotonic()
        await asyncio.to_thread(_transfer, box.root_fd, _inside(path), bytes(data), True)

    async def download(self, trajectory: str, path: str) -> bytes:
        """The contents of the regular file ``path`` in the trajectory's container;
        never through a symbolic link."""
        box = self.boxes.get(self._check_id(trajectory))
        if box is None:
            raise SandboxError(f"trajectory {trajectory!r} has no container here")
        box.last_used = time.monotonic()
        data = await asyncio.to_thread(_transfer, box.root_fd, _inside(path), b"", False)
        assert data is not None
        return data

    async def status(self, trajectory: str) -> dict[str, Any]:
        """Whether the trajectory has a container, its runc state ("running",
        "paused"), image, rootfs kind, and when it was created and last used (Unix
        time)."""
        box = self.boxes.get(self._check_id(trajectory))
        if box is None:
            return {"trajectory": trajectory, "exists": False}
        state = await self._runc_json("state", box.cid)
        return {
            "trajectory": trajectory,
            "exists": True,
            "container": box.cid,
            "state": state.get("status"),
            "pid": box.pid,
            "image": box.image.ref,
            "digest": box.image.digest,
            "rootfs": box.rootfs_mode,
            **self._times(box),
        }

    def close_trajectory(self, trajectory: str) -> bool:
        """Remove the trajectory's container, mounts and files; False if it had none."""
        box = self.boxes.pop(self._check_id(trajectory), None)
        if box is None:
            return False
        os.close(box.root_fd)
        self._remove(box.cid, self.bundles / box.cid)
        return True

    # ------------------------------------------------------------------ containers
    def _check_id(self, trajectory: str) -> str:
        if not isinstance(trajectory, str) or not trajectory:
            raise SandboxError("a trajectory id must be a non-empty string")
        return trajectory

    def _cid(self, trajectory: str) -> str:
        # runc ids are [\w+-.]; the runner's root is in the hash, so that two runners'
        # containers (and their cgroups, which are host-wide) never share a name.
        raw = f"{self.root}\0{trajectory}".encode("utf-8", "surrogatepass")
        return "tangram-" + hashlib.sha256(raw).hexdigest()[:24]

    async def _box(self, trajectory: str) -> _Box:
        box = self.boxes.get(self._check_id(trajectory))
        if box is not None:
            return box
        async with self._creating:
            box = self.boxes.get(trajectory)  # made while this call waited
            if box is None:
                if self._image is None:
                    self._image = await asyncio.to_thread(self.images.get, self.image_ref)
                box = await asyncio.to_thread(self._create, trajectory, self._image)
                self.boxes[trajectory] = box
        return box

    def _create(self, trajectory: str, image: Image) -> _Box:
        """Make the bundle (rootfs, config.json) and start the container's init."""
        cid = self._cid(trajectory)
        bundle = self.bundles / cid
        self._remove(cid, bundle)  # whatever a failed attempt left
        bundle.mkdir(mode=0o700)
        (bundle / "meta.json").write_text(
            json.dumps({"trajectory": trajectory, "image": image.ref, "digest": image.digest})
        )
        try:
            mode = self._make_rootfs(bundle, image)
            (bundle / "config.json").write_text(json.dumps(self._config(image, cid)))
            self._start(bundle, cid)
            state = json.loads(self._runc_sync("state", cid))
            pid = int(state["pid"])
            # Opened through the init's /proc entry: paths below it resolve in the
            # container's mount namespace (its /tmp is its tmpfs), and the descriptor
            # stays the container's root even if the pid is reused later.
            root_fd = os.open(f"/proc/{pid}/root", os.O_RDONLY | os.O_DIRECTORY)
        except BaseException:
            self._remove(cid, bundle)
            raise
        now = time.monotonic()
        return _Box(trajectory, cid, bundle, image, mode, pid, root_fd, now, now)

    def _make_rootfs(self, bundle: Path, image: Image) -> str:
        rootfs = bundle / "rootfs"
        rootfs.mkdir()
        mode = "copy"
        if self.overlay is not False:
            upper, work = bundle / "upper", bundle / "ovl-work"
            upper.mkdir()
            work.mkdir()
            opts = f"lowerdir={image.rootfs},upperdir={upper},workdir={work}"
            done = subprocess.run(
                ["mount", "-t", "overlay", "overlay", "-o", opts, str(rootfs)],
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode == 0:
                mode = "overlay"
            elif self.overlay:
                raise SandboxError(f"cannot mount the overlay: {done.stderr.strip()}")
        if mode == "copy":
            done = subprocess.run(
                ["cp", "-a", "--reflink=auto", f"{image.rootfs}/.", str(rootfs)],
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                raise SandboxError(f"cannot copy the image's root: {done.stderr.strip()}")
        # The working directory, owned by the commands' user. Fresh from the image, so
        # no container code can have planted a link yet; walked without links anyway.
        fd = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(WORKDIR.lstrip("/"), 0o755, dir_fd=fd)
            os.chown(WORKDIR.lstrip("/"), NOBODY, NOBODY, dir_fd=fd, follow_symlinks=False)
        finally:
            os.close(fd)
        return mode

    def _config(self, image: Image, cid: str) -> dict[str, Any]:
        """The runtime spec: umoci's for the image, with this executor's confinement."""
        spec = image.spec
        lim = self.limits
        spec["root"] = {"path": "rootfs", "readonly": False}
        spec["hostname"] = "sandbox"
        spec["process"] = self._process(INIT, self._env(image, {}), lim.max_file_mb)
        mounts = [m for m in spec.get("mounts", []) if m.get("destination") != "/tmp"]
        mounts.append(
            {
                "destination": "/tmp",
                "type": "tmpfs",
                "source": "tmpfs",
                # Pages of a tmpfs are charged to the memory cgroup of who writes them,
                # so /tmp counts in the container's memory limit too.
                "options": ["nosuid", "nodev", "mode=1777", f"size={self.tmp_mb}m"],
            }
        )
        if self.network == "host":
            for f in ("/etc/resolv.conf", "/etc/hosts"):
                if os.path.exists(f):
                    mounts.append(
                        {"destination": f, "type": "bind", "source": f, "options": ["rbind", "ro"]}
                    )
        spec["mounts"] = mounts
        linux = spec.setdefault("linux", {})
        kinds = ["pid", "ipc", "uts", "mount", "cgroup"]
        if self.network != "host":
            kinds.append("network")  # a namespace of its own: only its loopback
        linux["namespaces"] = [{"type": k} for k in kinds]
        linux["cgroupsPath"] = f"/{cid}"
        memory = (lim.memory_mb or 4096) * 2**20
        linux["resources"] = {
            "devices": [{"allow": False, "access": "rwm"}],  # runc adds the usual ones
            "memory": {"limit": memory, "swap": memory},
            "pids": {"limit": lim.max_procs or 256},
            "cpu": {"cpus": cpulist(sorted(self.available)), "mems": _mems(self.available)},
        }
        linux.setdefault(
            "maskedPaths",
            ["/proc/kcore", "/proc/latency_stats", "/proc/timer_list", "/proc/sched_debug"],
        )
        linux.setdefault(
            "readonlyPaths",
            ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        )
        return spec

    def _env(self, image: Image, extra: Mapping[str, str]) -> list[str]:
        env = dict(e.split("=", 1) for e in image.env if "=" in e)
        env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        env.update({"HOME": WORKDIR, "TMPDIR": "/tmp"})
        env.update(extra)
        return [f"{k}={v}" for k, v in env.items()]

    @staticmethod
    def _process(argv: list[str], env: list[str], file_mb: int | None) -> dict[str, Any]:
        rlimits = [
            {"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024},
            {"type": "RLIMIT_CORE", "hard": 0, "soft": 0},  # no dumps filling /work
        ]
        if file_mb:
            size = file_mb * 2**20
            rlimits.append({"type": "RLIMIT_FSIZE", "hard": size, "soft": size})
        none: list[str] = []
        return {
            "terminal": False,
            "user": {"uid": NOBODY, "gid": NOBODY, "additionalGids": [NOBODY]},
            "args": argv,
            "env": env,
            "cwd": WORKDIR,
            "capabilities": {
                k: none for k in ("bounding", "effective", "inheritable", "permitted", "ambient")
            },
            "rlimits": rlimits,
            "noNewPrivileges": True,
        }

    # ------------------------------------------------------------------ one action
    async def _lease_cores(self, box: _Box, cmd: Command, ids: tuple[int, ...]) -> None:
        """Give the container exactly the lease's cores and the command's limits, then
        thaw it."""
        lim = self.limits
        memory = (cmd.memory_mb or lim.memory_mb or 4096) * 2**20
        settings = (
            f"--cpuset-cpus={cpulist(ids)}",
            f"--cpuset-mems={_mems(ids)}",
            f"--cpu-period={CPU_PERIOD}",
            f"--cpu-quota={CPU_PERIOD * len(ids)}",
            f"--memory={memory}",
            f"--memory-swap={memory}",
            f"--pids-limit={cmd.max_procs or lim.max_procs or 256}",
        )
        if settings != box.applied:  # the same lease's next action: nothing to change
            await self._runc("update", *settings, box.cid)
            box.applied = settings
        if box.paused:
            await self._runc("resume", box.cid)
            box.paused = False

    async def _forget_if_dead(self, box: _Box) -> None:
        """A container that is gone (its init died) is removed, so that the
        trajectory's next action starts a fresh one instead of failing forever."""
        state = await self._runc_json("state", box.cid)
        if state.get("status") not in ("running", "paused", "created"):
            await asyncio.to_thread(self.close_trajectory, box.trajectory)
            raise SandboxError(
                f"the container of trajectory {box.trajectory!r} has stopped (state "
                f"{state.get('status', 'gone')!r}); its files are lost, the next action "
                "starts a new container"
            )

    async def _idle(self, box: _Box) -> None:
        """Kill every process but init and freeze the container until its next action."""
        await asyncio.to_thread(self._kill_commands, box)
        if not box.paused:
            await self._runc("pause", box.cid)
            box.paused = True

    async def _exec(self, box: _Box, cmd: Command, ids: tuple[int, ...], dop: int) -> CommandResult:
        ids_text = ",".join(map(str, ids))
        command = cmd.command
        # {python} is the container's interpreter, not this host's.
        if isinstance(command, str):
            command = command.replace("{python}", "python3")
        else:
            command = [a.replace("{python}", "python3") for a in command]
        filled = fill(command, dop, ids)
        argv = ["/bin/sh", "-c", filled] if isinstance(filled, str) else list(filled)
        extra = {v: str(dop) for v in THREAD_VARS}
        extra.update(
            {
                "TANGRAM_DOP": str(dop),
                "TANGRAM_CORES": ids_text,
                "TANGRAM_TRAJECTORY": box.trajectory,
            }
        )
        extra.update(cmd.env or {})
        process = self._process(
            argv, self._env(box.image, extra), cmd.max_file_mb or self.limits.max_file_mb
        )
        pfile = box.bundle / "exec.json"
        pfile.write_text(json.dumps(process))
        pidfile = box.bundle / "exec.pid"
        pidfile.unlink(missing_ok=True)
        loop = asyncio.get_running_loop()
        transport, proto = await loop.subprocess_exec(
            lambda: _Capture(loop, cmd.max_output),
            *self._runc_argv("exec", "--pid-file", str(pidfile), "--process", str(pfile), box.cid),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        timed_out = False
        try:
            # The command's end, not runc's: runc exec stays until the command's
            # output pipes close, which a background process can hold open.
            await asyncio.wait_for(_command_end(pidfile, proto), cmd.timeout)
        except TimeoutError:
            timed_out = True
        finally:
            await asyncio.to_thread(self._kill_commands, box)
            try:
                await asyncio.wait_for(asyncio.shield(proto.exited), KILL_WAIT)
            except TimeoutError:
                transport.kill()
                await proto.exited
            # Output still in the pipes, unless something outside the cgroup holds them.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(proto.closed), KILL_GRACE)
            transport.close()
        code = transport.get_returncode()
        stdout, stderr = proto.text()
        return CommandResult(
            exit_code=code if code is not None else -signal.SIGKILL,
            stdout=stdout,
            stderr=stderr,
            timed_out=timed_out,
            cores=ids,
            dop=dop,
            wall_seconds=0.0,
            workdir=WORKDIR,
            node=self.node,
            pid=transport.get_pid(),
            extra={"container": box.cid, "image": box.image.digest, "rootfs": box.rootfs_mode},
        )

    def _kill_commands(self, box: _Box) -> None:
        """SIGKILL every process in the container's cgroup except init, until none is
        left (a process forking while being killed adds children: read again)."""
        procs = _cgroup_procs(box.cid)
        deadline = time.monotonic() + KILL_WAIT
        while True:
            try:
                pids = {int(p) for p in procs.read_text().split()} - {box.pid}
            except FileNotFoundError:
                return  # the container is gone
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                return  # frozen next; the kernel finishes them when it is thawed
            time.sleep(0.002)

    # ------------------------------------------------------------------ runc, cleanup
    def _runc_argv(self, *args: str) -> list[str]:
        return ["runc", "--root", str(self.state_dir), *args]

    async def _runc(self, *args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            *self._runc_argv(*args),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), RUNC_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise SandboxError(f"runc {args[0]} timed out after {RUNC_TIMEOUT:.0f} s") from None
        if proc.returncode != 0:
            raise SandboxError(f"runc {' '.join(args)} failed: {err.decode().strip()}")
        return out.decode()

    async def _runc_json(self, *args: str) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(await self._runc(*args))
        except SandboxError:
            return {}
        return data

    def _runc_sync(self, *args: str, check: bool = True) -> str:
        done = subprocess.run(
            self._runc_argv(*args),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=RUNC_TIMEOUT,
            check=False,
        )
        if check and done.returncode != 0:
            raise SandboxError(f"runc {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def _start(self, bundle: Path, cid: str) -> None:
        """``runc run --detach``: init inherits runc's stdio, so no pipes (reading one
        would wait for init's end); runc's errors go to a file of the bundle."""
        log = bundle / "runc-run.log"
        with open(log, "w") as err:
            done = subprocess.run(
                self._runc_argv("run", "--detach", "--bundle", str(bundle), cid),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                timeout=RUNC_TIMEOUT,
                check=False,
            )
        if done.returncode != 0:
            raise SandboxError(f"cannot start the container: {log.read_text().strip()}")

    def _remove(self, cid: str, bundle: Path) -> None:
        """Delete the container (killing it, paused or not), unmount its rootfs and
        remove its bundle; each step tolerates what is already gone."""
        self._runc_sync("delete", "--force", cid, check=False)
        rootfs = bundle / "rootfs"
        if os.path.ismount(rootfs):
            done = subprocess.run(["umount", str(rootfs)], capture_output=True, check=False)
            if done.returncode != 0:  # still busy: detach now, freed when unused
                subprocess.run(["umount", "-l", str(rootfs)], capture_output=True, check=False)
        shutil.rmtree(bundle, ignore_errors=True)

    def _remove_orphans(self) -> list[str]:
        """Remove the containers and bundles a previous runner on this root left (it
        crashed, or was killed before closing its trajectories); their ids."""
        listed = self._runc_sync("list", "--format", "json", check=False).strip()
        cids = {c["id"] for c in json.loads(listed or "null") or []}
        cids |= {p.name for p in self.bundles.iterdir()}
        for cid in sorted(cids):
            self._remove(cid, self.bundles / cid)
        return sorted(cids)


# ---------------------------------------------------------------------- helpers
def _mems(ids: Sequence[int] | frozenset[int]) -> str:
    """The memory nodes of the given cores (the node the lease's cores are on), or all
    the host's when the machine does not say."""
    nodes = numa_nodes(ids)
    if nodes:
        return cpulist(nodes)
    for f in ("/sys/fs/cgroup/cpuset/cpuset.mems", "/sys/fs/cgroup/cpuset.mems.effective"):
        with contextlib.suppress(OSError):
            if text := Path(f).read_text().strip():
                return text
    return "0"


def _cgroup_procs(cid: str) -> Path:
    """The cgroup.procs file of the container's cgroup (``cgroupsPath`` ``/<cid>``)."""
    v1 = Path("/sys/fs/cgroup/pids")
    base = v1 if v1.is_dir() else Path("/sys/fs/cgroup")
    return base / cid / "cgroup.procs"


def _inside(path: str) -> list[str]:
    """The components of ``path`` inside the container (relative: to the working
    directory), refused when it leaves the root or reaches into /proc, /sys or /dev."""
    if not isinstance(path, str) or not path.strip("/"):
        raise SandboxError(f"bad path {path!r}: name a file inside the container")
    full = path if path.startswith("/") else f"{WORKDIR}/{path}"
    parts = [p for p in full.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise SandboxError(f"bad path {path!r}: '..' is not allowed")
    if parts[0] in NO_TRANSFER:
        raise SandboxError(f"bad path {path!r}: /{parts[0]} is not the container's own files")
    return parts


def _transfer(root_fd: int, parts: list[str], data: bytes, write: bool) -> bytes | None:
    """Write ``data`` to (or read) the file ``parts`` below ``root_fd``, directory by
    directory with ``openat`` and ``O_NOFOLLOW``: container code may have planted a
    symbolic link (``notes -> /etc``), and the executor, root on the host, following it
    would reach outside the container. Directories made on the way and the file written
    belong to the container's user."""
    *dirs, name = parts
    where = "/" + "/".join(parts)
    fd = os.dup(root_fd)
    try:
        for part in dirs:
            made = False
            if write:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
                    made = True
            try:
                sub = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    raise SandboxError(f"{where}: no such file or directory") from exc
                raise SandboxError(
                    f"{where}: {part!r} is a symbolic link or not a directory"
                ) from exc
            os.close(fd)
            fd = sub
            if made:
                os.fchown(fd, NOBODY, NOBODY)
        # O_NONBLOCK: a FIFO planted there must not hang the executor.
        flags = os.O_NOFOLLOW | os.O_NONBLOCK
        flags |= os.O_WRONLY | os.O_CREAT if write else os.O_RDONLY
        try:
            f = os.open(name, flags, 0o644, dir_fd=fd)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise SandboxError(f"{where}: no such file or directory") from exc
            raise SandboxError(f"{where}: a symbolic link or not a regular file") from exc
        try:
            if not stat.S_ISREG(os.fstat(f).st_mode):
                raise SandboxError(f"{where}: not a regular file")
            if not write:
                chunks = []
                while chunk := os.read(f, 1 << 20):
                    chunks.append(chunk)
                return b"".join(chunks)
            os.ftruncate(f, 0)
            os.fchown(f, NOBODY, NOBODY)
            view = memoryview(data)
            while view:
                view = view[os.write(f, view) :]
            return None
        finally:
            os.close(f)
    finally:
        os.close(fd)


async def _command_end(pidfile: Path, proto: _Capture) -> None:
    """Return when the command ``runc exec`` started has exited (or runc has). Its pid,
    from runc's pid file, is not this process's child: a pidfd tells when it ends."""
    pid = None
    while pid is None:
        if proto.exited.done():
            return
        try:
            pid = int(pidfile.read_text())
        except (FileNotFoundError, ValueError):
            await asyncio.sleep(0.001)  # runc has not started it yet
    try:
        await wait_pid(pid, until=proto.exited)
    except ProcessLookupError:
        return  # already gone


class _Capture(asyncio.SubprocessProtocol):
    """Collects a command's stdout and stderr (each up to ``limit`` bytes) and tells
    apart its exit (``exited``) from the end of its output (``closed``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int) -> None:
        self.limit = limit
        self.buf = {1: bytearray(), 2: bytearray()}
        self.open = {1, 2}
        self.exited: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        buf = self.buf[fd]
        if len(buf) < self.limit:
            buf.extend(data[: self.limit - len(buf)])

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self.open.discard(fd)
        if not self.open and not self.closed.done():
            self.closed.set_result(None)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)

    def text(self) -> tuple[str, str]:
        return self.buf[1].decode(errors="replace"), self.buf[2].decode(errors="replace")
