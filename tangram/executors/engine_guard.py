"""Runs an inference engine and ends it when the executor that launched it dies.

``HttpEngine.launch`` starts each engine in a session of its own, so that
``HttpInstance.stop()`` ends the engine and its workers (one per GPU) together with one
``killpg``. Such a process group outlives its launcher: an executor killed outright, or
crashed, would leave its engines running and holding their GPUs. So ``launch`` runs this
guard as the session's leader, and the guard runs the engine::

    python -I -S engine_guard.py EXECUTOR_PID [--grace SECONDS] -- ENGINE_ARGV...

(``python -m tangram.executors.engine_guard`` works too; ``launch`` runs the file,
which needs nothing but the standard library, so that every engine does not pay for
importing Tangram.) The engine inherits the guard's environment, standard streams and
process group, and then:

- the engine exits: the guard exits the same way (the same code, or killed by the same
  signal), so the executor's ``Popen`` of the guard reports what the engine did;
- the executor dies (its pid, watched with a pidfd, or ``getppid()`` polled every 0.5 s
  where there is none): SIGTERM to the group, up to the grace period for the engine to
  exit (``--grace``, else ``TANGRAM_ENGINE_GRACE``, else 10 s), then SIGKILL to the group;
- the guard gets SIGTERM (``stop()`` signals the whole group, so the engine got it too):
  it waits the same grace period for the engine, then SIGKILLs the group. (A SIGTERM
  sent to the guard alone thus reaches the engine as that SIGKILL.)
- the guard itself is killed (SIGKILL): the engine gets SIGKILL, its parent-death
  signal. Processes the engine started are not signalled then (``stop()`` takes the
  guard's exit for the engine's and sends nothing): they have only their own checks.

An executor that is gone before the guard runs (the guard's parent is not the pid it
was given) starts nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable

GRACE_ENV = "TANGRAM_ENGINE_GRACE"
DEFAULT_GRACE = 10.0
POLL = 0.5  # seconds between checks, whatever the pidfds say
PR_SET_PDEATHSIG = 1
PRCTL: Callable[..., int] | None
try:  # Linux's prctl, looked up before any fork
    PRCTL = ctypes.CDLL(None).prctl
except (OSError, AttributeError):
    PRCTL = None
USAGE = "usage: engine_guard EXECUTOR_PID [--grace SECONDS] -- ENGINE_ARGV..."


def pidfd(pid: int) -> int | None:
    """A pidfd on ``pid`` (readable once it has exited), or None where there is none."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # not Linux 5.3+, or gone already
        return None


def die_with_guard() -> None:
    """In the engine, before it runs: SIGKILL it when the guard goes."""
    guard = os.getppid()
    if PRCTL is not None:
        PRCTL(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != guard:  # the guard died before the signal was set
        os._exit(1)


def exit_like(code: int) -> int:
    """Exit as the engine did: with its code, or killed by the signal that killed it."""
    if code >= 0:
        return code
    with contextlib.suppress(OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core dump of the guard
    with contextlib.suppress(OSError, ValueError):
        signal.signal(-code, signal.SIG_DFL)  # (SIGKILL's cannot be set, nor needs to)
    os.kill(os.getpid(), -code)
    return 128 - code  # a signal whose default is not to terminate


def guard(parent: int, argv: list[str], grace: float) -> int:
    if os.getppid() != parent:
        return 1  # the executor died before the guard ran: start nothing
    parent_fd = pidfd(parent)
    if os.getppid() != parent:
        return 1  # (and the pidfd may name another process)
    deadline: list[float] = []  # when the group is SIGKILLed, once it is being stopped

    def stopping(*_: object) -> None:
        if not deadline:
            deadline.append(time.monotonic() + grace)

    signal.signal(signal.SIGTERM, stopping)
    try:
        engine = subprocess.Popen(argv, preexec_fn=die_with_guard)
    except OSError as exc:
        print(f"tangram engine guard: cannot start {argv[0]!r}: {exc}", file=sys.stderr)
        return 127
    poller = select.poll()
    for fd in parent_fd, pidfd(engine.pid):
        if fd is not None:
            poller.register(fd, select.POLLIN)
    while True:
        code = engine.poll()
        if code is not None:
            return exit_like(code)
        ready = [fd for fd, _ in poller.poll(POLL * 1000)]
        if not deadline and (os.getppid() != parent or parent_fd in ready):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            os.killpg(0, signal.SIGTERM)
            stopping()
        if parent_fd in ready:
            poller.unregister(parent_fd)  # it stays readable
            parent_fd = None
        if deadline and time.monotonic() >= deadline[0] and engine.poll() is None:
            os.killpg(0, signal.SIGKILL)  # the guard too


def main(args: list[str] | None = None) -> int:
    args = sys.argv[1:] if args is None else args
    try:
        sep = args.index("--")
        parent, opts, argv = int(args[0]), args[1:sep], args[sep + 1 :]
        grace = float(os.environ.get(GRACE_ENV) or DEFAULT_GRACE)
        if opts[:1] == ["--grace"] and len(opts) == 2:
            grace = float(opts[1])
        elif opts:
            raise ValueError(opts)
    except (IndexError, ValueError):
        argv = []
    if not argv:
        print(USAGE, file=sys.stderr)
        return 2
    return guard(parent, argv, grace)


if __name__ == "__main__":
    sys.exit(main())
