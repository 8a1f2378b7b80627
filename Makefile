# Two entry points for a fresh clone: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch is installed first, so the package's own `torch>=` requirement installs nothing more.
# Elsewhere, point TORCH_INDEX at a CPU wheel index to avoid downloading a CUDA build.
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
DEMO_CONFIG ?= examples/configs/paper_mlp_mse_gd.yaml
PYTEST_ARGS ?=

.PHONY: setup demo test lint bench clean

setup: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: setup
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python examples/reproduce.py fit --config $(DEMO_CONFIG)

# OpenMP threads that spin while they wait slow small ops down badly when the cores are shared with other
# processes (measured: the paper preset's Lightning step took 25 ms instead of 1.9 ms, pinv ~50x slower).
test: setup
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache .ruff_cache
