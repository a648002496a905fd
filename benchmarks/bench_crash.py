"""The crash benchmark: ``tangram serve --data-dir`` SIGKILLed at least fifty times while
lease loops run, every grant recorded on the client side (see crashload.py).

The last line is JSON: ``kills``, ``grants``, ``double_held``, ``ids_reused``,
``token_regressions``, ``leaked_units`` (all four must be 0) and the run's seconds.
Exits 1 if any of them is not 0.

    python benchmarks/bench_crash.py [--kills 50] [--clients 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import crashload


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--durability", choices=["normal", "full"], default="normal")
    args = ap.parse_args()
    if args.kills < 1 or args.clients < 1:
        ap.error("--kills and --clients must be at least 1")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        out = crashload.run(
            Path(tmp),
            kills=args.kills,
            clients=args.clients,
            extra=("--durability", args.durability),
        )
    out["seconds"] = round(time.monotonic() - t0, 1)
    out["durability"] = args.durability
    bad = [k for k in ("double_held", "ids_reused", "token_regressions", "leaked_units",
                       "held_leases_lost") if out[k]]  # fmt: skip
    print(json.dumps(out))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
