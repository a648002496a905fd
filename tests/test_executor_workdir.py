"""A trajectory's sandbox working directory: one safe path component, distinct for
distinct trajectory ids (two trajectories must never share files)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from tangram.executors import Command, SandboxRunner
from tangram.executors.sandbox import MAX_NAME, dirname, trajectory_of

CORES = sorted(os.sched_getaffinity(0))
SAFE = re.compile(r"[A-Za-z0-9_.~-]+")

# Every code point, lone surrogates included: any str is a valid trajectory id here.
ids = st.text(st.characters(codec=None, exclude_categories=()), min_size=1, max_size=120)
long_ids = st.text(st.sampled_from("a/.-é"), min_size=1, max_size=400)


def _safe_component(name: str) -> None:
    assert SAFE.fullmatch(name), name
    assert name not in (".", "..") and "/" not in name and "\0" not in name
    assert len(name.encode()) <= 255


@settings(max_examples=500)
@given(st.lists(st.one_of(ids, long_ids), min_size=2, max_size=8, unique=True))
def test_distinct_ids_get_distinct_safe_names(trajectories: list[str]):
    names = [dirname(t) for t in trajectories]
    assert len(set(names)) == len(names)
    for t, name in zip(trajectories, names, strict=True):
        _safe_component(name)
        if not name.startswith("~"):
            assert trajectory_of(name) == t  # readable back, so listing shows the ids


def test_ids_that_used_to_share_a_directory():
    # The old scheme kept "x612f62" as it was and wrote "a/b" as "x" + hex("a/b").
    assert dirname("a/b") != dirname("x612f62")
    assert dirname("x612f62") == "x612f62" and dirname("a/b") == "a.2fb"
    assert dirname(".") == ".2e" and dirname("..") == ".2e.2e"
    assert dirname("traj.1") == "traj.2e1" and trajectory_of("traj.2e1") == "traj.1"
    assert dirname("\ud800") != dirname("\ufffd")  # a lone surrogate is not its replacement
    long_a, long_b = "a" * (MAX_NAME + 1), "a" * (MAX_NAME + 2)
    assert dirname("a" * MAX_NAME) == "a" * MAX_NAME
    assert dirname(long_a).startswith("~") and dirname(long_a) != dirname(long_b)
    assert trajectory_of(dirname(long_a)) == dirname(long_a)


async def test_such_ids_get_separate_working_directories(tmp_path: Path):
    runner = SandboxRunner(tmp_path / "sb", isolate=False, trusted=True)
    trajectories = ["a/b", "x612f62", "..", "../../etc", "é", "a" * 300]
    for t in trajectories:
        res = await runner.run(
            t, Command(["sh", "-c", 'echo "$TANGRAM_TRAJECTORY" > id.txt']), CORES[:1]
        )
        assert res.ok and Path(res.workdir).parent == runner.root
    for t in trajectories:
        assert (runner.workdir(t) / "id.txt").read_text() == t + "\n"
    assert len({runner.workdir(t) for t in trajectories}) == len(trajectories)
    listed = runner.trajectories()
    assert set(trajectories) - {"a" * 300} <= set(listed) and len(listed) == len(trajectories)
    assert runner.close_trajectory("a/b") and (runner.workdir("x612f62") / "id.txt").exists()
