"""Escape tests: untrusted code in the sandbox tries to reach what it must not.

Real processes under the real isolation (bubblewrap, namespaces, an unprivileged user,
rlimits); nothing is mocked. Each attempt must fail inside the sandbox, and the runner
must keep serving afterwards.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from tangram.executors.sandbox import Command, SandboxError, SandboxRunner, isolation_problem

CORES = sorted(os.sched_getaffinity(0))
PY = sys.executable
NO_ISOLATION = isolation_problem()

pytestmark = pytest.mark.skipif(
    NO_ISOLATION is not None, reason=f"SANDBOX ISOLATION NOT TESTED: {NO_ISOLATION}"
)


def py(code: str, **kw: object) -> Command:
    """A Python snippet as an argv command (no shell quoting to get wrong)."""
    return Command([PY, "-c", code], timeout=kw.pop("timeout", 20.0), **kw)  # type: ignore[arg-type]


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[SandboxRunner]:
    r = SandboxRunner(tmp_path / "sandboxes", node="n0", trusted=True)  # fencing: elsewhere
    yield r
    r.kill_all()  # whatever a failed test left running goes with it


async def still_serves(runner: SandboxRunner) -> None:
    res = await runner.run("after", Command("echo ok; id -u"), CORES[:1])
    assert res.ok, res.stderr
    assert res.stdout.split()[0] == "ok"


def _host_processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker.encode() in cmdline and state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


# ---------------------------------------------------------------- network
@pytest_asyncio.fixture
async def listener() -> AsyncIterator[tuple[int, list[str]]]:
    """A real TCP server on 127.0.0.1 (where a broker would listen) that records who
    connected."""
    seen: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(str(writer.get_extra_info("peername")))
        writer.write(b"secret broker reply\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield port, seen
    server.close()
    await server.wait_closed()


async def test_no_connection_to_a_server_on_the_host_loopback(
    runner: SandboxRunner, listener: tuple[int, list[str]]
):
    port, seen = listener
    code = (
        "import socket\n"
        "try:\n"
        f"    s = socket.create_connection(('127.0.0.1', {port}), timeout=3)\n"
        "    print('CONNECTED', s.recv(100))\n"
        "except OSError as exc:\n"
        "    print('refused:', exc)\n"
        "    raise SystemExit(7)\n"
    )
    res = await runner.run("net", py(code), CORES[:1])
    assert res.exit_code == 7, res.stdout + res.stderr
    assert "CONNECTED" not in res.stdout and seen == []
    # Nor anywhere else: the only interface is a loopback of its own, and it is down.
    res = await runner.run("net", py("import socket; print(socket.if_nameindex())"), CORES[:1])
    assert res.stdout.strip() == "[(1, 'lo')]", res.stdout + res.stderr
    # The server is fine and reachable from the host; the runner still serves.
    with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
        s.settimeout(3)
        assert (await asyncio.to_thread(s.recv, 100)).startswith(b"secret")
    await still_serves(runner)


# ---------------------------------------------------------------- files
async def test_data_directory_and_tokens_are_out_of_reach(runner: SandboxRunner, tmp_path: Path):
    # A broker data directory and tokens file next to the sandbox root, readable by all
    # on the host: the sandbox must still not see them.
    data = tmp_path / "data"
    data.mkdir()
    (data / "journal.sqlite3").write_text("JOURNAL-SECRET")
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("tenant-a: TOKEN-SECRET")
    for p in (tmp_path, data, data / "journal.sqlite3", tokens):
        p.chmod(0o755 if p.is_dir() else 0o644)
    code = (
        "import sys\n"
        "hits = []\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        hits.append(open(path).read())\n"
        "    except OSError as exc:\n"
        "        print(type(exc).__name__, path)\n"
        "print('READ', hits)\n"
        "raise SystemExit(9 if hits else 0)\n"
    )
    cmd = Command([PY, "-c", code, str(data / "journal.sqlite3"), str(tokens)], timeout=20)
    res = await runner.run("files", cmd, CORES[:1])
    assert res.exit_code == 0, res.stdout + res.stderr
    assert "SECRET" not in res.stdout and "READ []" in res.stdout
    # The host's /root, /home and /work are not there either; /etc holds a few entries.
    res = await runner.run(
        "files",
        Command("ls -a /; ls /etc; cat /etc/shadow; ls /home /work/main/tangram", timeout=20),
        CORES[:1],
    )
    assert "shadow" not in res.stdout and "home" not in res.stdout.split()
    assert "No such file" in res.stderr
    await still_serves(runner)


async def test_another_trajectorys_files_are_out_of_reach(runner: SandboxRunner):
    a = await runner.run("traj-a", Command("echo TRAJ-A-SECRET > secret.txt"), CORES[:1])
    assert a.ok, a.stderr
    secret = Path(a.workdir) / "secret.txt"
    assert secret.read_text() == "TRAJ-A-SECRET\n"
    b = await runner.run(
        "traj-b",
        Command(f"ls -a ..; cat ../traj-a/secret.txt; cat {secret}; ls {runner.root}", timeout=20),
        CORES[:1],
    )
    assert "TRAJ-A-SECRET" not in b.stdout
    assert "traj-a" not in b.stdout  # its directory is not even listed
    assert "No such file" in b.stderr
    # Nor can it write there, or anywhere outside its own directory and private /tmp.
    w = await runner.run(
        "traj-b",
        Command(f"(echo x > {secret}); (touch /usr/pwned); (echo y > /tmp/t) && echo tmp-ok"),
        CORES[:1],
    )
    assert secret.read_text() == "TRAJ-A-SECRET\n" and not Path("/usr/pwned").exists()
    assert "tmp-ok" in w.stdout
    # The trajectory's own directory is still its own, and the runner still serves.
    again = await runner.run("traj-a", Command("cat secret.txt"), CORES[:1])
    assert again.stdout == "TRAJ-A-SECRET\n"
    await still_serves(runner)


async def test_planted_symlinks_do_not_make_the_executor_write_outside(
    runner: SandboxRunner, tmp_path: Path
):
    # The executor writes a command's ``files`` itself, as root here: links the code
    # left in its directory must not send those writes elsewhere on the host.
    outside = tmp_path / "host-file"
    outside.write_text("HOST")
    (tmp_path / "host-dir").mkdir()
    plant = Command(f"ln -s {outside} f.txt; ln -s {tmp_path / 'host-dir'} d", timeout=20)
    assert (await runner.run("links", plant, CORES[:1])).ok
    with pytest.raises(SandboxError, match="symbolic link"):
        await runner.run("links", Command("true", files={"f.txt": "PWNED"}), CORES[:1])
    with pytest.raises(SandboxError, match="symbolic link"):
        await runner.run("links", Command("true", files={"d/x.txt": "PWNED"}), CORES[:1])
    assert outside.read_text() == "HOST" and list((tmp_path / "host-dir").iterdir()) == []
    ok = await runner.run("links", Command("cat new/n.txt", files={"new/n.txt": "x"}), CORES[:1])
    assert ok.stdout == "x"
    await still_serves(runner)


async def test_a_new_session_does_not_escape_the_timeout_kill(runner: SandboxRunner):
    # setsid leaves the process group the runner kills; the PID namespace still ends.
    marker = f"31.{os.getpid()}"
    res = await runner.run(
        "sess", Command(f"setsid sleep {marker} & sleep 30", timeout=1.0), CORES[:1]
    )
    assert res.timed_out
    deadline = time.monotonic() + 5
    while _host_processes_with(marker) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert _host_processes_with(marker) == []
    await still_serves(runner)


async def test_not_root_and_no_host_secrets_in_the_environment(
    runner: SandboxRunner, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("TANGRAM_TEST_API_KEY", "ENV-SECRET")
    res = await runner.run("env", Command("id -u; env"), CORES[:1])
    assert res.ok, res.stderr
    assert res.stdout.split()[0] != "0"
    assert "ENV-SECRET" not in res.stdout
    # The host's processes are invisible (a PID namespace): only the sandbox's own.
    res = await runner.run("env", Command("ps -e -o comm="), CORES[:1])
    names = res.stdout.split()
    assert res.ok and "ps" in names and len(names) <= 4, res.stdout + res.stderr
    assert not {"pytest", "python", "python3"} & set(names)


# ---------------------------------------------------------------- limits
async def test_fork_bomb_is_bounded_by_the_process_limit(runner: SandboxRunner):
    # Counts the forks it gets before the kernel refuses one; children wait to be killed.
    code = (
        "import os, time\n"
        "n = 0\n"
        "try:\n"
        "    for _ in range(10_000):\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(60)\n"
        "            os._exit(0)\n"
        "        n += 1\n"
        "except OSError as exc:\n"
        "    print('refused after', n, exc.errno)\n"
        "    raise SystemExit(0)\n"
        "print('forked', n)\n"
    )
    res = await runner.run("bomb", py(code, max_procs=16), CORES[:1])
    assert res.ok and res.stdout.startswith("refused after"), res.stdout + res.stderr
    assert int(res.stdout.split()[2]) < 16
    # A classic shell fork bomb: bounded, then killed with its whole PID namespace at
    # the timeout; nothing of it survives on the host.
    marker = f"bomb{os.getpid()}"
    bomb = Command(f": {marker}; b() {{ b | b & }}; b; sleep 30", timeout=2.0, max_procs=16)
    t0 = time.monotonic()
    res = await runner.run("bomb", bomb, CORES[:1])
    assert res.timed_out and time.monotonic() - t0 < 10
    deadline = time.monotonic() + 5
    while _host_processes_with(marker) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert _host_processes_with(marker) == []
    await still_serves(runner)


async def test_memory_beyond_the_limit_fails(runner: SandboxRunner):
    code = "b = bytearray(600 * 2**20); print('ALLOCATED')"
    res = await runner.run("mem", py(code, memory_mb=200), CORES[:1])
    assert res.exit_code != 0 and "ALLOCATED" not in res.stdout
    # The control group's limit: killed by the kernel, and the result says so.
    assert res.extra["oom_kills"] == 1 and "out of memory" in res.stderr
    await still_serves(runner)


async def test_file_beyond_the_size_limit_fails(runner: SandboxRunner):
    # From the shell (killed by SIGXFSZ) and from Python (which ignores the signal and
    # gets EFBIG): either way the file stops at the limit.
    res = await runner.run(
        "fsize", Command("head -c 5000000 /dev/zero > big.bin", max_file_mb=1), CORES[:1]
    )
    assert res.exit_code != 0
    big = Path(res.workdir) / "big.bin"
    assert big.stat().st_size <= 2**20
    code = "open('big2.bin', 'wb').write(b'0' * 5_000_000)"
    res = await runner.run("fsize", py(code, max_file_mb=1), CORES[:1])
    assert res.exit_code != 0 and "File too large" in res.stderr, res.stderr
    assert (Path(res.workdir) / "big2.bin").stat().st_size <= 2**20
    await still_serves(runner)


async def test_runner_defaults_apply_when_a_command_sets_no_limits(runner: SandboxRunner):
    res = await runner.run(
        "limits", py("import resource as r; print(r.getrlimit(r.RLIMIT_FSIZE)[0])"), CORES[:1]
    )
    assert res.ok, res.stderr
    assert int(res.stdout) == runner.limits.max_file_mb * 2**20  # type: ignore[operator]


def test_isolation_is_the_default(tmp_path: Path):
    assert SandboxRunner(tmp_path, trusted=True).isolate is True
