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
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from tangram.executors.fencing import DEFAULT_SKEW, KEY_ENV, Fence, SignedGrant

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
    command runs. ``memory_mb`` limits each process's address space, ``max_procs`` the
    number of processes of the sandbox, ``max_file_mb`` the size of any file it writes;
    left ``None``, the runner's defaults apply (``SandboxRunner.limits``).
    """

    command: str | Sequence[str]
    timeout: float = 600.0
    memory_mb: int | None = None
    max_procs: int | None = None
    max_file_mb: int | None = None
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
    ) -> None:
        # Before anything is created: a runner that cannot fence must not start.
        fence = Fence(fencing_key, verify=not trusted, skew=grant_skew)
        if isolate and (problem := isolation_problem()) is not None:
            raise SandboxError(f"cannot isolate sandbox commands: {problem}")
        self.root = Path(root).resolve()
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
        work = self._prepare_workdir(trajectory, cmd)
        spec = self._launch_spec(cmd, ids, dop, work)
        env = self._child_env(cmd, trajectory, ids, dop, work)
        t0 = time.monotonic()
        done = await self._execute(trajectory, cmd, spec, env, work)
        return CommandResult(
            exit_code=done.exit_code,
            stdout=done.stdout,
            stderr=done.stderr,
            timed_out=done.timed_out,
            cores=ids,
            dop=dop,
            wall_seconds=time.monotonic() - t0,
            workdir=str(work),
            node=self.node,
            pid=done.pid,
        )

    def _granted_cores(self, cores: Sequence[int]) -> tuple[int, ...]:
        """The granted core ids, refused unless this machine has every one of them."""
        ids = tuple(int(c) for c in cores)
        if not ids:
            raise SandboxError("no cores granted: a sandbox command needs at least one core")
        missing = sorted(set(ids) - self.available)
        if missing:
            raise SandboxError(
                f"cores {missing} do not exist on node {self.node or 'here'} (it has "
                f"{sorted(self.available)}); the pool's core ids must match the machine"
            )
        return ids

    def _prepare_workdir(self, trajectory: str, cmd: Command) -> Path:
        """The trajectory's working directory, with the command's files written into it."""
        work = self.workdir(trajectory)
        owner = self.isolate and os.getuid() == 0
        work.mkdir(parents=True, exist_ok=True)
        if owner:
            os.chown(work, self.uid, self.gid)  # the sandbox's user writes here
        for rel, text in (cmd.files or {}).items():
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
        memory = cmd.memory_mb or lim.memory_mb
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
        return {"cores": list(ids), "wrap": _bwrap_args(work, self.ro_paths) + _launch(inner)}

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
                # Thread pools of numeric libraries follow the grant, not the machine.
                "OMP_NUM_THREADS": str(dop),
            }
        )
        env.update(cmd.env or {})
        return env

    async def _execute(
        self,
        trajectory: str,
        cmd: Command,
        spec: dict[str, Any],
        env: dict[str, str],
        work: Path,
    ) -> _Exit:
        """Start the launcher, capture its output until it exits or times out, then kill
        whatever is left of its process group."""
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
            await asyncio.wait_for(proc.wait(), cmd.timeout)
        except TimeoutError:
            timed_out = True
        finally:
            # Also after a normal exit: background children must not keep using cores
            # that go back to the pool now.
            _kill_group(proc.pid)
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


def _launch(spec: Mapping[str, Any]) -> list[str]:
    """The command line that runs the launcher with ``spec``."""
    return [sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(spec)]


def _bwrap_args(work: Path, ro_paths: Sequence[str]) -> list[str]:
    """The bubblewrap command line that gives a command ``work`` and nothing else."""
    args = [
        "bwrap",
        "--unshare-net",  # only a loopback of its own: no broker, no internet
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
    args += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--tmpfs", "/tmp"]
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


def _write_inside(work: Path, rel: str, text: str, owner: tuple[int, int] | None) -> None:
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
        with os.fdopen(out, "w") as f:
            if owner is not None:
                os.fchown(f.fileno(), *owner)
            f.write(text)
    finally:
        os.close(fd)


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
