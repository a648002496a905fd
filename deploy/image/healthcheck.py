"""HEALTHCHECK of the Tangram image: exit 0 when GET /healthz answers 200.

Python's standard library rather than curl, which the slim base images do not have.
"""

import os
import sys
import urllib.request

port = os.environ.get("TANGRAM_PORT", "8000")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=4) as r:
        sys.exit(0 if r.status == 200 else 1)
except OSError as exc:
    print(f"tangram healthcheck: {exc}", file=sys.stderr)
    sys.exit(1)
