#!/bin/sh
# Entrypoint of the Tangram image: `tangram serve` on all interfaces, with the mounted
# configuration and the lease journal in the data volume.
#
# Tenants come from the configuration (server.tenants or server.tokens_file). For
# platforms that hand secrets over as environment variables, TANGRAM_TOKENS (lines or
# ';'-separated entries of "TENANT TOKEN [MAX_QUEUED]") is written to
# $TANGRAM_TOKENS_FILE (default /run/tangram/tokens.txt), which the configuration then
# names as its tokens_file (deploy/image/tangram.yaml does). Extra arguments go to
# `tangram serve` (click keeps the last value of a repeated option, so `--port 9000`
# overrides the default).
set -eu

config="${TANGRAM_CONFIG:-/etc/tangram/tangram.yaml}"
if [ ! -r "$config" ]; then
    echo "tangram-entrypoint: no configuration at $config: mount one (with tenants) there," \
         "or set TANGRAM_CONFIG; see deploy/README.md" >&2
    exit 2
fi

if [ -n "${TANGRAM_TOKENS:-}" ]; then
    tokens_file="${TANGRAM_TOKENS_FILE:-/run/tangram/tokens.txt}"
    # Readable by this user only: the file holds bearer tokens.
    umask 077
    mkdir -p "$(dirname "$tokens_file")"
    printf '%s\n' "$TANGRAM_TOKENS" | tr ';' '\n' > "$tokens_file"
fi

exec tangram serve \
    --host "${TANGRAM_HOST:-0.0.0.0}" \
    --port "${TANGRAM_PORT:-8000}" \
    --data-dir "${TANGRAM_DATA_DIR:-/var/lib/tangram}" \
    --config "$config" \
    --log-level "${TANGRAM_LOG_LEVEL:-warning}" \
    "$@"
