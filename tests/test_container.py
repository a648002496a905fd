"""The container executor on real runc, with the real test image
(deploy/image/sandbox-image.sh, built once and cached): persistence, confinement
(cpuset, memory with /tmp, pids, freezer between actions, network), file transfer
without following links, orphan cleanup and fencing. Nothing is mocked."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from tangram.executors import ForgedGrant, GrantMismatch, GrantSigner, StaleLease
from tangram.executors.container import ContainerRunner, _cgroup_procs, runc_problem
from tangram.executors.images import ImageStore, tool_problem
from tangram.executors.sandbox import Command, Limits, SandboxError
from tangram.spec import Allocation

ROOT = Path(__file__).resolve().parents[1]
CORES = sorted(os.sched_getaffinity(0))
KEY = bytes(range(32))


def _why_not() -> str | None:
    return runc_problem() or tool_problem()


pytestmark = pytest.mark.skipif(
    _why_not() is not None, reason=f"CONTAINER EXECUTOR NOT TESTED: {_why_not()}"
)


@pytest.fixture(scope="session")
def image_ref() -> str:
    """The test image, built by the script users run (cached: quick after the first)."""
    done = subprocess.run(
        [str(ROOT / "deploy/image/sandbox-image.sh")],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(
            "CONTAINER EXECUTOR NOT TESTED: deploy/image/sandbox-image.sh failed:\n"
            + done.stderr[-2000:]
        )
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def store(image_ref: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageStore]:
    s = ImageStore(tmp_path_factory.mktemp("images"))
    s.get(image_ref)  # unpacked once for the whole session
    yield s
    shutil.rmtree(s.root, ignore_errors=True)


def leftovers(root: Path, cids: list[str]) -> list[str]:
    """Containers, mounts and cgroups of a runner at ``root`` still on the host."""
    found = []
    listed = subprocess.run(
        ["runc", "--root", str(root / "runc"), "list", "-q"], capture_output=True, text=True
    ).stdout.split()
    found += [f"container {c}" for c in listed]
    mounts = Path("/proc/self/mounts").read_text()
    found += [f"mount {line.split()[1]}" for line in mounts.splitlines() if str(root) in line]
    found += [f"cgroup {c}" for c in cids if _cgroup_procs(c).parent.exists()]
    return found


@pytest_asyncio.fixture
async def make(
    tmp_path: Path, image_ref: str, store: ImageStore
) -> AsyncIterator[type[ContainerRunner]]:
    """Makes runners (trusted unless told otherwise; small limits so tests are quick),
    and checks that each leaves nothing behind."""
    made: list[ContainerRunner] = []
    cids: list[str] = []

    def factory(**kw: object) -> ContainerRunner:
        opts: dict[str, object] = {
            "image": image_ref,
            "images": store,
            "limits": Limits(memory_mb=256, max_procs=64, max_file_mb=64),
            "tmp_mb": 32,
            "trusted": "fencing_key" not in kw,
        }
        opts.update(kw)
        root = opts.pop("root", tmp_path / "containers")
        r = ContainerRunner(root, "n0", **opts)  # type: ignore[arg-type]
        made.append(r)
        return r

    yield factory  # type: ignore[misc]
    for r in made:
        cids += [b.cid for b in r.boxes.values()]
        r.kill_all()
    for r in made:
        assert leftovers(r.root, cids) == []


async def run(r: ContainerRunner, traj: str, command: str | list[str], **kw: object):  # type: ignore[no-untyped-def]
    cores = kw.pop("cores", CORES[:1])
    return await r.run(traj, Command(command, timeout=kw.pop("timeout", 20.0), **kw), cores)  # type: ignore[arg-type]


# ---------------------------------------------------------------- lifecycle
async def test_files_persist_between_actions_until_the_trajectory_closes(make):
    r = make()
    res = await run(r, "t1", "echo kept > notes.txt; id -u; pwd; python3 -c 'print(1+1)'")
    assert res.ok, res.stderr
    assert res.stdout.split() == ["65534", "/work", "2"]
    assert res.extra["rootfs"] == "overlay"
    again = await run(r, "t1", ["cat", "notes.txt"], files={"sub/in.txt": "from files"})
    assert again.stdout == "kept\n"
    assert (await run(r, "t1", "cat sub/in.txt")).stdout == "from files"
    st = await r.status("t1")
    assert st["exists"] and st["state"] == "paused" and st["digest"].startswith("sha256:")
    assert st["created"] <= st["last_used"] <= time.time()
    assert r.trajectories() == ["t1"]
    assert r.close_trajectory("t1") and not r.close_trajectory("t1")
    assert r.trajectories() == [] and (await r.status("t1")) == {
        "trajectory": "t1",
        "exists": False,
    }
    fresh = await run(r, "t1", "cat notes.txt")
    assert fresh.exit_code != 0 and "No such file" in fresh.stderr


async def test_copy_rootfs_when_no_overlay(make):
    r = make(overlay=False)
    await run(r, "c", "echo x > f")
    res = await run(r, "c", "cat f; cat /etc/debian_version")
    assert res.ok and res.stdout.startswith("x\n") and res.extra["rootfs"] == "copy"


async def test_timeout_and_idle_containers(make):
    r = make(idle_timeout=0.3)
    t0 = time.monotonic()
    res = await run(r, "slow", "sleep 30", timeout=0.5)
    assert res.timed_out and not res.ok and time.monotonic() - t0 < 5
    assert (await run(r, "slow", "echo back")).stdout == "back\n"
    await asyncio.sleep(0.4)
    assert await r.close_idle() == ["slow"]
    assert r.trajectories() == []


async def test_concurrent_first_actions_share_one_container_and_a_dead_one_is_replaced(make):
    r = make()
    a, b = await asyncio.gather(run(r, "d", "echo 1 > one"), run(r, "d", "echo 2 > two"))
    assert a.ok and b.ok and r.trajectories() == ["d"]
    assert (await run(r, "d", "cat one two")).stdout == "1\n2\n"
    os.kill(r.boxes["d"].pid, 9)  # its init dies (from outside: inside, it cannot)
    await asyncio.sleep(0.2)
    with pytest.raises(SandboxError, match="has stopped"):
        await run(r, "d", "true")
    assert r.trajectories() == []
    assert (await run(r, "d", "ls")).ok  # a new container


# ---------------------------------------------------------------- confinement
@pytest.mark.skipif(len(CORES) < 2, reason="needs two cores to tell them apart")
async def test_commands_run_on_exactly_the_granted_cores_and_cannot_widen_them(make):
    r = make()
    widen = (
        "grep Cpus_allowed_list /proc/self/status; "
        "python3 -c 'import os\n"
        "try: os.sched_setaffinity(0, set(range(os.cpu_count())))\n"
        'except OSError as e: print("refused", e.errno)\n'
        "print(sorted(os.sched_getaffinity(0)))'; "
        "echo $OMP_NUM_THREADS $RAYON_NUM_THREADS $TANGRAM_DOP $TANGRAM_CORES"
    )
    for core in (CORES[-1], CORES[0]):  # the same container, leased different cores
        res = await run(r, "cpu", widen, cores=[core])
        lines = res.stdout.splitlines()
        assert lines[0].split() == ["Cpus_allowed_list:", str(core)], res.stdout
        assert lines[-2] == f"[{core}]", res.stdout
        assert lines[-1] == f"1 1 1 {core}"
    both = await run(r, "cpu", "grep Cpus_allowed_list /proc/self/status", cores=CORES[:2])
    assert both.stdout.split()[1] in (f"{CORES[0]}-{CORES[1]}", f"{CORES[0]},{CORES[1]}")


async def test_memory_of_several_processes_together_is_limited(make):
    r = make()  # 256 MB for the whole container
    hog = (
        "import subprocess, sys\n"
        "code = 'import time; b = b\"x\" * (110 << 20); time.sleep(1.5)'\n"
        "ps = [subprocess.Popen([sys.executable, '-c', code]) for _ in range(3)]\n"
        "print(sorted(p.wait() for p in ps))\n"
    )
    res = await run(r, "mem", ["python3", "-c", hog])
    codes = eval(res.stdout)  # e.g. [-9, 0, 0]
    assert -9 in codes, res
    assert (await run(r, "mem", "echo alive")).stdout == "alive\n"


async def test_tmp_is_a_bounded_tmpfs(make):
    r = make()  # tmp_mb=32
    res = await run(r, "tmp", "dd if=/dev/zero of=/tmp/big bs=1M count=64 2>&1; df -m /tmp")
    assert res.exit_code != 0 or "No space left" in res.stdout, res.stdout
    assert "No space left on device" in res.stdout
    assert "tmpfs" in res.stdout


async def test_a_fork_bomb_stops_at_the_pids_limit(make):
    r = make()  # max_procs=64
    count = (
        "import os, time\n"
        "n = 0\n"
        "try:\n"
        "    while True:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(30); os._exit(0)\n"
        "        n += 1\n"
        "except OSError as e:\n"
        "    print(n, e.errno)\n"
    )
    res = await run(r, "bomb", ["python3", "-c", count])
    n, err = res.stdout.split()
    assert int(n) < 64 and err == "11", res  # EAGAIN from the pids cgroup
    bomb = await run(r, "bomb", "b() { b | b & }; b; sleep 1; echo done", timeout=3.0)
    assert "Cannot fork" in bomb.stderr or bomb.timed_out, bomb  # stopped by the limit
    # Everything was killed and reaped: the next action has the whole limit again.
    assert (await run(r, "bomb", ["python3", "-c", count])).stdout.split()[0] == n


async def test_background_processes_do_not_run_between_actions(make):
    r = make()
    res = await run(r, "bg", "nohup sh -c 'while :; do :; done' >/dev/null 2>&1 & echo started")
    assert res.stdout == "started\n"
    box = r.boxes["bg"]
    procs = _cgroup_procs(box.cid).read_text().split()
    assert procs == [str(box.pid)]  # only init is left
    usage = Path(f"/sys/fs/cgroup/cpuacct/{box.cid}/cpuacct.usage")
    if usage.exists():
        before = int(usage.read_text())
        await asyncio.sleep(0.3)
        assert int(usage.read_text()) - before < 20_000_000  # < 20 ms of CPU in 300 ms
    assert (await r.status("bg"))["state"] == "paused"


@pytest_asyncio.fixture
async def listener() -> AsyncIterator[tuple[int, list[str]]]:
    seen: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(str(writer.get_extra_info("peername")))
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1], seen
    server.close()


async def test_no_network_but_its_own_loopback(make, listener):
    port, seen = listener
    r = make()
    probe = (
        "import socket\n"
        "try:\n"
        f"    socket.create_connection(('127.0.0.1', {port}), timeout=2); print('connected')\n"
        "except OSError as e: print('refused', e.errno)\n"
        "print(sorted(l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:]))\n"
    )
    res = await run(r, "net", ["python3", "-c", probe])
    assert res.stdout.splitlines() == [f"refused {111}", "['lo']"], res
    assert seen == []
    with contextlib.closing(socket.socket()) as s:  # the host's listener still works
        s.connect(("127.0.0.1", port))


async def test_one_trajectory_cannot_see_anothers_files_or_processes(make):
    r = make()
    await run(r, "a", "echo secret-a > /work/secret; echo tmp-a > /tmp/secret")
    res = await run(
        r,
        "b",
        "ls /work; cat /tmp/secret 2>&1; find / -xdev -name secret 2>/dev/null; "
        "ls /proc | grep -c '^[0-9]'",
    )
    assert "secret-a" not in res.stdout and "tmp-a" not in res.stdout
    assert "No such file" in res.stdout
    assert int(res.stdout.split()[-1]) <= 5  # its own few processes, not the host's
    assert (await r.download("a", "secret")) == b"secret-a\n"


# ---------------------------------------------------------------- transfer
async def test_upload_download_round_trip_and_links_are_refused(make, tmp_path: Path):
    r = make()
    await r.upload("u", "data/blob.bin", bytes(range(256)) * 100)
    await r.upload("u", "/tmp/in-tmpfs.txt", b"tmpfs")
    res = await run(
        r, "u", "wc -c < data/blob.bin; stat -c %u data/blob.bin; cat /tmp/in-tmpfs.txt"
    )
    assert res.stdout.split() == ["25600", "65534", "tmpfs"]
    assert await r.download("u", "/work/data/blob.bin") == bytes(range(256)) * 100
    outside = tmp_path / "host-secret"
    outside.write_text("host only")
    await run(
        r,
        "u",
        f"ln -s / escape; ln -s {outside} link; mkfifo fifo; echo made",
    )
    for path in ("escape/etc/hostname", "link", f"escape{outside}", "fifo"):
        with pytest.raises(SandboxError):
            await r.download("u", path)
    for path in ("escape/tmp/planted", "link"):
        with pytest.raises(SandboxError):
            await r.upload("u", path, b"x")
    assert outside.read_text() == "host only" and not Path("/tmp/planted").exists()
    for path in ("/proc/sys/kernel/hostname", "../etc/passwd", "/sys/x", ""):
        with pytest.raises(SandboxError):
            await r.upload("u", path, b"x")
    with pytest.raises(SandboxError, match="no container"):
        await r.download("nobody-here", "x")


# ---------------------------------------------------------------- crash, fencing, images
async def test_orphans_of_a_crashed_runner_are_removed_at_start(make, tmp_path: Path):
    crashed = make()
    await run(crashed, "o1", "echo x > f")
    await run(crashed, "o2", "true")
    cids = sorted(b.cid for b in crashed.boxes.values())
    for b in crashed.boxes.values():
        os.close(b.root_fd)
    crashed.boxes.clear()  # it "crashed": never closed anything
    assert len(leftovers(crashed.root, cids)) >= 4  # 2 containers, 2 mounts, cgroups
    fresh = make()
    assert fresh.orphans_removed == cids
    assert leftovers(fresh.root, cids) == []
    assert list((fresh.root / "bundles").iterdir()) == []


def grant(token: int, cores: tuple[int, ...]):  # type: ignore[no-untyped-def]
    alloc = {"cpu": Allocation(len(cores), "n0", cores)}
    return GrantSigner(KEY).sign(f"l{token}", token, alloc, time.time() + 60)


async def test_grants_are_fenced_before_anything_runs(make):
    r = make(fencing_key=KEY, pool="cpu")
    c = (CORES[0],)
    with pytest.raises(ForgedGrant):
        await r.run("f", Command("true"), c)
    with pytest.raises(GrantMismatch):
        await r.run("f", Command("true"), c, grant=grant(5, (CORES[-1] + 1,)))
    assert r.trajectories() == []  # refused calls created nothing
    assert (await r.run("f", Command("echo ok"), c, grant=grant(5, c))).stdout == "ok\n"
    assert (await r.run("f", Command("echo ok"), c, grant=grant(6, c))).ok
    with pytest.raises(StaleLease):
        await r.run("f", Command("echo late"), c, grant=grant(5, c))


def test_a_docker_save_tarball_is_unpacked_once_per_digest(tmp_path: Path) -> None:
    """The `docker save` path: a docker-archive (of a tiny image made here with umoci,
    written by skopeo as docker save writes it) is copied into the store and unpacked
    under its manifest digest, with the image's environment."""
    layout, bundle = tmp_path / "oci", tmp_path / "bundle"
    for argv in (
        ["umoci", "init", "--layout", str(layout)],
        ["umoci", "new", "--image", f"{layout}:t"],
        ["umoci", "unpack", "--image", f"{layout}:t", str(bundle)],
    ):
        subprocess.run(argv, check=True, capture_output=True, timeout=60)
    (bundle / "rootfs/hello.txt").write_text("hello")
    archive = tmp_path / "saved.tar"
    for argv in (
        ["umoci", "repack", "--image", f"{layout}:t", str(bundle)],
        ["umoci", "config", "--image", f"{layout}:t", "--config.env", "GREETING=hi"],
        ["skopeo", "copy", "--quiet", f"oci:{layout}:t", f"docker-archive:{archive}:x/y:t"],
    ):
        subprocess.run(argv, check=True, capture_output=True, timeout=60)
    store = ImageStore(tmp_path / "store")
    image = store.get(f"docker-archive:{archive}")
    assert image.digest.startswith("sha256:") and store.images() == [image.digest]
    assert (image.rootfs / "hello.txt").read_text() == "hello"
    assert "GREETING=hi" in image.env
    assert ImageStore(tmp_path / "store").get(f"docker-archive:{archive}") == image


def test_bad_image_references_and_missing_tools_are_clear(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    store = ImageStore(tmp_path / "s")
    for bad in ("ubuntu", "oci:", "http://example.com/x"):
        with pytest.raises(SandboxError, match="bad image reference"):
            store.get(bad)
    with pytest.raises(SandboxError, match=r"cannot copy image .*no such file"):
        store.get(f"oci:{tmp_path}/nothing:latest")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(SandboxError, match="skopeo and umoci are not installed"):
        store.get("docker-archive:/x.tar")
    with pytest.raises(SandboxError, match="runc is not installed"):
        ContainerRunner(tmp_path / "r", image="oci:/x:y", trusted=True)
