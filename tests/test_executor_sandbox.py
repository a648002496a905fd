"""The sandbox executor on its own (no Ray): real child processes on exact cores."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tangram
from tangram.executors import launcher, sandbox
from tangram.executors.sandbox import (
    Command,
    SandboxError,
    SandboxRunner,
    fill,
    isolation_problem,
)

CORES = sorted(os.sched_getaffinity(0))
PY = sys.executable
# The live benchmark's suite (tangram/ray/live_suite), read as files: no Ray here.
SUITE = Path(tangram.__file__).parent / "ray" / "live_suite"
AFFINITY = f"{PY} -c 'import os; print(sorted(os.sched_getaffinity(0)))'"


def _alive(pid: int) -> bool:
    """Running or sleeping; a killed orphan may stay a zombie until init reaps it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


NO_ISOLATION = isolation_problem()


# Every behaviour holds isolated (the default) and with the documented opt-out.
@pytest.fixture(params=["isolated", "plain"])
def runner(tmp_path: Path, request: pytest.FixtureRequest) -> SandboxRunner:
    isolate = request.param == "isolated"
    if isolate and NO_ISOLATION:
        pytest.skip(f"SANDBOX ISOLATION NOT TESTED: {NO_ISOLATION}")
    # Trusted: these tests are about running commands; fencing is in test_executor_fencing.
    return SandboxRunner(tmp_path / "sandboxes", node="n0", isolate=isolate, trusted=True)


@pytest.mark.parametrize("granted", [CORES[:1], CORES[-1:], CORES])
async def test_child_sees_exactly_the_granted_cores(runner: SandboxRunner, granted: list[int]):
    res = await runner.run("t1", Command(AFFINITY + "; echo dop={dop} cores={cores}"), granted)
    assert res.ok, res.stderr
    lines = res.stdout.split("\n")
    assert lines[0] == str(granted)
    assert lines[1] == f"dop={len(granted)} cores={','.join(map(str, granted))}"
    assert res.cores == tuple(granted) and res.node == "n0"


async def test_argv_commands_and_environment(runner: SandboxRunner):
    cmd = Command(
        [
            PY,
            "-c",
            "import os, sys; print(sys.argv[1], os.environ['TANGRAM_DOP'], os.environ['X'])",
            "{dop}",
        ],
        env={"X": "y"},
    )
    res = await runner.run("t1", cmd, CORES[:1], dop=1)
    assert res.stdout.split() == ["1", "1", "y"]


async def test_working_directory_persists_until_the_trajectory_closes(runner: SandboxRunner):
    first = await runner.run("traj-a", Command("echo hello > state.txt"), CORES[:1])
    assert first.ok
    second = await runner.run(
        "traj-a", Command("cat state.txt; cat notes/n.txt", files={"notes/n.txt": "x"}), CORES[:1]
    )
    assert second.stdout == "hello\nx"
    other = await runner.run("traj-b", Command("ls"), CORES[:1])
    assert other.stdout == ""  # another trajectory has its own directory
    assert runner.close_trajectory("traj-a") is True
    assert not Path(first.workdir).exists()
    assert runner.close_trajectory("traj-a") is False


async def test_timeout_kills_the_child_and_its_group(runner: SandboxRunner):
    # The shell starts a background grandchild too: the whole group must die. Process
    # ids inside the sandbox are its own PID namespace's, so look for them by a marker
    # in their command line among the host's processes.
    marker = f"30.{os.getpid()}"
    cmd = Command(f"sleep {marker} & sleep {marker}", timeout=0.5)
    t0 = time.monotonic()
    res = await runner.run("t1", cmd, CORES[:1])
    assert res.timed_out and not res.ok
    assert res.exit_code < 0
    assert time.monotonic() - t0 < 5
    time.sleep(0.2)
    assert not _running_with(marker)
    assert runner.running == {}


def _running_with(marker: str) -> list[int]:
    """Live host processes whose command line holds ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline and _alive(int(entry.name)):
                found.append(int(entry.name))
    return found


async def test_exit_code_stderr_and_memory_limit(runner: SandboxRunner):
    res = await runner.run("t1", Command("echo oops >&2; exit 3"), CORES[:1])
    assert (res.exit_code, res.stderr) == (3, "oops\n")
    hog = Command(f"{PY} -c 'b = bytearray(800 * 2**20)'", memory_mb=300)
    res = await runner.run("t1", hog, CORES[:1])
    # Confined (the default), the control group's limit: the kernel kills the process
    # and the result says so; the per-process limit of an unconfined runner is covered
    # in test_sandbox_confinement.py.
    assert res.exit_code == 128 + 9 and res.extra["oom_kills"] == 1
    assert "out of memory" in res.stderr and "300 MiB" in res.stderr


async def test_output_is_capped(runner: SandboxRunner):
    res = await runner.run(
        "t1", Command(f"{PY} -c 'print(\"x\" * 5000)'", max_output=100), CORES[:1]
    )
    assert len(res.stdout) == 100


async def test_missing_program_is_a_clear_failure(runner: SandboxRunner):
    res = await runner.run("t1", Command(["no-such-program-here"]), CORES[:1])
    assert res.exit_code == 127 and "cannot run 'no-such-program-here'" in res.stderr


def test_the_launcher_runs_from_its_module_and_reports_a_wrapper_it_cannot_start():
    # The child runs launcher.py's source, not an import of it (the package may not be
    # visible inside the sandbox): this is the start of every command.
    spec = {"wrap": ["no-such-wrapper-here"], "argv": ["true"]}
    argv = sandbox._launch(spec)
    assert argv[argv.index("-c") + 1] == Path(launcher.__file__).read_text()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 126
    assert done.stderr.startswith("tangram sandbox: cannot start 'no-such-wrapper-here'")


@pytest.mark.parametrize(
    ("cmd", "match"),
    [
        (Command(""), "command is empty"),
        (Command([]), "non-empty"),
        (Command("true", timeout=0), "timeout must be a positive"),
        (Command("true", timeout=float("nan")), "timeout must be a positive"),
        (Command("true", memory_mb=-1), "memory_mb"),
        (Command("true", files={"/etc/x": ""}), "relative path"),
        (Command("true", files={"../x": ""}), "relative path"),
    ],
)
async def test_bad_commands_are_refused(runner: SandboxRunner, cmd: Command, match: str):
    with pytest.raises(SandboxError, match=match):
        await runner.run("t1", cmd, CORES[:1])


async def test_bad_placement_is_refused(runner: SandboxRunner):
    with pytest.raises(SandboxError, match="do not exist"):
        await runner.run("t1", Command("true"), [max(CORES) + 1000])
    with pytest.raises(SandboxError, match="no cores granted"):
        await runner.run("t1", Command("true"), [])
    with pytest.raises(SandboxError, match="trajectory id"):
        await runner.run("", Command("true"), CORES[:1])


async def test_odd_trajectory_ids_stay_inside_the_root(runner: SandboxRunner):
    res = await runner.run("../../etc", Command("pwd"), CORES[:1])
    assert Path(res.stdout.strip()).parent == runner.root.resolve()


def test_fill_replaces_only_the_placeholders():
    assert fill("pytest -n {dop} {x} {cores}", 3, [4, 5, 6]) == "pytest -n 3 {x} 4,5,6"
    assert fill(["{python}", "{dop}"], 2, [0]) == [sys.executable, "2"]


async def test_pytest_suite_runs_with_dop_workers(runner: SandboxRunner):
    pytest.importorskip("xdist")
    cmd = Command(
        "{python} -m pytest -q -p no:cacheprovider -o python_files='check_*.py' "
        "-p xdist.plugin -n {dop} .",
        env={"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},  # the host venv's plugins are slow
        files={p.name: p.read_text() for p in SUITE.glob("*.py")},
        timeout=120,
    )
    res = await runner.run("suite", cmd, CORES)
    assert res.ok, res.stdout + res.stderr
    assert "14 passed" in res.stdout
    assert (Path(res.workdir) / "xdist_workers.txt").read_text() == str(len(CORES))


def test_a_runner_that_cannot_isolate_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap to be found
    isolation_problem.cache_clear()
    try:
        with pytest.raises(SandboxError, match=r"bubblewrap is not installed.*isolate=False"):
            SandboxRunner(tmp_path / "r", trusted=True)
        assert SandboxRunner(tmp_path / "r", isolate=False, trusted=True).isolate is False
    finally:
        isolation_problem.cache_clear()
