# The two commands a newcomer needs (see README): `make simulate` and `make test`.
# Each creates .venv if missing, installs torch==2.13.0 FIRST (a bare `torch` requirement would
# pull a multi-GB CUDA build), then this project, then runs.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
# Where torch comes from. Empty: pip's configured indexes. On a Linux machine whose PyPI would
# hand out the multi-GB CUDA build, use the CPU wheels:
#   make simulate TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
STAMP := $(VENV)/.installed

.PHONY: simulate test lint bench-quick clean proto

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check \
		$(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# The main job: a local swarm (one real node process per stage, gRPC on loopback) trains a
# ResBM on the bundled tiny-shakespeare corpus. Extra flags: make simulate ARGS="--steps 200".
simulate: $(STAMP)
	$(BIN)/resbm simulate --workdir runs/simulate $(ARGS)

# Two tests at a time: a multi-process test keeps about one core busy (it mostly waits on its
# processes' startup, DHT records and averaging windows), so two cores run two of them.
# One at a time: make test PYTEST_ARGS="-n 0".
PYTEST_ARGS ?= -n 2 --dist worksteal

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench-quick: $(STAMP)
	$(BIN)/resbm bench convergence --quick

clean:
	rm -rf $(VENV) runs resbm-bench resbm-sim-* .pytest_cache .ruff_cache

# Regenerate the committed gRPC stubs after editing a proto/*.proto (a test checks they match).
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Inode/wire/_pb=proto --python_out=. --grpc_python_out=. --pyi_out=. proto/stage.proto proto/coordinator.proto proto/diagnostics.proto
