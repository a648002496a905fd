"""The discrete-event loop: trajectories, steps and virtual time around an executor.

The ``Runner`` owns virtual time and the workload's shape: trajectories of one step
start together, each runs its actions one after another separated by generation gaps,
and the next step starts when the last trajectory of the previous one ends. Who decides
when an action runs and how long it takes is the executor's business: ``CoreExecutor``
(tangram/sim/executor.py) drives the real ``tangram.core.state.Core``; the baselines in
tangram/sim/baselines/ model what the paper compares against.

Events at the same virtual time are all processed before the executor ``settle``s once
(one scheduling round per instant, as the live broker coalesces a burst of changes).
This module never models scheduling itself.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from tangram.sim.trace import ActionSpec, TrajectorySpec


@dataclass(slots=True)
class ActionRun:
    """One action's life in a simulation: filled in by the runner and the executor."""

    traj: int  # index into Runner.trajs
    index: int  # position in its trajectory
    spec: ActionSpec
    step: int
    submitted: float = 0.0
    started: float = -1.0  # when its units were granted (or its pod ran it)
    ended: float = -1.0
    exec_s: float = 0.0  # execution time (on the granted units, or slowed by contention)
    # time paid before execution that is not queueing (a GPU restore, a pod exec), in
    # virtual seconds; "overhead" is only ever the scheduling round's own time
    setup_s: float = 0.0
    sched_s: float = 0.0  # wall time of the scheduling round that granted it (measured)
    units: int = 0  # amount granted on the key pool (its parallelism)
    failed: bool = False
    retries: int = 0
    handle: Any = None  # executor-private (a lease id, a pod job)


class SimulationStuck(RuntimeError):
    """No event is left but actions are still waiting: the executor will never grant them."""


class Executor(Protocol):
    def bind(self, runner: Runner) -> None: ...
    def start_trajectory(self, traj: int, now: float) -> None: ...
    def submit(self, run: ActionRun, now: float) -> None: ...
    def settle(self, now: float) -> None: ...
    def end_trajectory(self, traj: int, now: float) -> None: ...
    def result(self, now: float) -> dict[str, Any]: ...
    def stuck_report(self) -> str: ...


@dataclass(slots=True)
class _TrajState:
    spec: TrajectorySpec
    next_index: int = 0
    voided: bool = False


@dataclass
class Runner:
    trajs: list[TrajectorySpec]
    executor: Executor
    progress: Callable[[int], None] | None = None  # called with actions finished so far
    now: float = 0.0
    runs: list[ActionRun] = field(default_factory=list)
    step_ends: list[float] = field(default_factory=list)
    step_starts: list[float] = field(default_factory=list)
    voided: int = 0

    def __post_init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[Any], None], Any]] = []
        self._seq = 0
        self._state = [_TrajState(t) for t in self.trajs]
        steps = sorted({t.step for t in self.trajs})
        self._steps = [[i for i, t in enumerate(self.trajs) if t.step == s] for s in steps]
        self._step_left = 0
        self._step_no = -1
        self._finished = 0

    # ---- the event heap -------------------------------------------------------------
    def at(self, t: float, fn: Callable[[Any], None], arg: Any = None) -> None:
        """Call ``fn(arg)`` at virtual time ``t`` (never earlier than now)."""
        self._seq += 1
        heapq.heappush(self._heap, (max(t, self.now), self._seq, fn, arg))

    def run(self) -> None:
        self.executor.bind(self)
        self._next_step(0.0)
        heap = self._heap
        while heap:
            t = heap[0][0]
            self.now = t
            while heap and heap[0][0] <= t:
                _, _, fn, arg = heapq.heappop(heap)
                fn(arg)
            self.executor.settle(t)
        waiting = [r for r in self.runs if r.ended < 0]
        if waiting:
            raise SimulationStuck(
                f"simulation stuck at t={self.now:.3f}: {len(waiting)} submitted actions can "
                f"never run (step {self._step_no}); {self.executor.stuck_report()}"
            )

    # ---- steps and trajectories -----------------------------------------------------
    def _next_step(self, now: float) -> None:
        self._step_no += 1
        if self._step_no >= len(self._steps):
            return
        members = self._steps[self._step_no]
        self.step_starts.append(now)
        self._step_left = len(members)
        for i in members:
            self.executor.start_trajectory(i, now)
            self._advance(i, now)
        if not members:
            self._end_step(now)

    def _end_step(self, now: float) -> None:
        self.step_ends.append(now)
        self._next_step(now)

    def _advance(self, traj: int, now: float) -> None:
        st = self._state[traj]
        if st.voided or st.next_index >= len(st.spec.actions):
            self.executor.end_trajectory(traj, now)
            self._step_left -= 1
            if self._step_left == 0:
                self._end_step(now)
            return
        spec = st.spec.actions[st.next_index]
        run = ActionRun(traj, st.next_index, spec, st.spec.step)
        st.next_index += 1
        self.runs.append(run)
        self.at(now + spec.gap, self._submit, run)

    def _submit(self, run: ActionRun) -> None:
        run.submitted = self.now
        self.executor.submit(run, self.now)

    def finish(self, run: ActionRun, now: float) -> None:
        """The executor reports an action's end (at ``now``, the current virtual time)."""
        run.ended = now
        if run.failed:
            # A failed call voids its trajectory (paper: failed calls can void trajectories).
            st = self._state[run.traj]
            if not st.voided:
                st.voided = True
                self.voided += 1
        self._finished += 1
        if self.progress is not None and self._finished % 512 == 0:
            self.progress(self._finished)
        self._advance(run.traj, now)
