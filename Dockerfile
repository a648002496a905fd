# Tangram lease broker: `tangram serve` on 0.0.0.0:8000 (see deploy/README.md).
#
#   docker build -t tangram .
#   docker run -p 8000:8000 -v "$PWD/deploy/image:/etc/tangram:ro" \
#       -e TANGRAM_TOKENS="alice a-token-of-16-chars-or-more" -v tangram-data:/var/lib/tangram tangram
#
# BASE is any image with Python >= 3.11 as `python3` and the venv module: the official
# slim image by default; `make test-image` passes a Debian base built with debootstrap,
# since the test machine cannot reach an image registry.
ARG BASE=python:3.11-slim-bookworm

# ---- build: the wheel and a virtual environment with it and its dependencies --------
FROM ${BASE} AS build
WORKDIR /src
# The dependencies first, in a layer of their own that is rebuilt only when
# pyproject.toml changes (they take a minute or more to fetch; the package seconds):
# the base requirements of tangram-broker and those of its extras `server` (tangram
# serve) and `ray` (the KubeRay head and the sandbox workers run this image too).
COPY pyproject.toml ./
# The venv lives at the path the runtime stage copies it to: its scripts hard-code it.
RUN python3 -m venv /opt/tangram \
    && /opt/tangram/bin/python -m pip install --no-cache-dir --upgrade pip setuptools wheel \
    && /opt/tangram/bin/python -c "import tomllib; \
p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
x = p['optional-dependencies']; \
print('\n'.join(dict.fromkeys(p['dependencies'] + x['server'] + x['ray'])))" \
        > /tmp/requirements.txt \
    && /opt/tangram/bin/python -m pip install --no-cache-dir -r /tmp/requirements.txt
COPY README.md LICENSE ./
COPY tangram ./tangram
# No build isolation: setuptools and wheel are already in the venv, so building the
# wheel needs no further download.
RUN /opt/tangram/bin/python -m pip wheel --no-cache-dir --no-deps --no-build-isolation \
        --wheel-dir /wheels . \
    && /opt/tangram/bin/python -m pip install --no-cache-dir --no-deps /wheels/*.whl \
    && /opt/tangram/bin/python -m pip check \
    && /opt/tangram/bin/tangram --help > /dev/null

# ---- runtime: the same base, the venv, no compiler, no source tree -------------------
FROM ${BASE} AS runtime
# A fixed uid so that a volume's owner is predictable on the host and in Kubernetes
# (securityContext.runAsUser / fsGroup in deploy/kuberay).
# bubblewrap isolates the commands of the Ray sandbox executors (deploy/kuberay; see
# docs/reliability.md): the image serves both the broker and the sandbox workers.
# Unpinned: BASE may be any Debian release, each with its own bubblewrap version.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends bubblewrap \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --uid 10001 --user-group --home-dir /var/lib/tangram --no-create-home \
        --shell /usr/sbin/nologin tangram \
    && mkdir -p /var/lib/tangram /etc/tangram /run/tangram \
    && chown tangram:tangram /var/lib/tangram /run/tangram
COPY --from=build /opt/tangram /opt/tangram
COPY deploy/image/entrypoint.sh /usr/local/bin/tangram-entrypoint
COPY deploy/image/healthcheck.py /usr/local/bin/tangram-healthcheck
ENV PATH=/opt/tangram/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TANGRAM_CONFIG=/etc/tangram/tangram.yaml \
    TANGRAM_PORT=8000
# The lease journal and serve.json: leases survive a restart when this is a volume.
VOLUME ["/var/lib/tangram"]
USER 10001:10001
WORKDIR /var/lib/tangram
EXPOSE 8000
# /healthz needs no token; python (not curl) because the slim base has no curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python3", "/usr/local/bin/tangram-healthcheck"]
# The entrypoint writes TANGRAM_TOKENS (if set) to /run/tangram/tokens.txt, then runs
#   tangram serve --host 0.0.0.0 --port $TANGRAM_PORT --data-dir /var/lib/tangram
#                 --config $TANGRAM_CONFIG  [extra arguments]
# `tangram serve` refuses 0.0.0.0 without tenants, so the mounted config must name some
# (server.tenants or server.tokens_file).
ENTRYPOINT ["/usr/local/bin/tangram-entrypoint"]
CMD []
