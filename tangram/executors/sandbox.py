"""The CPU sandbox executor: commands in a trajectory's persistent working directory.

Each trajectory gets one working directory that survives between its actions (the
paper's long-lived container: files written by one action are there for the next) and
is removed when the trajectory closes. An action runs one command there as a child
process restricted to exactly the granted core ids, with ``{dop}`` in the command
replaced by the granted parallelism (``pytest -n {dop}``), a wall-clock timeout, limits
on address space and processes, and stdout, stderr and the exit code captured.

The child is started through a tiny launcher (``python -I -S -c``, the source of
tangram/executors/launcher.py) that sets the CPU affinity, the resource limits and a
parent-death signal and then ``exec``s the command.
``preexec_fn`` would do the same without the extra interpreter start, but it is not safe
in a threaded process (a Ray worker is one): the forked child can deadlock on a lock
another thread held at fork time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from tangram.executors.cgroups import (
    CgroupError,
    Confinement,
    Group,
    Hierarchy,
    numa_nodes,
    open_hierarchy,
)
from tangram.executors.fencing import DEFAULT_SKEW, KEY_ENV, Fence, SignedGrant

log = logging.getLogger(__name__)

# The child's first code (tangram/executors/launcher.py), handed to ``python -c`` as
# source: inside bubblewrap the interpreter is there but this package need not be.
_LAUNCHER = resources.files("tangram.executors").joinpath("launcher.py").read_text("utf-8")

# Trajectory ids become directory names: these bytes stay as they are, every other byte
# of the id's UTF-8 becomes "." and two hex digits. "." never stands for itself, so the
# mapping is injective and never yields "." or ".."; longer names become "~" and a hash.
_PLAIN = re.compile(r"[A-Za-z0-9_-]+")
_KEEP = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_ESCAPED = re.compile(r"(?:[A-Za-z0-9_-]|\.[0-9a-f]{2})+")
MAX_NAME = 200  # bytes; file systems allow 255
# Variables numeric and parallel runtimes read for their thread count: set to the
# granted parallelism, so a library sizes its pool to the lease, not to the machine.
THREAD_VARS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "BLIS_NUM_THREADS",
    "NUMBA_NUM_THREADS",
    "RAYON_NUM_THREADS",
    "TOKIO_WORKER_THREADS",
    "GOMAXPROCS",
    "JULIA_NUM_THREADS",
)
_GROUP_SEQ = itertools.count(1)  # action group names, unique in this process
KILL_GRACE = 2.0  # seconds to drain pipes after the process group was killed


class SandboxError(ValueError):
    """The command or its placement is invalid; the message says what to change."""


@dataclass(frozen=True, slots=True)
class Command:
    """A command to run in the trajectory's working directory.

    ``command`` is a shell string (run by ``/bin/sh -c``) or an argv list. ``{dop}`` is
    replaced by the granted parallelism, ``{cores}`` by the granted core ids
    (comma-separated) and ``{python}`` by the executor's Python, in the string or in each
    argv item. ``files`` are written (relative to the working directory) before the
    command runs. ``memory_mb`` limits the memory of the command's processes together
    with what they write to ``/tmp`` (per process, as address space, on an unconfined
    runner), ``max_procs`` the processes and threads of the sandbox, ``max_file_mb`` the
    size of any file it writes, ``tmp_mb`` the size of its private ``/tmp``; left
    ``None``, the runner's defaults apply (``SandboxRunner.limits``).
    """

    command: str | Sequence[str]
    timeout: float = 600.0
    memory_mb: int | None = None
    max_procs: int | None = None
    max_file_mb: int | None = None
    tmp_mb: int | None = None
    env: Mapping[str, str] | None = None
    files: Mapping[str, str] | None = None
    max_output: int = 1 << 20

    def check(self) -> None:
        cmd = self.command
        if isinstance(cmd, str):
            if not cmd.strip():
                raise SandboxError("command is empty; give a shell string or an argv list")
        elif not cmd or not all(isinstance(a, str) for a in cmd):
            raise SandboxError("command must be a non-empty shell string or a list of strings")
        t = self.timeout
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise SandboxError(f"timeout must be a positive number of seconds, got {t!r}")
        for name, v in (
            ("memory_mb", self.memory_mb),
            ("max_procs", self.max_procs),
            ("max_file_mb", self.max_file_mb),
            ("tmp_mb", self.tmp_mb),
        ):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise SandboxError(f"{name} must be a positive whole number, got {v!r}")
        if self.max_output <= 0:
            raise SandboxError("max_output must be positive")
        for path in self.files or {}:
            p = Path(path)
            if p.is_absolute() or ".." in p.parts or not p.parts:
                raise SandboxError(
                    f"file {path!r} must be a relative path inside the working directory"
                )


@dataclass(slots=True)
class CommandResult:
    exit_code: int
    stdout: str
    stderr: str
    timed_out: bool
    cores: tuple[int, ...]
    dop: int
    wall_seconds: float
    workdir: str
    node: str = ""
    pid: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


@dataclass(frozen=True, slots=True)
class _Exit:
    """How a child ended, before it becomes a ``CommandResult``."""

    exit_code: int
    stdout: str
    stderr: str
    timed_out: bool
    pid: int


def dirname(trajectory: str) -> str:
    """The working directory's name for ``trajectory``: one path component, distinct for
    distinct ids, made of ``[A-Za-z0-9_.~-]`` only."""
    if len(trajectory) <= MAX_NAME and _PLAIN.fullmatch(trajectory):
        return trajectory  # the common case, readable as it is
    # surrogatepass: any str encodes (a lone surrogate too), still injectively.
    raw = trajectory.encode("utf-8", "surrogatepass")
    name = "".join(chr(b) if b in _KEEP else f".{b:02x}" for b in raw)
    if len(name) > MAX_NAME:
        return "~" + hashlib.sha256(raw).hexdigest()
    return name


def trajectory_of(name: str) -> str:
    """The trajectory id a directory name stands for (the inverse of ``dirname``); a
    hashed or foreign name comes back as it is."""
    if not _ESCAPED.fullmatch(name) or "." not in name:
        return name
    raw = bytearray()
    i = 0
    while i < len(name):
        if name[i] == ".":
            raw.append(int(name[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.append(ord(name[i]))
            i += 1
    try:
        return raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return name


def granted_cores(cores: Sequence[int], available: frozenset[int], node: str) -> tuple[int, ...]:
    """The granted core ids, refused unless this machine (``available``) has every one
    of them: every sandbox backend checks a grant's cores so before it runs anything."""
    ids = tuple(int(c) for c in cores)
    if not ids:
        raise SandboxError("no cores granted: a sandbox command needs at least one core")
    missing = sorted(set(ids) - available)
    if missing:
        raise SandboxError(
            f"cores {missing} do not exist on node {node or 'here'} (it has "
            f"{sorted(available)}); the pool's core ids must match the machine"
        )
    return ids


def fill(command: str | Sequence[str], dop: int, cores: Sequence[int]) -> str | list[str]:
    """Replace ``{dop}``, ``{cores}`` and ``{python}`` (this node's interpreter); nothing
    else, since code in commands has braces of its own."""
    ids = ",".join(map(str, cores))

    def sub(s: str) -> str:
        return (
            s.replace("{dop}", str(dop)).replace("{cores}", ids).replace("{python}", sys.executable)
        )

    if isinstance(command, str):
        return sub(command)
    return [sub(a) for a in command]


@dataclass(frozen=True, slots=True)
class Limits:
    """Limits a command gets when it sets none of its own."""

    memory_mb: int | None = 4096
    max_procs: int | None = 256
    max_file_mb: int | None = 1024
    tmp_mb: int | None = 1024


# Read-only system paths an isolated command sees (besides Python's own prefixes).
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# From /etc only what programs need to start and resolve names: no secrets, no configs.
ETC_PATHS = (
    "/etc/alternatives",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/nsswitch.conf",
    "/etc/passwd",
    "/etc/group",
    "/etc/hosts",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/mime.types",
)
NOBODY = 65534


@functools.cache
def isolation_problem() -> str | None:
    """Why commands cannot run isolated here, or None when they can: bubblewrap must be
    installed and able to build the sandbox (it is tried once, with ``true``)."""
    advice = (
        "SandboxRunner(isolate=False) runs commands without isolation, which is not "
        "safe for untrusted code"
    )
    if shutil.which("bwrap") is None:
        return (
            f"bubblewrap is not installed (apt-get install bubblewrap; .ci/run does it); {advice}"
        )
    with tempfile.TemporaryDirectory(prefix="tangram-probe-") as tmp:
        work = Path(tmp).resolve() / "w"
        work.mkdir()
        if os.getuid() == 0:
            os.chown(work, NOBODY, NOBODY)
        inner = {"isolate": True, "uid": NOBODY, "gid": NOBODY, "argv": ["true"]}
        spec = {"wrap": [*_bwrap_args(work, ()), *_launch(inner)]}
        try:
            done = subprocess.run(
                _launch(spec),
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"bubblewrap did not start a sandbox: {exc}; {advice}"
    if done.returncode != 0:
        why = done.stderr.strip() or f"exit code {done.returncode}"
        return f"bubblewrap cannot build a sandbox here ({why}); {advice}"
    return None


class SandboxRunner:
    """Runs commands for trajectories under ``root`` on this machine's cores.

    Isolated (the default), a command runs under bubblewrap: new network, PID, IPC and
    UTS namespaces, a root filesystem holding only read-only system paths, Python's
    prefixes, ``ro_paths``, a private ``/tmp`` and its own working directory; as an
    unprivileged user (``uid``/``gid`` when the executor runs as root) in a user
    namespace of its own, under ``limits``. ``isolate=False`` runs it as the executor's
    user on the host filesystem (trusted code only).

    Confined (the default, ``confine=True``), each command runs in a control group of
    its own (tangram/executors/cgroups.py): a ``cpuset`` of exactly the granted cores
    (and their NUMA nodes) that the code cannot widen, one memory limit for all its
    processes and its ``/tmp`` together, a process limit; when it ends, whatever it
    left running is killed, wherever it went. Without the rights to make control
    groups (not root, no delegated subtree) the runner refuses to start;
    ``confine=False`` runs with only ``sched_setaffinity`` and per-process limits,
    which the code can undo or sidestep, and says so in the log.

    Every call needs the lease's signed grant, checked with ``fencing_key`` (the
    broker's) against this runner's ``node`` and ``pool``; ``grant_skew`` is the clock
    offset to the broker tolerated at expiry. ``trusted=True`` (no key needed) also runs
    calls without a grant: for direct use by trusted code, never behind a broker.
    See docs/reliability.md, "Executor fencing"."""

    def __init__(
        self,
        root: str | Path,
        node: str = "",
        *,
        isolate: bool = True,
        limits: Limits | None = None,
        uid: int = NOBODY,
        gid: int = NOBODY,
        ro_paths: Sequence[str] = (),
        pool: str | None = None,
        fencing_key: bytes | None = None,
        trusted: bool = False,
        grant_skew: float = DEFAULT_SKEW,
        confine: bool = True,
        network: str = "none",
    ) -> None:
        # Before anything is created: a runner that cannot fence must not start.
        fence = Fence(fencing_key, verify=not trusted, skew=grant_skew)
        if isolate and (problem := isolation_problem()) is not None:
            raise SandboxError(f"cannot isolate sandbox commands: {problem}")
        if network not in ("none", "host"):
            raise SandboxError(f"network must be 'none' or 'host', got {network!r}")
        self.network = network
        root = Path(root).resolve()
        self.cgroups: Hierarchy | None = None
        if confine:
            self.cgroups = _confinement(root, node)
        else:
            log.warning(
                "sandbox runner for %s is UNCONFINED: commands can widen their cores, "
                "use memory per process and leave processes running after an action",
                root,
            )
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.node = node
        self.pool = pool
        self.isolate = isolate
        self.limits = limits or Limits()
        self.uid, self.gid = uid, gid
        self.ro_paths = tuple(ro_paths)
        self.available = frozenset(os.sched_getaffinity(0))
        self.running: dict[int, str] = {}  # child pid -> trajectory, while it runs
        self.fence = fence  # checks grants; the newest fencing token seen per core id

    def workdir(self, trajectory: str) -> Path:
        if not isinstance(trajectory, str) or not trajectory:
            raise SandboxError("a trajectory id must be a non-empty string")
        return self.root / dirname(trajectory)

    def close_trajectory(self, trajectory: str) -> bool:
        """Remove the trajectory's working directory; False if it had none."""
        path = self.workdir(trajectory)
        existed = path.exists()
        shutil.rmtree(path, ignore_errors=True)
        return existed

    async def upload(self, trajectory: str, path: str, data: bytes | str) -> None:
        """Write a file into the trajectory's working directory (``path`` relative to
        it; parent directories are made; a symbolic link on the way is refused)."""
        _relative(path)
        work = self._prepare_workdir(trajectory)
        owner = (self.uid, self.gid) if self.isolate and os.getuid() == 0 else None
        await asyncio.to_thread(_write_inside, work, path, data, owner)

    async def download(self, trajectory: str, path: str, limit: int = 64 << 20) -> bytes:
        """Read a regular file of the trajectory's working directory (at most ``limit``
        bytes; a symbolic link is refused, since sandboxed code may have planted it)."""
        work = self.workdir(trajectory)
        if not work.is_dir():
            raise SandboxError(f"trajectory {trajectory!r} has no working directory here")
        return await asyncio.to_thread(_read_inside, work, path, limit)

    async def status(self, trajectory: str) -> dict[str, Any]:
        """Whether the trajectory has a working directory here, and whether a command
        of it runs now."""
        work = self.workdir(trajectory)
        return {
            "backend": "bubblewrap" if self.isolate else "plain",
            "exists": work.is_dir(),
            "running": trajectory in self.running.values(),
            "workdir": str(work),
            "confined": self.cgroups is not None,
        }

    def trajectories(self) -> list[str]:
        """The trajectories with a working directory here (a name too long to keep, one
        in the ``~`` hashed form, is listed as that directory name)."""
        return sorted(trajectory_of(p.name) for p in self.root.iterdir() if p.is_dir())

    async def run(
        self,
        trajectory: str,
        cmd: Command,
        cores: Sequence[int],
        dop: int | None = None,
        grant: SignedGrant | None = None,
    ) -> CommandResult:
        """Run ``cmd`` on exactly ``cores`` under ``grant``, the lease's signed grant
        (``lease.grant``). It must verify under the runner's key and name exactly these
        cores on this node (``ForgedGrant``, ``GrantMismatch``), be unexpired and carry a
        fencing token no older than any seen for the cores (``StaleLease``); a trusted
        runner also runs calls without one."""
        cmd.check()
        ids = self._granted_cores(cores)
        self.fence.admit(ids, grant, f"node {self.node or 'here'}", node=self.node, pool=self.pool)
        dop = len(ids) if dop is None else dop
        work = self._prepare_workdir(trajectory, cmd.files)
        spec = self._launch_spec(cmd, ids, dop, work)
        env = self._child_env(cmd, trajectory, ids, dop, work)
        group = self._group(cmd, ids)
        if group is not None:
            spec["cgroup"] = group.join_files
        t0 = time.monotonic()
        try:
            done = await self._execute(trajectory, cmd, spec, env, work, group)
        finally:
            extra = {} if group is None else await asyncio.to_thread(_end_group, group)
        stderr = done.stderr
        if extra.get("oom_kills"):
            if stderr and not stderr.endswith("\n"):
                stderr += "\n"
            stderr += (
                f"tangram sandbox: out of memory: {extra['oom_kills']} process(es) killed "
                f"at the sandbox's limit of {self._memory_mb(cmd)} MiB\n"
            )
        return CommandResult(
            exit_code=done.exit_code,
            stdout=done.stdout,
            stderr=stderr,
            timed_out=done.timed_out,
            cores=ids,
            dop=dop,
            wall_seconds=time.monotonic() - t0,
            workdir=str(work),
            node=self.node,
            pid=done.pid,
            extra=extra,
        )

    def _memory_mb(self, cmd: Command) -> int | None:
        return cmd.memory_mb or self.limits.memory_mb

    def _group(self, cmd: Command, ids: tuple[int, ...]) -> Group | None:
        """The action's control group, made and limited before anything starts in it."""
        if self.cgroups is None:
            return None
        memory = self._memory_mb(cmd)
        limits = Confinement(
            cpus=ids,
            mems=numa_nodes(ids) or None,
            memory=memory * 2**20 if memory else None,
            pids=cmd.max_procs or self.limits.max_procs,
        )
        try:
            return self.cgroups.create(f"{os.getpid()}-{next(_GROUP_SEQ)}", limits)
        except CgroupError as exc:
            raise SandboxError(f"cannot confine the command: {exc}") from exc

    def _granted_cores(self, cores: Sequence[int]) -> tuple[int, ...]:
        return granted_cores(cores, self.available, self.node)

    def _prepare_workdir(self, trajectory: str, files: Mapping[str, str] | None = None) -> Path:
        """The trajectory's working directory, with the command's files written into it."""
        work = self.workdir(trajectory)
        owner = self.isolate and os.getuid() == 0
        work.mkdir(parents=True, exist_ok=True)
        if owner:
            os.chown(work, self.uid, self.gid)  # the sandbox's user writes here
        for rel, text in (files or {}).items():
            _write_inside(work, rel, text, (self.uid, self.gid) if owner else None)
        return work

    def _launch_spec(
        self, cmd: Command, ids: tuple[int, ...], dop: int, work: Path
    ) -> dict[str, Any]:
        """The launcher's spec: the command, its limits and, isolated, the bubblewrap
        command line that runs the launcher again inside the sandbox."""
        filled = fill(cmd.command, dop, ids)
        argv = ["/bin/sh", "-c", filled] if isinstance(filled, str) else list(filled)
        lim = self.limits
        # Confined, memory is the control group's limit for the whole sandbox; a
        # per-process address-space limit would only break runtimes that reserve
        # address space they never touch (Go, the JVM, sanitizers).
        memory = None if self.cgroups is not None else self._memory_mb(cmd)
        fsize = cmd.max_file_mb or lim.max_file_mb
        inner: dict[str, Any] = {
            "isolate": self.isolate,
            "uid": self.uid,
            "gid": self.gid,
            "memory": memory * 2**20 if memory else None,
            "procs": cmd.max_procs or lim.max_procs,
            "fsize": fsize * 2**20 if fsize else None,
            "core": 0,  # no core dumps filling the working directory
            "argv": argv,
        }
        if not self.isolate:
            return {**inner, "cores": list(ids)}
        tmp_mb = cmd.tmp_mb or lim.tmp_mb
        wrap = _bwrap_args(
            work, self.ro_paths, tmp_mb * 2**20 if tmp_mb else None, self.network == "host"
        )
        return {"cores": list(ids), "wrap": wrap + _launch(inner)}

    def _child_env(
        self, cmd: Command, trajectory: str, ids: tuple[int, ...], dop: int, work: Path
    ) -> dict[str, str]:
        if self.isolate:
            # The host's environment can hold secrets (tokens, keys): pass only the basics.
            env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TZ")}
            env.update({"HOME": str(work), "TMPDIR": "/tmp"})
        else:
            # Even trusted code has no use for the key that makes grants.
            env = {k: v for k, v in os.environ.items() if k != KEY_ENV}
        env.update(
            {
                "TANGRAM_DOP": str(dop),
                "TANGRAM_CORES": ",".join(map(str, ids)),
                "TANGRAM_TRAJECTORY": trajectory,
            }
        )
        env.update(dict.fromkeys(THREAD_VARS, str(dop)))
        env.update(cmd.env or {})
        return env

    async def _execute(
        self,
        trajectory: str,
        cmd: Command,
        spec: dict[str, Any],
        env: dict[str, str],
        work: Path,
        group: Group | None = None,
    ) -> _Exit:
        """Start the launcher, capture its output until it exits or times out, then kill
        whatever is left of its process group and of its control group."""
        proc = await asyncio.create_subprocess_exec(
            *_launch(spec),
            cwd=work,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # its own process group: a timeout kills all of it
        )
        self.running[proc.pid] = trajectory
        assert proc.stdout is not None and proc.stderr is not None
        out = asyncio.ensure_future(_read(proc.stdout, cmd.max_output))
        err = asyncio.ensure_future(_read(proc.stderr, cmd.max_output))
        timed_out = False
        try:
            await asyncio.wait_for(_exited(proc), cmd.timeout)
        except TimeoutError:
            timed_out = True
        finally:
            # Also after a normal exit: background children must not keep using cores
            # that go back to the pool now (nor hold the output pipes open).
            _kill_group(proc.pid)
            if group is not None:
                await asyncio.to_thread(group.kill)
            if proc.returncode is None:
                await proc.wait()
            self.running.pop(proc.pid, None)
        stdout, stderr = await _drain(out, err)
        code = proc.returncode
        return _Exit(
            exit_code=code if code is not None else -signal.SIGKILL,
            stdout=stdout,
            stderr=stderr,
            timed_out=timed_out,
            pid=proc.pid,
        )

    def kill_all(self) -> None:
        """Kill every running child (the executor is going away)."""
        for pid in list(self.running):
            _kill_group(pid)


def _confinement(root: Path, node: str) -> Hierarchy:
    """The control groups of the runner for ``root`` on ``node``, orphans removed: groups
    named after a process that is gone were left by a runner that crashed mid-action."""
    owner = "sandbox-" + hashlib.sha256(f"{node}\0{root}".encode()).hexdigest()[:16]
    try:
        hierarchy = open_hierarchy(owner)
    except CgroupError as exc:
        raise SandboxError(
            f"cannot confine sandbox commands: {exc}. Confinement needs root or a "
            "delegated cgroup subtree; SandboxRunner(confine=False) (`confine: false` in "
            "the pool's sandbox section: unconfined) runs them without it, and the code "
            "can then widen its cores, use memory per process and leave processes running"
        ) from exc
    orphans = [n for n in hierarchy.children() if not _alive(n.partition("-")[0])]
    for name in orphans:
        hierarchy.group(name).remove()
    if orphans:
        log.warning("removed %d control group(s) left by a crashed runner", len(orphans))
    hierarchy.remove_empty_owners()
    return hierarchy


def _alive(pid: str) -> bool:
    return pid.isdigit() and os.path.exists(f"/proc/{pid}")


def _end_group(group: Group) -> dict[str, Any]:
    """Kill what the action left running, read what the group saw, remove it."""
    group.kill()
    extra: dict[str, Any] = {"oom_kills": group.oom_kills()}
    peak = group.memory_peak()
    if peak is not None:
        extra["memory_peak_mb"] = round(peak / 2**20, 1)
    group.remove()
    return extra


def _launch(spec: Mapping[str, Any]) -> list[str]:
    """The command line that runs the launcher with ``spec``."""
    return [sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(spec)]


def _bwrap_args(
    work: Path, ro_paths: Sequence[str], tmp_bytes: int | None = None, host_network: bool = False
) -> list[str]:
    """The bubblewrap command line that gives a command ``work`` and nothing else, and a
    private ``/tmp`` of at most ``tmp_bytes``; the host's network only if asked."""
    args = ["bwrap"]
    if not host_network:
        args.append("--unshare-net")  # only a loopback of its own: no broker, no internet
    args += [
        "--unshare-pid",  # sees only its own processes; all die with the sandbox
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--die-with-parent",
        "--hostname",
        "sandbox",
    ]
    if os.getuid() != 0:
        args.append("--unshare-user")  # bubblewrap needs one to run unprivileged
    python = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    python.add(str(Path(sys.executable).resolve().parent.parent))
    # The private /tmp first: mounted after the binds, it would hide any of them that
    # live under /tmp (a checkout or venv in /tmp: its Python could not start).
    args += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777"]
    if tmp_bytes is not None:
        args += ["--size", str(tmp_bytes)]
    args += ["--tmpfs", "/tmp"]
    seen: set[str] = set()
    made: set[str] = {"/", "/tmp"}
    for path in (*SYSTEM_PATHS, *sorted(python), *ro_paths, *ETC_PATHS):
        if path in seen or not os.path.lexists(path):
            continue
        seen.add(path)
        if os.path.islink(path) and path in SYSTEM_PATHS:
            args += ["--symlink", os.readlink(path), path]  # merged /usr: /bin -> usr/bin
        else:
            args += [*_parents(path, made), "--ro-bind", path, path]
    # The working directory at its real path (results name it), its parents only as
    # empty directories: the other trajectories' directories are not there at all.
    args += _parents(str(work), made)
    args += ["--bind", str(work), str(work), "--chdir", str(work)]
    return args


def _write_inside(work: Path, rel: str, text: str | bytes, owner: tuple[int, int] | None) -> None:
    """Write ``work/rel`` without following symbolic links: earlier sandboxed code may
    have planted one (``notes -> /etc``), and the executor writing through it, perhaps
    as root, would write outside the sandbox. Directory by directory with ``openat``
    semantics, so a link swapped in meanwhile is not followed either."""
    *dirs, name = Path(rel).parts
    fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in dirs:
            made = False
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o755, dir_fd=fd)
                made = True
            try:
                sub = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                raise SandboxError(
                    f"cannot write {rel!r}: {part!r} is a symbolic link or not a directory"
                ) from exc
            os.close(fd)
            fd = sub
            if made and owner is not None:
                os.fchown(fd, *owner)
        try:
            out = os.open(
                name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644, dir_fd=fd
            )
        except OSError as exc:
            raise SandboxError(
                f"cannot write {rel!r}: it is a symbolic link or not a regular file"
            ) from exc
        with os.fdopen(out, "wb") as f:
            if owner is not None:
                os.fchown(f.fileno(), *owner)
            f.write(text.encode() if isinstance(text, str) else text)
    finally:
        os.close(fd)


def _read_inside(work: Path, rel: str, limit: int) -> bytes:
    """Read ``work/rel`` without following a symbolic link the sandboxed code planted
    (``answer -> /etc/shadow``): the read counterpart of ``_write_inside``."""
    *dirs, name = _relative(rel)
    fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in dirs:
            try:
                sub = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                raise SandboxError(
                    f"cannot read {rel!r}: {part!r} is missing, a symbolic link or not a directory"
                ) from exc
            os.close(fd)
            fd = sub
        try:
            src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
        except OSError as exc:
            raise SandboxError(
                f"cannot read {rel!r}: it is missing or a symbolic link ({exc.strerror})"
            ) from exc
        with os.fdopen(src, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise SandboxError(f"cannot read {rel!r}: not a regular file")
            data = f.read(limit + 1)
        if len(data) > limit:
            raise SandboxError(f"{rel!r} is larger than {limit} bytes")
        return data
    finally:
        os.close(fd)


def _relative(rel: str) -> tuple[str, ...]:
    """The parts of a path inside the working directory, refused if it leads out."""
    p = Path(rel)
    if not isinstance(rel, str) or p.is_absolute() or ".." in p.parts or not p.parts:
        raise SandboxError(f"path {rel!r} must be relative, inside the working directory")
    return p.parts


def _parents(path: str, made: set[str]) -> list[str]:
    """bubblewrap options creating the parents of ``path`` traversable by the sandbox's
    user: those it makes on its own are private to root (``/root`` above a pyenv)."""
    out = []
    for parent in reversed(Path(path).parents):
        p = str(parent)
        if p not in made:
            made.add(p)
            out += ["--perms", "0755", "--dir", p]
    return out


async def _exited(proc: asyncio.subprocess.Process) -> None:
    """Return once ``proc`` itself has exited. ``proc.wait()`` also waits for its output
    pipes to close, which a background child that inherited them delays until it ends
    (or forever); a pidfd becomes readable at the exit itself."""
    try:
        await wait_pid(proc.pid)
    except (AttributeError, OSError):  # gone already, or no pidfds here
        await proc.wait()


async def wait_pid(pid: int, until: asyncio.Future[Any] | None = None) -> None:
    """Return when process ``pid`` (a child or not) has exited, or ``until`` is done,
    through a pidfd (Linux 5.3). Raises ``OSError`` (``ProcessLookupError``: it is
    gone already) when no pidfd can be had."""
    fd = os.pidfd_open(pid)
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not ended.done():
            ended.set_result(None)

    loop.add_reader(fd, readable)
    try:
        waits: set[asyncio.Future[Any]] = {ended} if until is None else {ended, until}
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def _read(stream: asyncio.StreamReader, limit: int) -> str:
    buf = bytearray()
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            break
        if len(buf) < limit:
            buf.extend(chunk[: limit - len(buf)])
    return buf.decode(errors="replace")


async def _drain(out: asyncio.Future[str], err: asyncio.Future[str]) -> tuple[str, str]:
    # A grandchild that left the process group could hold the pipes open forever.
    done, pending = await asyncio.wait({out, err}, timeout=KILL_GRACE)
    for f in pending:
        f.cancel()
    return (
        out.result() if out in done else "",
        err.result() if err in done else "",
    )
