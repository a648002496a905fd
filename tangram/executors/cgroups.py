"""Hard confinement of sandboxed commands: one control group per action.

``sched_setaffinity`` and resource limits are advice the sandboxed code can undo or
sidestep: it can widen its own affinity, and a per-process address-space limit lets
four processes use four times the memory. A cgroup cannot be undone from inside it:
its ``cpuset`` confines every process in it to the granted cores whatever they ask for,
its memory limit covers all of them together (a tmpfs they fill too: its pages are
charged to the group that wrote them), its pids limit stops a fork bomb, and freezing
it then killing what it lists leaves nothing running after the action, not even a
process that left the process group or the session.

Both layouts are handled. cgroup v1 (separate hierarchies per controller, also the
"hybrid" layout) and v2 (one unified hierarchy). Groups are made below the executor's
own cgroup (``/proc/self/cgroup``), so limits set on the executor bound its sandboxes
too, under ``tangram/<owner>/``: ``owner`` names one runner, and groups left there by a
crashed runner of that name are orphans that the next one removes at start.

Nothing here imports beyond the standard library; the launcher (launcher.py) joins a
group by writing its own pid into the files ``Group.join_files`` lists, before it
starts anything, so every process of the action is born inside.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

V1_CONTROLLERS = ("cpuset", "memory", "pids", "freezer")
V2_CONTROLLERS = ("cpuset", "memory", "pids")
SETTLE = 5.0  # seconds a killed group's processes get to disappear


class CgroupError(OSError):
    """A control group could not be made, limited or emptied; the message says why."""


@dataclass(frozen=True, slots=True)
class Confinement:
    """What one action's group enforces. ``mems`` are the memory (NUMA) nodes; ``None``
    takes the parent's. ``memory`` is bytes for every process and tmpfs page of the
    group together; ``pids`` the most processes and threads alive at once."""

    cpus: tuple[int, ...]
    mems: tuple[int, ...] | None = None
    memory: int | None = None
    pids: int | None = None


def cpulist(ids: Iterable[int]) -> str:
    """``0,2,3`` in the kernel's list syntax (a plain comma list is valid input)."""
    return ",".join(str(i) for i in sorted(set(ids)))


def parse_cpulist(text: str) -> tuple[int, ...]:
    """The ids of a kernel list such as ``0-3,8,10-11``."""
    out: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(out)


def numa_nodes(cpus: Iterable[int], sysfs: str = "/sys/devices/system/node") -> tuple[int, ...]:
    """The NUMA nodes the cores belong to (their memory is the near one); empty when
    the machine does not say (then the parent's nodes are kept)."""
    want = set(cpus)
    found: set[int] = set()
    with contextlib.suppress(OSError):
        for entry in os.scandir(sysfs):
            name = entry.name
            if not (name.startswith("node") and name[4:].isdigit()):
                continue
            with contextlib.suppress(OSError):
                if want & set(parse_cpulist(Path(entry.path, "cpulist").read_text())):
                    found.add(int(name[4:]))
    return tuple(sorted(found))


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise CgroupError(exc.errno, f"cannot write {value!r} to {path}: {exc.strerror}") from exc


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise CgroupError(exc.errno, f"cannot read {path}: {exc.strerror}") from exc


class Group:
    """One action's control group (in every controller's hierarchy under v1)."""

    def __init__(self, hierarchy: Hierarchy, name: str, dirs: dict[str, Path]) -> None:
        self.hierarchy = hierarchy
        self.name = name
        self.dirs = dirs  # controller (or "" under v2) -> the group's directory

    @property
    def join_files(self) -> list[str]:
        """The files a process writes its pid to, to join the group everywhere."""
        return [str(d / "cgroup.procs") for d in _unique(self.dirs.values())]

    def pids(self) -> list[int]:
        out: set[int] = set()
        for d in _unique(self.dirs.values()):
            with contextlib.suppress(FileNotFoundError):
                out.update(int(p) for p in (d / "cgroup.procs").read_text().split())
        return sorted(out)

    def freeze(self) -> None:
        self.hierarchy.freeze(self, True)

    def thaw(self) -> None:
        self.hierarchy.freeze(self, False)

    def kill(self) -> None:
        """Kill every process of the group and wait until it is empty. Frozen first, so
        that nothing forks while the list is read."""
        self.hierarchy.kill(self)

    def oom_kills(self) -> int:
        """Processes the kernel killed because the group was out of memory."""
        return self.hierarchy.oom_kills(self)

    def memory_peak(self) -> int | None:
        """The most memory the group used at once, in bytes, where the kernel says."""
        return self.hierarchy.memory_peak(self)

    def remove(self) -> None:
        """Kill what is left and remove the group's directories."""
        self.kill()
        for d in self.dirs.values():
            _rmdir(d)


class Hierarchy:
    """Where and how this executor makes groups (v1 or v2); see ``open_hierarchy``."""

    version: int

    def __init__(self, owner: str) -> None:
        self.owner = owner

    def create(self, name: str, limits: Confinement) -> Group:
        """Make and limit the group ``name``. The owner's directory is made again if it
        is gone (another runner's start removes owner directories it finds empty)."""
        try:
            return self._create(name, limits)
        except CgroupError as exc:
            if exc.errno != errno.ENOENT:
                raise
        self.prepare()
        return self._create(name, limits)

    def prepare(self) -> None:
        raise NotImplementedError

    def _create(self, name: str, limits: Confinement) -> Group:
        raise NotImplementedError

    def owner_dirs(self) -> list[Path]:
        """The directories of every owner (one per controller under v1)."""
        raise NotImplementedError

    def remove_empty_owners(self) -> int:
        """Remove the directories of other owners that hold no group (each runner's
        root makes one; without this they would pile up until the machine restarts).
        The kernel refuses to remove a directory that still has groups."""
        removed = 0
        for base in self.owner_dirs():
            with contextlib.suppress(FileNotFoundError):
                for entry in os.scandir(base.parent):
                    if entry.is_dir() and entry.name != self.owner:
                        try:
                            os.rmdir(entry.path)
                            removed += 1
                        except OSError:
                            pass  # has groups (a live runner's, or an orphan's)
        return removed

    def children(self) -> list[str]:
        """Names of the groups under this owner (orphans, when a runner starts)."""
        raise NotImplementedError

    def group(self, name: str) -> Group:
        raise NotImplementedError

    def freeze(self, group: Group, frozen: bool) -> None:
        raise NotImplementedError

    def kill(self, group: Group) -> None:
        raise NotImplementedError

    def oom_kills(self, group: Group) -> int:
        raise NotImplementedError

    def memory_peak(self, group: Group) -> int | None:
        raise NotImplementedError

    def remove_orphans(self) -> list[str]:
        """Kill and remove every group under this owner; their names."""
        names = self.children()
        for name in names:
            self.group(name).remove()
        return names


class V1(Hierarchy):
    """cgroup v1: one directory per controller (``cpuset``, ``memory``, ``pids``,
    ``freezer``), each below the executor's own group in that hierarchy."""

    version = 1

    def __init__(self, owner: str, bases: dict[str, Path]) -> None:
        super().__init__(owner)
        self.bases = bases  # controller -> <its mount>/<own path>/tangram/<owner>

    def group(self, name: str) -> Group:
        return Group(self, name, {c: base / name for c, base in self.bases.items()})

    def children(self) -> list[str]:
        names: set[str] = set()
        for base in self.bases.values():
            with contextlib.suppress(FileNotFoundError):
                names.update(e.name for e in os.scandir(base) if e.is_dir())
        return sorted(names)

    def prepare(self) -> None:
        """Make the owner's directories; a cpuset level is usable only once its cores
        and memory nodes are set, so each new one copies its parent's."""
        for controller, base in self.bases.items():
            for level in _new_levels(base):
                _mkdir(level)
                if controller == "cpuset":
                    _inherit_cpuset(level)

    def owner_dirs(self) -> list[Path]:
        return list(self.bases.values())

    def _create(self, name: str, limits: Confinement) -> Group:
        group = self.group(name)
        try:
            for d in group.dirs.values():
                _mkdir(d)
            cpuset = group.dirs["cpuset"]
            _write(cpuset / "cpuset.cpus", cpulist(limits.cpus))
            mems = limits.mems or parse_cpulist(_read(cpuset.parent / "cpuset.mems"))
            _write(cpuset / "cpuset.mems", cpulist(mems))
            memory = group.dirs["memory"]
            if limits.memory is not None:
                _write(memory / "memory.limit_in_bytes", str(limits.memory))
                # With swap accounting, memory+swap too: else the excess goes to swap.
                memsw = memory / "memory.memsw.limit_in_bytes"
                if memsw.exists():
                    _write(memsw, str(limits.memory))
            if limits.pids is not None:
                _write(group.dirs["pids"] / "pids.max", str(limits.pids))
        except BaseException:
            for d in group.dirs.values():
                _rmdir(d)
            raise
        return group

    def freeze(self, group: Group, frozen: bool) -> None:
        state = group.dirs["freezer"] / "freezer.state"
        want = "FROZEN" if frozen else "THAWED"
        _write(state, want)
        deadline = time.monotonic() + SETTLE
        while _read(state).strip() != want:  # FREEZING while tasks are being stopped
            if time.monotonic() > deadline:
                raise CgroupError(errno.ETIMEDOUT, f"{state} did not become {want}")
            time.sleep(0.001)

    def kill(self, group: Group) -> None:
        if group.dirs["freezer"].exists():
            _freeze_and_kill(group)

    def oom_kills(self, group: Group) -> int:
        return _counter(group.dirs["memory"] / "memory.oom_control", "oom_kill")

    def memory_peak(self, group: Group) -> int | None:
        with contextlib.suppress(FileNotFoundError, ValueError):
            return int((group.dirs["memory"] / "memory.max_usage_in_bytes").read_text())
        return None


class V2(Hierarchy):
    """cgroup v2: one directory per group, the controllers enabled level by level in
    ``cgroup.subtree_control``."""

    version = 2

    def __init__(self, owner: str, base: Path) -> None:
        super().__init__(owner)
        self.base = base  # <mount>/<own path>/tangram/<owner>

    def group(self, name: str) -> Group:
        return Group(self, name, {"": self.base / name})

    def children(self) -> list[str]:
        with contextlib.suppress(FileNotFoundError):
            return sorted(e.name for e in os.scandir(self.base) if e.is_dir())
        return []

    def prepare(self) -> None:
        """Make the owner's directory and enable the controllers down to it. The
        executor's own group must delegate them: v2 forbids enabling controllers for
        the children of a group that has processes of its own, unless it is the root
        (run the executor in a leaf of a delegated subtree, e.g. systemd's
        ``Delegate=yes``, or as a container's init)."""
        own = self.base.parent.parent
        enable = " ".join("+" + c for c in V2_CONTROLLERS)
        try:
            for level in (own, own / "tangram", self.base):
                _mkdir(level)
                _write(level / "cgroup.subtree_control", enable)
        except CgroupError as exc:
            if exc.errno == errno.EBUSY:
                raise CgroupError(
                    exc.errno,
                    f"cgroup v2: cannot enable {enable} below {own}: it has processes "
                    "of its own (v2 allows controllers only for groups without them); "
                    "run the executor in a delegated subtree's leaf",
                ) from exc
            raise

    def owner_dirs(self) -> list[Path]:
        return [self.base]

    def _create(self, name: str, limits: Confinement) -> Group:
        group = self.group(name)
        d = group.dirs[""]
        _mkdir(d)
        try:
            _write(d / "cpuset.cpus", cpulist(limits.cpus))
            if limits.mems:
                _write(d / "cpuset.mems", cpulist(limits.mems))
            if limits.memory is not None:
                _write(d / "memory.max", str(limits.memory))
                if (d / "memory.swap.max").exists():
                    _write(d / "memory.swap.max", "0")
            if limits.pids is not None:
                _write(d / "pids.max", str(limits.pids))
        except BaseException:
            _rmdir(d)
            raise
        return group

    def freeze(self, group: Group, frozen: bool) -> None:
        d = group.dirs[""]
        _write(d / "cgroup.freeze", "1" if frozen else "0")
        deadline = time.monotonic() + SETTLE
        want = f"frozen {int(frozen)}"
        while want not in _read(d / "cgroup.events").splitlines():
            if time.monotonic() > deadline:
                raise CgroupError(errno.ETIMEDOUT, f"{d} did not become {want}")
            time.sleep(0.001)

    def kill(self, group: Group) -> None:
        d = group.dirs[""]
        if not d.exists():
            return
        if (d / "cgroup.kill").exists():  # Linux 5.14: the kernel kills the whole group
            _write(d / "cgroup.kill", "1")
            _wait_empty(group)
        else:
            _freeze_and_kill(group)

    def oom_kills(self, group: Group) -> int:
        return _counter(group.dirs[""] / "memory.events", "oom_kill")

    def memory_peak(self, group: Group) -> int | None:
        with contextlib.suppress(FileNotFoundError, ValueError):
            return int((group.dirs[""] / "memory.peak").read_text())  # Linux 5.19
        return None


def open_hierarchy(
    owner: str, *, proc_self: str = "/proc/self", mounts: str = "/proc/self/mountinfo"
) -> Hierarchy:
    """The hierarchy this process can confine sandboxes in, prepared for ``owner``.

    Raises ``CgroupError`` saying what is missing (no cgroup file system, a controller
    not mounted, no write access: confinement needs root or a delegated subtree).
    ``proc_self`` and ``mounts`` are for tests of the layout logic only."""
    if not owner or "/" in owner or owner in (".", ".."):
        raise ValueError(f"owner must be one path component, got {owner!r}")
    points = _mount_points(mounts)
    own = _own_paths(Path(proc_self, "cgroup"))
    if "cgroup2" in points and not any(c in points for c in V1_CONTROLLERS):
        base = Path(points["cgroup2"], own.get("", "/").lstrip("/"), "tangram", owner)
        v2 = V2(owner, base)
        v2.prepare()
        return v2
    missing = [c for c in V1_CONTROLLERS if c not in points]
    if missing:
        raise CgroupError(
            errno.ENOENT,
            f"cgroup v1 controllers {missing} are not mounted (found {sorted(points)}); "
            "the sandbox needs cpuset, memory, pids and freezer",
        )
    bases = {
        c: Path(points[c], own.get(c, "/").lstrip("/"), "tangram", owner) for c in V1_CONTROLLERS
    }
    v1 = V1(owner, bases)
    v1.prepare()
    return v1


def _mount_points(mountinfo: str) -> dict[str, str]:
    """controller -> its v1 mount point, and "cgroup2" -> the unified mount point."""
    out: dict[str, str] = {}
    with contextlib.suppress(FileNotFoundError):
        for line in Path(mountinfo).read_text().splitlines():
            # ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [TAGS...] - FSTYPE SOURCE SUPER
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(fields) < 5 or len(tail) < 3:
                continue
            point, fstype = fields[4], tail[0]
            if fstype == "cgroup2":
                out.setdefault("cgroup2", point)
            elif fstype == "cgroup":
                for opt in tail[2].split(","):
                    if opt in V1_CONTROLLERS:
                        out.setdefault(opt, point)
    return out


def _own_paths(cgroup_file: Path) -> dict[str, str]:
    """controller -> this process's group in it ("" for the v2 hierarchy)."""
    out: dict[str, str] = {}
    with contextlib.suppress(FileNotFoundError):
        for line in cgroup_file.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                out[c] = path
    return out


def _new_levels(base: Path) -> list[Path]:
    """``base`` and the missing directories above it that lead to it, top first."""
    levels = []
    p = base
    while not p.exists():
        levels.append(p)
        p = p.parent
    return list(reversed(levels))


def _inherit_cpuset(level: Path) -> None:
    for name in ("cpuset.cpus", "cpuset.mems"):
        if not _read(level / name).strip():
            _write(level / name, _read(level.parent / name).strip())


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(exist_ok=True)
    except OSError as exc:
        raise CgroupError(exc.errno, f"cannot create control group {path}: {exc.strerror}") from exc


def _rmdir(path: Path) -> None:
    """Remove an emptied group; the kernel may take a moment to let go of it."""
    deadline = time.monotonic() + SETTLE
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise CgroupError(exc.errno, f"cannot remove {path}: {exc.strerror}") from exc
            time.sleep(0.005)


def _freeze_and_kill(group: Group) -> None:
    """Kill every process of a group without a kernel kill switch: frozen first, so that
    nothing forks while the list is read; a frozen process dies of SIGKILL only once
    thawed."""
    group.freeze()
    for pid in group.pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    group.thaw()
    _wait_empty(group)


def _counter(path: Path, key: str) -> int:
    """The value of ``key`` in a ``key value`` per line file; 0 when absent."""
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    return 0


def _wait_empty(group: Group) -> None:
    deadline = time.monotonic() + SETTLE
    while group.pids():
        if time.monotonic() > deadline:
            raise CgroupError(errno.EBUSY, f"group {group.name} still has {group.pids()}")
        time.sleep(0.002)


def _unique(paths: Iterable[Path]) -> Sequence[Path]:
    return list(dict.fromkeys(paths))
