"""The Docker-engine backend of the container executor, against a mock client: no Docker
engine runs on the test machines (and the docker SDK is not a dependency), so these
tests check what the runner asks the engine for, in which order, not what an engine
does with it. The runc backend (tests/test_container.py) is the one tested for real."""

from __future__ import annotations

import io
import os
import tarfile
import time
from typing import Any

import pytest

from tangram.executors import ForgedGrant, GrantSigner
from tangram.executors.docker_engine import LABEL, DockerRunner
from tangram.executors.sandbox import Command, Limits, SandboxError
from tangram.spec import Allocation

CORES = sorted(os.sched_getaffinity(0))
KEY = bytes(range(32))


class FakeContainer:
    def __init__(self, engine: FakeEngine, cid: str, labels: dict[str, str]) -> None:
        self.engine, self.id, self.labels = engine, cid, labels
        self.status = "running"
        self.files: dict[str, bytes] = {}

    def pause(self) -> None:
        self.engine.calls.append(("pause", self.id))
        self.status = "paused"

    def unpause(self) -> None:
        self.engine.calls.append(("unpause", self.id))
        self.status = "running"

    def reload(self) -> None:
        pass

    def remove(self, force: bool = False) -> None:
        self.engine.calls.append(("remove", self.id))
        self.engine.containers.items.pop(self.id, None)

    def exec_run(self, argv: list[str], user: str = "") -> tuple[int, bytes]:
        self.engine.calls.append(("exec_run", argv, user))
        return 0, b""

    def put_archive(self, path: str, data: bytes) -> bool:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for m in tar.getmembers():
                f = tar.extractfile(m)
                assert f is not None and m.uid == 65534
                self.files[f"{path}/{m.name}"] = f.read()
        return True

    def get_archive(self, path: str) -> tuple[list[bytes], dict[str, Any]]:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            if path.endswith("link"):
                info = tarfile.TarInfo("link")
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/shadow"
                tar.addfile(info)
            else:
                data = self.files[path]
                info = tarfile.TarInfo(path.rsplit("/", 1)[1])
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return [buf.getvalue()], {}


class FakeContainers:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.items: dict[str, FakeContainer] = {}

    def run(self, image: str, command: list[str], **kw: Any) -> FakeContainer:
        self.engine.calls.append(("run", image, command, kw))
        c = FakeContainer(self.engine, kw["name"], kw["labels"])
        self.items[c.id] = c
        return c

    def list(self, all: bool = False, filters: dict[str, str] | None = None) -> list[Any]:
        key, value = (filters or {})["label"].split("=")
        return [c for c in self.items.values() if c.labels.get(key) == value]


class FakeApi:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.execs: dict[str, list[str]] = {}

    def update_container(self, cid: str, **kw: Any) -> None:
        self.engine.calls.append(("update", cid, kw))

    def exec_create(self, cid: str, argv: list[str], **kw: Any) -> dict[str, str]:
        self.engine.calls.append(("exec_create", argv, kw))
        eid = f"e{len(self.execs)}"
        self.execs[eid] = argv
        return {"Id": eid}

    def exec_start(self, eid: str, demux: bool = False) -> tuple[bytes, bytes]:
        argv = self.execs[eid]
        if "sleep" in argv[-1]:
            time.sleep(0.5)  # "runs" until the kill
        return b"out", b"err"

    def exec_inspect(self, eid: str) -> dict[str, int]:
        return {"ExitCode": 137 if "sleep" in self.execs[eid][-1] else 0}


class FakeEngine:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.containers = FakeContainers(self)
        self.api = FakeApi(self)


def test_no_docker_engine_here_is_a_clear_error():
    with pytest.raises(SandboxError, match=r"docker SDK|Docker engine"):
        DockerRunner("r", image="python:3.11", trusted=True)


async def test_an_action_updates_the_cpuset_unpauses_execs_kills_and_pauses():
    engine = FakeEngine()
    r = DockerRunner(
        "r", "n0", image="img", client=engine, limits=Limits(memory_mb=256), trusted=True
    )
    res = await r.run("t", Command("echo {dop}", files={"a.txt": "x"}), [CORES[-1]])
    assert (res.exit_code, res.stdout, res.stderr) == (0, "out", "err")
    kinds = [c[0] for c in engine.calls]
    assert kinds == ["run", "update", "exec_create", "exec_run", "pause"]
    _, image, command, kw = engine.calls[0]
    assert image == "img" and "sleep infinity" in command[-1]
    assert kw["user"] == "65534:65534" and kw["cap_drop"] == ["ALL"]
    assert kw["network_mode"] == "none" and kw["security_opt"] == ["no-new-privileges"]
    assert kw["mem_limit"] == 256 << 20 and kw["pids_limit"] == 256
    # Created with every core (a cpuset can never be unset again), then the grant's.
    assert kw["cpuset_cpus"] == ",".join(map(str, CORES))
    update = engine.calls[1][2]
    assert update["cpuset_cpus"] == str(CORES[-1]) and update["cpu_quota"] == 100_000
    argv, exec_kw = engine.calls[2][1:]
    assert argv == ["/bin/sh", "-c", "echo 1"]
    assert exec_kw["environment"]["OMP_NUM_THREADS"] == "1"
    assert exec_kw["environment"]["TANGRAM_CORES"] == str(CORES[-1])
    assert engine.calls[3][1:] == (["kill", "-9", "-1"], "65534:65534")
    container = engine.containers.items[res.extra["container"]]
    assert container.files == {"/work/a.txt": b"x"}
    # The next action unpauses; the container and its files stay.
    await r.run("t", Command("true"), [CORES[0]])
    assert [c[0] for c in engine.calls[5:]] == [
        "update",
        "unpause",
        "exec_create",
        "exec_run",
        "pause",
    ]
    assert (await r.status("t"))["state"] == "paused"
    assert r.close_trajectory("t") and engine.containers.items == {}


async def test_timeouts_transfers_orphans_and_fencing():
    engine = FakeEngine()
    r = DockerRunner("r", "n0", image="img", client=engine, trusted=True)
    res = await r.run("t", Command("sleep 9", timeout=0.1), CORES[:1])
    assert res.timed_out and res.exit_code == 137
    await r.upload("t", "d.bin", b"\x00\x01")
    assert await r.download("t", "d.bin") == b"\x00\x01"
    with pytest.raises(SandboxError, match="symbolic link"):
        await r.download("t", "link")
    # A runner of the same name finds the containers its predecessor left.
    again = DockerRunner("r", "n0", image="img", client=engine, trusted=True)
    assert len(again.orphans_removed) == 1 and engine.containers.items == {}
    assert all(LABEL in c[3]["labels"] for c in engine.calls if c[0] == "run")
    fenced = DockerRunner("f", "n0", image="img", client=engine, fencing_key=KEY)
    before = len(engine.calls)
    with pytest.raises(ForgedGrant):
        await fenced.run("t", Command("true"), CORES[:1])
    assert len(engine.calls) == before  # refused before the engine was asked anything
    alloc = {"cpu": Allocation(1, "n0", (CORES[0],))}
    grant = GrantSigner(KEY).sign("l1", 1, alloc, time.time() + 60)
    assert (await fenced.run("t", Command("true"), CORES[:1], grant=grant)).ok
