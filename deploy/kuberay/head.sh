#!/bin/bash
# Command of the Ray head container (raycluster.yaml sets ray.io/overwrite-container-cmd,
# so KubeRay hands us its `ray start` command in KUBERAY_GEN_RAY_START_CMD instead of
# running it itself): start Ray, then the Tangram broker and its HTTP API, then watch both.
set -uo pipefail
ulimit -n 65536 2>/dev/null || true

# Without --block, `ray start` returns once the head's processes run; this script stays
# in the foreground instead, so it can restart the HTTP API.
start_cmd=${KUBERAY_GEN_RAY_START_CMD:?KubeRay did not set KUBERAY_GEN_RAY_START_CMD}
eval "${start_cmd//--block/}" || exit 1

until python3 /opt/tangram-kuberay/start_broker.py; do
    echo "head.sh: broker start failed; retrying in 10 s" >&2
    sleep 10
done

# Ray restarts a dead broker actor (max_restarts=-1) but the restarted actor does not
# serve HTTP until asked: start_broker.py reuses the running broker and serves it again.
while ray health-check >/dev/null 2>&1; do
    sleep 15
    if ! python3 /usr/local/bin/tangram-healthcheck 2>/dev/null; then
        echo "head.sh: lease API down; starting it again" >&2
        python3 /opt/tangram-kuberay/start_broker.py || true
    fi
done
echo "head.sh: Ray on this head is down; exiting so that Kubernetes restarts the pod" >&2
exit 1
