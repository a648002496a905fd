"""The soak benchmark's own checks (over-grants, leaks) on a short run; its figures
belong in docs/benchmarks.md, not in a test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_soak.py"


def test_a_short_soak_has_no_over_grants_or_leaks_journal_on_and_off() -> None:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--units", "8", "--clients", "80", "--cycles", "4000",
         "--max-growth-mb", "256"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["ok"]
    assert [r["journal"] for r in figures["runs"]] == [False, True]
    for r in figures["runs"]:
        assert r["over_grants"] == 0 and r["leaked_units"] == 0 and r["cycles"] == 4000
    assert figures["runs"][1]["journal_commits"] > 0
