#!/usr/bin/env bash
# Build the Dockerfile and run the image, with no Docker engine and no image registry:
#
#  1. a Debian bookworm root with Python from Debian's packages (debootstrap) and the
#     host's CA bundle, cached under $CACHE and imported once with `podman import` as
#     $BASE_IMAGE;
#  2. `podman build --isolation=chroot --build-arg BASE=$BASE_IMAGE` of the Dockerfile
#     (pip fetches the dependencies from PyPI inside the build);
#  3. `tangram-entrypoint` run from the built image with `buildah run --isolation=chroot`
#     (`podman run` needs namespaces this sandbox refuses; chroot isolation shares the
#     host's network, so the server is reachable on 127.0.0.1), with
#     deploy/image/tangram.yaml mounted and the tokens in TANGRAM_TOKENS, as in compose;
#  4. from the host: GET /healthz, one lease (submit, then release) with the tenant's token,
#     401 without it, and the image's HEALTHCHECK command inside the container.
#
# Needs root and apt-get (installs podman, buildah, debootstrap when missing).
# Usage: deploy/image/test-image.sh   (or `make test-image`)
set -euo pipefail
cd "$(dirname "$0")/../.."

CACHE=${TANGRAM_IMAGE_CACHE:-/var/cache/tangram-image}
SUITE=${TANGRAM_IMAGE_SUITE:-bookworm}          # bookworm's python3 is 3.11
MIRROR=${TANGRAM_IMAGE_MIRROR:-http://deb.debian.org/debian}
BASE_IMAGE=localhost/tangram-base:$SUITE
IMAGE=${TANGRAM_IMAGE:-localhost/tangram:test}
PORT=${TANGRAM_TEST_PORT:-18765}
TOKEN=image-test-token-0123456789
t0=$(date +%s)
say() { echo "[test-image +$(( $(date +%s) - t0 ))s] $*"; }

if [ "$(id -u)" != 0 ]; then
    echo "test-image: needs root (debootstrap, podman with chroot isolation)" >&2
    exit 1
fi
missing=()
for tool in podman buildah debootstrap; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

# ---- 1. the base image ------------------------------------------------------------
mkdir -p "$CACHE"
if ! podman image exists "$BASE_IMAGE"; then
    # The debootstrap root as a tarball (deploy/image/base-rootfs.sh, shared with
    # sandbox-image.sh), made once and cached under $CACHE.
    tarball=$(TANGRAM_IMAGE_CACHE="$CACHE" TANGRAM_IMAGE_SUITE="$SUITE" \
        TANGRAM_IMAGE_MIRROR="$MIRROR" deploy/image/base-rootfs.sh)
    say "podman import $tarball as $BASE_IMAGE"
    podman import --change 'CMD ["python3"]' "$tarball" "$BASE_IMAGE" >/dev/null
fi

# ---- 2. the image -----------------------------------------------------------------
# docker format: the OCI format has no HEALTHCHECK and podman would drop it.
say "podman build $IMAGE (BASE=$BASE_IMAGE)"
previous=$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
podman build --isolation=chroot --format docker --build-arg "BASE=$BASE_IMAGE" \
    -t "$IMAGE" -f Dockerfile . > "$CACHE/build.log" 2>&1 \
    || { tail -40 "$CACHE/build.log" >&2; exit 1; }
# The image this tag named before, untagged by a rebuild: removed, so that runs do not
# pile up images of 700 MB (its cached layers stay for the next build).
current=$(podman image inspect --format '{{.Id}}' "$IMAGE")
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
    podman rmi "$previous" >/dev/null 2>&1 || true
fi
health=$(podman image inspect --format '{{json .Config.Healthcheck}}' "$IMAGE")
user=$(podman image inspect --format '{{.Config.User}}' "$IMAGE")
say "built: user $user, healthcheck $health"
case "$health" in *tangram-healthcheck*) ;; *) echo "test-image: no HEALTHCHECK" >&2; exit 1 ;; esac
[ "$user" = "10001:10001" ] || { echo "test-image: image runs as '$user'" >&2; exit 1; }

# ---- 3. run it ----------------------------------------------------------------------
ctr=$(buildah from "$IMAGE")
server=""
cleanup() {
    if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
    buildah rm "$ctr" >/dev/null 2>&1 || true
}
trap cleanup EXIT
say "buildah run tangram-entrypoint on port $PORT"
# As the image's user; the config directory read-only, as a mounted ConfigMap would be.
buildah run --isolation=chroot --user 10001:10001 \
    --env "TANGRAM_TOKENS=image-test $TOKEN" --env "TANGRAM_PORT=$PORT" \
    --env TANGRAM_LOG_LEVEL=info \
    -v "$PWD/deploy/image:/etc/tangram:ro" \
    "$ctr" -- /usr/local/bin/tangram-entrypoint > "$CACHE/serve.log" 2>&1 &
server=$!

# ---- 4. check it from the host --------------------------------------------------------
# The venv's python or the system one: only the standard library is used.
PYTHON=${PYTHON:-python3}
"$PYTHON" - "$PORT" "$TOKEN" <<'PY' || { echo "--- serve.log" >&2; cat "$CACHE/serve.log" >&2; exit 1; }
import json, sys, time, urllib.error, urllib.request

port, token = sys.argv[1], sys.argv[2]
base = f"http://127.0.0.1:{port}"

def call(method, path, body=None, auth=True):
    req = urllib.request.Request(base + path, method=method,
                                 data=None if body is None else json.dumps(body).encode())
    req.add_header("Content-Type", "application/json")
    if auth:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, None

deadline = time.monotonic() + 90
while True:
    try:
        status, _ = call("GET", "/healthz", auth=False)
        if status == 200:
            break
    except OSError:
        pass
    if time.monotonic() > deadline:
        sys.exit("test-image: /healthz did not answer within 90 s")
    time.sleep(0.5)
print("test-image: /healthz 200")
status, _ = call("GET", "/v1/pools", auth=False)
assert status == 401, f"/v1/pools without a token: {status}"
status, action = call("POST", "/v1/actions?wait=10",
                      {"trajectory": "image-test", "demands": {"cpu": 2}})
assert status == 200 and action["state"] == "granted", (status, action)
lease = action["lease"]
print(f"test-image: lease {lease['id']} granted: {lease['allocation']}")
status, _ = call("POST", f"/v1/leases/{lease['id']}/release", {"outcome": "ok"})
assert status == 200, f"release: {status}"
status, pools = call("GET", "/v1/pools")
assert status == 200, status
print("test-image: released; pools:", sorted(pools["pools"]))
PY
# The server wrote serve.json and its journal to the data volume. buildah gives the
# image's VOLUME an anonymous volume of its own (shared by the container's runs, and
# shadowing a -v at the same path), so look from inside.
in_volume=$(buildah run --isolation=chroot --user 10001:10001 "$ctr" -- ls /var/lib/tangram)
say "data volume: $(echo $in_volume)"
case "$in_volume" in
    *serve.json*journal*|*journal*serve.json*) ;;
    *) echo "test-image: no serve.json and journal in /var/lib/tangram" >&2; exit 1 ;;
esac
buildah run --isolation=chroot --user 10001:10001 --env "TANGRAM_PORT=$PORT" "$ctr" -- \
    python3 /usr/local/bin/tangram-healthcheck
say "HEALTHCHECK command passed inside the container"
# The sandbox executors' isolation (deploy/kuberay) needs bubblewrap in the image.
buildah run --isolation=chroot --user 10001:10001 "$ctr" -- bwrap --version
kill -0 "$server" || { echo "test-image: the server stopped" >&2; exit 1; }
say "OK"
