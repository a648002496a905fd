"""Refactoring must not change what the scheduler decides: a few small simulations give
exactly the figures recorded in benchmarks/golden/small.json (wall times aside).

A change that means to change the schedule records the file again, and says so:
``python benchmarks/sim_golden.py record benchmarks/golden --set small``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_small_simulations_match_the_recorded_figures() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sim_golden.py"), "compare",
         str(ROOT / "benchmarks" / "golden"), "--set", "small"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert '"differences": 0' in done.stdout
