"""What a sandboxed command's child process runs before it becomes the command.

``SandboxRunner`` does not import this module: it passes the file's source to
``python -I -S -c`` with one argument, a JSON spec, and the child runs it as
``__main__``. Isolated, that happens twice. Outside the sandbox it joins the action's
control group (``cgroup``: the files to write its pid to), sets the CPU affinity and a
parent-death signal and ``exec``s bubblewrap (``wrap``), which builds the namespaces
and runs the launcher again inside. Inside (or directly, unisolated) it
drops root for an unprivileged uid, enters a user namespace of its own (so the process
limit counts this sandbox's processes only), sets the resource limits and ``exec``s the
command (``argv``).

Inside bubblewrap only the system paths and Python's prefixes are mounted, not this
package, and ``-I -S`` leaves every site directory off the path: so this file imports
nothing but the standard library (not even ``typing``, which would slow every start).
Whatever goes wrong before the command starts ends the child with code 126 (127 when
the command itself cannot be run) and a line on stderr.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
CLONE_NEWUSER = 0x10000000
# Spec key -> the resource it limits (each is both the soft and the hard limit).
LIMITS = (
    ("memory", resource.RLIMIT_AS),
    ("procs", resource.RLIMIT_NPROC),
    ("fsize", resource.RLIMIT_FSIZE),
    ("core", resource.RLIMIT_CORE),
)


def die(message: str, code: int = 126) -> None:
    sys.stderr.write("tangram sandbox: " + message + "\n")
    os._exit(code)


def enter_user_namespace(libc: ctypes.CDLL, uid: int, gid: int) -> None:
    """Become ``uid``/``gid`` if root, then the same ids in a user namespace of one's own,
    unable to regain privileges."""
    if os.getuid() == 0:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    libc.prctl(PR_SET_DUMPABLE, 1)  # setuid cleared it, and writing uid_map needs it
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWUSER) != 0:
        die("cannot create a user namespace: " + os.strerror(ctypes.get_errno()))
    for name, text in (
        ("setgroups", "deny"),
        ("uid_map", f"{uid} {uid} 1"),
        ("gid_map", f"{gid} {gid} 1"),
    ):
        with open("/proc/self/" + name, "w") as f:
            f.write(text)
    # No setuid binary run by the command can regain root.
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the uid change cleared it


def main(raw: str) -> None:
    spec = json.loads(raw)
    libc = ctypes.CDLL(None, use_errno=True)
    # Join the action's control group before anything else: every process started from
    # here on is born inside it, confined to its cores and limits, and killed with it.
    pid = str(os.getpid())
    for path in spec.get("cgroup") or ():
        try:
            with open(path, "w") as f:
                f.write(pid)
        except OSError as exc:
            die(f"cannot join the control group {path}: {exc}")
    if spec.get("cores") is not None:
        os.sched_setaffinity(0, spec["cores"])
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    wrap = spec.get("wrap")
    if wrap:
        try:
            os.execvp(wrap[0], wrap)
        except OSError as exc:
            die(f"cannot start {wrap[0]!r}: {exc}")
    if spec.get("isolate"):
        enter_user_namespace(libc, spec["uid"], spec["gid"])
    for key, res in LIMITS:
        if spec.get(key) is not None:
            resource.setrlimit(res, (spec[key], spec[key]))
    # Python ignores these and ``exec`` keeps that; the command gets the usual defaults.
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    argv = spec["argv"]
    try:
        os.execvpe(argv[0], argv, os.environ)
    except OSError as exc:
        die(f"cannot run {argv[0]!r}: {exc}", 127)


if __name__ == "__main__":
    main(sys.argv[1])
