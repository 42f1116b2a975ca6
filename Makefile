# Two commands a newcomer needs: `make demo` and `make test`.
# Both create .venv if missing and install mlaudit into it (with the dev extra).
# With no torch in the venv we install the CPU build pinned below; a GPU user installs
# the CUDA build of torch into .venv first (see README, "Running on a GPU") and it is kept.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU ?= torch==2.13.0
EXTRAS ?= dev,ray,diffusion,flower
STAMP := $(VENV)/.mlaudit-installed
# pytest-xdist workers for `make test`: the tests run torch single-threaded (tests/conftest.py), so two
# workers use both cores of a 2-core machine (measured: 511 s with one process, 272 s with two)
TEST_WORKERS ?= 2

.PHONY: demo test test-all lint bench-train bench-factory clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_CPU)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mlaudit demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup -m "not slow and not gpu" -p no:cacheprovider

test-all: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

bench-train: $(STAMP)
	$(PY) benchmarks/train_cifar10.py

bench-factory: $(STAMP)
	$(PY) benchmarks/factory.py

clean:
	rm -rf $(VENV) runs build dist src/*.egg-info
