# Tangram developer commands. `make serve` and `make test` work on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# What each target needs installed into .venv (see the extras in pyproject.toml):
# `make serve` only the server, everything else (tests, lint, benchmarks) the dev extra.
STAMP := $(VENV)/.installed
SERVE_STAMP := $(VENV)/.installed-server

.PHONY: venv test test-image sandbox-image lint typecheck serve bench clean

# A venv with an up-to-date pip; the distribution was called `tangram` before it was
# `tangram-broker`: an old editable install of that name is removed first.
define setup
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	! $(BIN)/python -m pip show -q tangram >/dev/null 2>&1 \
		|| $(BIN)/python -m pip uninstall -q -y tangram
endef

$(STAMP): pyproject.toml
	$(setup)
	$(BIN)/python -m pip install -q -e '.[dev]'
	# verl's tool modules without the rest of verl (`import verl` needs torch, which the
	# tests do without): tests/test_integrations_verl.py loads them so.
	$(BIN)/python -m pip install -q --no-deps 'verl>=0.7,<0.10'
	touch $(STAMP) $(SERVE_STAMP)

# The dev extra holds the server's packages: a venv set up for tests serves too.
$(SERVE_STAMP): pyproject.toml
	$(setup)
	$(BIN)/python -m pip install -q -e '.[server]'
	touch $(SERVE_STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check tangram tests benchmarks examples

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/python -m pytest -q

# Builds the Dockerfile with podman (from a debootstrap Debian base, no registry) and runs
# the image: /healthz and one lease from the host. Needs root; slow from a cold cache.
test-image:
	deploy/image/test-image.sh

# The container executor's test image (an OCI layout with a pytest venv, built from the
# same debootstrap base without a registry or engine; cached). Needs root and umoci.
sandbox-image:
	deploy/image/sandbox-image.sh

serve: $(SERVE_STAMP)
	$(BIN)/tangram serve $(ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_scheduler.py
	$(BIN)/python benchmarks/bench_broker.py
	$(BIN)/python benchmarks/bench_http.py
	$(BIN)/python benchmarks/bench_ray.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
