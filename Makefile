# Tangram developer commands. `make serve` and `make test` work on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test test-image lint typecheck serve bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check tangram tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/python -m pytest -q

# Builds the Dockerfile with podman (from a debootstrap Debian base, no registry) and runs
# the image: /healthz and one lease from the host. Needs root; slow from a cold cache.
test-image:
	deploy/image/test-image.sh

serve: $(STAMP)
	$(BIN)/tangram serve $(ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_scheduler.py
	$(BIN)/python benchmarks/bench_broker.py
	$(BIN)/python benchmarks/bench_http.py
	$(BIN)/python benchmarks/bench_ray.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
