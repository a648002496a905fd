"""The CPU sandbox executor: commands in a trajectory's persistent working directory.

Each trajectory gets one working directory that survives between its actions (the
paper's long-lived container: files written by one action are there for the next) and
is removed when the trajectory closes. An action runs one command there as a child
process restricted to exactly the granted core ids, with ``{dop}`` in the command
replaced by the granted parallelism (``pytest -n {dop}``), a wall-clock timeout, limits
on address space and processes, and stdout, stderr and the exit code captured.

The child is started through a tiny launcher (``python -I -S -c``) that sets the CPU
affinity, the resource limits and a parent-death signal and then ``exec``s the command.
``preexec_fn`` would do the same without the extra interpreter start, but it is not safe
in a threaded process (a Ray worker is one): the forked child can deadlock on a lock
another thread held at fork time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Runs in the child before the command: affinity, limits, die with the executor, exec.
_LAUNCHER = """
import ctypes, json, os, resource, signal, sys
spec = json.loads(sys.argv[1])
os.sched_setaffinity(0, spec["cores"])
if spec["memory"] is not None:
    resource.setrlimit(resource.RLIMIT_AS, (spec["memory"], spec["memory"]))
if spec["procs"] is not None:
    resource.setrlimit(resource.RLIMIT_NPROC, (spec["procs"], spec["procs"]))
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
except Exception:
    pass
argv = spec["argv"]
try:
    os.execvpe(argv[0], argv, os.environ)
except OSError as exc:
    sys.stderr.write(f"tangram sandbox: cannot run {argv[0]!r}: {exc}\\n")
    os._exit(127)
"""

_SAFE = re.compile(r"[A-Za-z0-9._-]{1,100}")
KILL_GRACE = 2.0  # seconds to drain pipes after the process group was killed


class SandboxError(ValueError):
    """The command or its placement is invalid; the message says what to change."""


@dataclass(frozen=True, slots=True)
class Command:
    """A command to run in the trajectory's working directory.

    ``command`` is a shell string (run by ``/bin/sh -c``) or an argv list. ``{dop}`` is
    replaced by the granted parallelism, ``{cores}`` by the granted core ids
    (comma-separated) and ``{python}`` by the executor's Python, in the string or in each
    argv item. ``files`` are written (relative
    to the working directory) before the command runs. ``memory_mb`` limits the child's
    address space, ``max_procs`` the number of processes of its user (not enforced for
    root, which the kernel exempts).
    """

    command: str | Sequence[str]
    timeout: float = 600.0
    memory_mb: int | None = None
    max_procs: int | None = None
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
        for name, v in (("memory_mb", self.memory_mb), ("max_procs", self.max_procs)):
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


class SandboxRunner:
    """Runs commands for trajectories under ``root`` on this machine's cores."""

    def __init__(self, root: str | Path, node: str = "") -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.node = node
        self.available = frozenset(os.sched_getaffinity(0))
        self.running: dict[int, str] = {}  # child pid -> trajectory, while it runs

    def workdir(self, trajectory: str) -> Path:
        if not isinstance(trajectory, str) or not trajectory:
            raise SandboxError("a trajectory id must be a non-empty string")
        # Ids become directory names: keep safe ones readable, encode the rest.
        name = trajectory if _SAFE.fullmatch(trajectory) else "x" + trajectory.encode().hex()
        if name in (".", ".."):
            name = "x" + trajectory.encode().hex()
        return self.root / name

    def close_trajectory(self, trajectory: str) -> bool:
        """Remove the trajectory's working directory; False if it had none."""
        path = self.workdir(trajectory)
        existed = path.exists()
        shutil.rmtree(path, ignore_errors=True)
        return existed

    def trajectories(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    async def run(
        self, trajectory: str, cmd: Command, cores: Sequence[int], dop: int | None = None
    ) -> CommandResult:
        cmd.check()
        ids = tuple(int(c) for c in cores)
        if not ids:
            raise SandboxError("no cores granted: a sandbox command needs at least one core")
        missing = sorted(set(ids) - self.available)
        if missing:
            raise SandboxError(
                f"cores {missing} do not exist on node {self.node or 'here'} (it has "
                f"{sorted(self.available)}); the pool's core ids must match the machine"
            )
        dop = len(ids) if dop is None else dop
        work = self.workdir(trajectory)
        work.mkdir(parents=True, exist_ok=True)
        for rel, text in (cmd.files or {}).items():
            target = work / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        filled = fill(cmd.command, dop, ids)
        argv = ["/bin/sh", "-c", filled] if isinstance(filled, str) else list(filled)
        spec = {
            "cores": list(ids),
            "memory": cmd.memory_mb * 2**20 if cmd.memory_mb else None,
            "procs": cmd.max_procs,
            "argv": argv,
        }
        env = dict(os.environ)
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
        t0 = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-I",
            "-S",
            "-c",
            _LAUNCHER,
            json.dumps(spec),
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
        return CommandResult(
            exit_code=code if code is not None else -signal.SIGKILL,
            stdout=stdout,
            stderr=stderr,
            timed_out=timed_out,
            cores=ids,
            dop=dop,
            wall_seconds=time.monotonic() - t0,
            workdir=str(work),
            node=self.node,
            pid=proc.pid,
        )

    def kill_all(self) -> None:
        """Kill every running child (the executor is going away)."""
        for pid in list(self.running):
            _kill_group(pid)


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
