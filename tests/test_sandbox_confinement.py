"""Hard confinement of sandbox commands by control groups (issue 14).

Each escape here worked on the runner before it confined commands in cgroups: code
widened its affinity to cores it was not granted, several processes together used more
memory than the sandbox's limit, ``/tmp`` had no size, and a process that left its
process group kept running (and burning a core) after the action. The tests use the
machine's real cgroup hierarchy (v1 here, as root); the v2 layout logic is checked on a
directory tree standing in for a v2 mount, since this machine has no v2 controllers.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import pytest

from tangram.executors import cgroups, sandbox
from tangram.executors.cgroups import CgroupError, Confinement, open_hierarchy, parse_cpulist
from tangram.executors.sandbox import (
    THREAD_VARS,
    Command,
    SandboxError,
    SandboxRunner,
    isolation_problem,
)

CORES = sorted(os.sched_getaffinity(0))
PY = sys.executable


def _cgroup_problem() -> str | None:
    try:
        open_hierarchy("probe-tests").remove_orphans()
    except (CgroupError, ValueError) as exc:
        return str(exc)
    return None


NO_CGROUPS = _cgroup_problem()
pytestmark = pytest.mark.skipif(
    NO_CGROUPS is not None, reason=f"SANDBOX CONFINEMENT NOT TESTED: {NO_CGROUPS}"
)
NO_ISOLATION = isolation_problem()


@pytest.fixture(params=["isolated", "plain"])
def runner(tmp_path: Path, request: pytest.FixtureRequest) -> SandboxRunner:
    isolate = request.param == "isolated"
    if isolate and NO_ISOLATION:
        pytest.skip(f"SANDBOX ISOLATION NOT TESTED: {NO_ISOLATION}")
    return SandboxRunner(tmp_path / "sb", node="n0", isolate=isolate, trusted=True)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def _groups(runner: SandboxRunner) -> list[str]:
    assert runner.cgroups is not None
    return runner.cgroups.children()


@pytest.mark.skipif(len(CORES) < 2, reason="needs two cores to widen to")
async def test_code_cannot_widen_its_cores(runner: SandboxRunner):
    granted, other = CORES[:1], CORES[-1]
    code = (
        "import os, time\n"
        f"os.sched_setaffinity(0, {set(CORES)!r})\n"
        "seen = set()\n"
        "end = time.monotonic() + 0.3\n"
        "while time.monotonic() < end:\n"
        "    seen.add(int(open('/proc/self/stat').read().rsplit(')', 1)[1].split()[36]))\n"
        "print(sorted(os.sched_getaffinity(0)), sorted(seen))\n"
    )
    res = await runner.run("t", Command([PY, "-c", code]), granted)
    assert res.ok, res.stderr
    assert res.stdout.split("\n")[0] == f"{granted} {granted}"
    taskset = await runner.run("t", Command(f"taskset -c {other} true; echo $?"), granted)
    assert taskset.stdout.strip() != "0", "taskset moved the command to a core not granted"


async def test_memory_limit_covers_every_process_together(runner: SandboxRunner):
    # Three processes of 150 MiB each under a 256 MiB sandbox: each would pass a
    # per-process limit; together they cannot.
    code = (
        "import subprocess, sys\n"
        "child = 'b = bytearray(150 * 2**20); import time; time.sleep(1)'\n"
        "ps = [subprocess.Popen([sys.executable, '-c', child]) for _ in range(3)]\n"
        "print([p.wait() for p in ps])\n"
    )
    res = await runner.run("t", Command([PY, "-c", code], memory_mb=256), CORES[:1])
    assert res.extra["oom_kills"] >= 1
    assert res.extra["memory_peak_mb"] <= 256
    assert "-9" in res.stdout, res.stdout  # a child was killed by the kernel


async def test_unconfined_runner_limits_each_process_only(tmp_path: Path, caplog):
    """The documented opt-out, and why it is not the default: the same three processes
    all get their memory."""
    with caplog.at_level(logging.WARNING, logger="tangram.executors.sandbox"):
        runner = SandboxRunner(tmp_path / "u", isolate=False, trusted=True, confine=False)
    assert "UNCONFINED" in caplog.text
    code = (
        "import subprocess, sys\n"
        "child = 'b = bytearray(150 * 2**20)'\n"
        "print([subprocess.call([sys.executable, '-c', child]) for _ in range(3)])\n"
    )
    res = await runner.run("t", Command([PY, "-c", code], memory_mb=256), CORES[:1])
    assert res.stdout.strip() == "[0, 0, 0]" and "oom_kills" not in res.extra


@pytest.mark.skipif(NO_ISOLATION is not None, reason=f"needs bubblewrap: {NO_ISOLATION}")
async def test_private_tmp_has_a_size_and_counts_as_memory(tmp_path: Path):
    runner = SandboxRunner(tmp_path / "sb", isolate=True, trusted=True)
    fill_tmp = "dd if=/dev/zero of=/tmp/x bs=1M count=100 2>/dev/null; echo $?; du -m /tmp/x"
    res = await runner.run("t", Command(fill_tmp, tmp_mb=32), CORES[:1])
    code, size = res.stdout.split()[0], int(res.stdout.split()[1])
    assert code != "0" and size <= 32, res.stdout
    # A /tmp larger than the memory limit: its pages are the sandbox's memory.
    res = await runner.run("t", Command(fill_tmp, tmp_mb=1024, memory_mb=64), CORES[:1])
    assert res.exit_code != 0 or int(res.stdout.split()[1]) < 64, res


async def test_fork_bomb_is_stopped_by_the_process_limit(runner: SandboxRunner):
    code = (
        "import os, time\n"
        "n = 0\n"
        "try:\n"
        "    while n < 1000:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(30)\n"
        "            os._exit(0)\n"
        "        n += 1\n"
        "except OSError as exc:\n"
        "    print('stopped', n, exc.errno)\n"
    )
    t0 = time.monotonic()
    res = await runner.run("t", Command([PY, "-c", code], max_procs=40), CORES[:1])
    assert res.stdout.startswith("stopped"), (res.stdout, res.stderr)
    assert int(res.stdout.split()[1]) < 40
    assert time.monotonic() - t0 < 20  # the sleeping children were killed, not waited for
    assert _groups(runner) == []


async def test_nothing_keeps_running_after_an_action(runner: SandboxRunner, tmp_path: Path):
    """A busy loop that left the process group (setsid) and the session survived the
    action before; now the action's group is emptied when it ends."""
    spin = f"{PY} -c 'while True: pass'"
    res = await runner.run(
        "t", Command(f"setsid {spin} > /dev/null 2>&1 & echo $!; sleep 0.2"), CORES[:1]
    )
    assert res.ok, res.stderr
    pid_inside = int(res.stdout.split()[0])
    if runner.isolate:
        pid_inside = -1  # a pid of the sandbox's own namespace: look for the loop instead
    time.sleep(0.1)
    survivors = [
        int(e.name)
        for e in os.scandir("/proc")
        if e.name.isdigit() and _alive(int(e.name)) and "while True: pass" in _cmdline(int(e.name))
    ]
    assert survivors == [] and not (pid_inside > 0 and _alive(pid_inside))
    assert _groups(runner) == []


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


async def test_thread_variables_follow_the_grant(runner: SandboxRunner):
    show = "; ".join(f"echo ${v}" for v in THREAD_VARS)
    res = await runner.run("t", Command(show), CORES[:1], dop=1)
    assert res.stdout.split() == ["1"] * len(THREAD_VARS)


async def test_orphan_groups_of_a_crashed_runner_are_removed_at_start(tmp_path: Path):
    import subprocess

    root = tmp_path / "sb"
    first = SandboxRunner(root, node="n0", isolate=False, trusted=True)
    assert first.cgroups is not None
    # What a runner that died mid-action leaves: a group named after its (gone) process,
    # with the action's process still in it.
    orphan = first.cgroups.create("999999999-1", Confinement(cpus=tuple(CORES[:1])))
    stray = subprocess.Popen(["sleep", "60"])
    for path in orphan.join_files:
        Path(path).write_text(str(stray.pid))
    mine = first.cgroups.create(f"{os.getpid()}-999999", Confinement(cpus=tuple(CORES[:1])))
    try:
        second = SandboxRunner(root, node="n0", isolate=False, trusted=True)
        assert stray.wait(timeout=10) == -9
        assert second.cgroups is not None
        assert second.cgroups.children() == [mine.name]  # a live runner's group stays
    finally:
        stray.kill()
        mine.remove()


async def test_refuses_to_start_without_cgroup_rights(tmp_path: Path, monkeypatch):
    def denied(owner: str) -> None:
        raise CgroupError(13, "cannot create control group /sys/fs/cgroup/x: Permission denied")

    monkeypatch.setattr(sandbox, "open_hierarchy", denied)
    with pytest.raises(SandboxError, match="confine=False") as err:
        SandboxRunner(tmp_path / "sb", isolate=False, trusted=True)
    assert "Permission denied" in str(err.value) and "unconfined" in str(err.value)


def test_groups_sit_below_the_executors_own_group():
    h = open_hierarchy("probe-tests")
    assert isinstance(h, cgroups.V1)
    own = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        for name in names.split(","):
            own[name] = path
    for controller, base in h.bases.items():
        assert str(base).endswith(f"{own[controller].rstrip('/')}/tangram/probe-tests")


def test_cpulists():
    assert parse_cpulist("0-3,8,10-11\n") == (0, 1, 2, 3, 8, 10, 11)
    assert cgroups.cpulist([3, 1, 2, 1]) == "1,2,3"
    assert cgroups.numa_nodes([0], sysfs="/nonexistent") == ()


def test_v2_layout_on_a_stand_in_tree(tmp_path: Path):
    """This machine has no v2 controllers, so the v2 code runs against a directory tree
    laid out like a v2 mount (plain files stand in for the kernel's): it must enable
    the controllers level by level and write v2's file names."""
    mount = tmp_path / "cg"
    (mount / "svc").mkdir(parents=True)
    info = tmp_path / "mountinfo"
    info.write_text(f"30 1 0:26 / {mount} rw,nosuid - cgroup2 cgroup2 rw\n")
    proc = tmp_path / "self"
    proc.mkdir()
    (proc / "cgroup").write_text("0::/svc\n")
    h = open_hierarchy("owner", proc_self=str(proc), mounts=str(info))
    assert isinstance(h, cgroups.V2) and h.base == mount / "svc" / "tangram" / "owner"
    for level in (mount / "svc", mount / "svc" / "tangram", h.base):
        assert (level / "cgroup.subtree_control").read_text() == "+cpuset +memory +pids"
    g = h.create("a1", Confinement(cpus=(2, 0), mems=(0,), memory=2**20, pids=7))
    d = g.dirs[""]
    assert (d / "cpuset.cpus").read_text() == "0,2"
    assert (d / "memory.max").read_text() == str(2**20)
    assert (d / "pids.max").read_text() == "7"
    assert g.join_files == [str(d / "cgroup.procs")]
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\n")
    assert g.oom_kills() == 2
    (d / "cgroup.kill").write_text("")
    g.kill()  # the kernel's cgroup.kill: one write, then the group is empty
    assert (d / "cgroup.kill").read_text() == "1"
    assert h.children() == ["a1"]


async def test_empty_owner_directories_do_not_pile_up(tmp_path: Path):
    """Every runner root makes an owner directory in each hierarchy; a starting runner
    removes the empty ones of others, and a runner whose directory went that way makes
    it again at its next command."""
    first = SandboxRunner(tmp_path / "a", isolate=False, trusted=True)
    assert first.cgroups is not None
    owner_dirs = first.cgroups.owner_dirs()
    assert all(d.is_dir() for d in owner_dirs)
    SandboxRunner(tmp_path / "b", isolate=False, trusted=True)  # removes a's: it is empty
    assert not any(d.exists() for d in owner_dirs)
    res = await first.run("t", Command("echo ok"), CORES[:1])
    assert res.ok and res.stdout == "ok\n", res.stderr
    assert all(d.is_dir() for d in owner_dirs)
