# The two set-up commands of the README:
#   make demo   create/reuse .venv, install, get the data, run the paper preset under mpiexec
#   make test   create/reuse .venv, install, run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
NP ?= 6
# The shipped config `make demo` runs (alignfl_mpi/configs/NAME.toml): the reference code's settings.
PRESET ?= paper
# Where `make demo` imports MNIST/Fashion-MNIST from when the data root lacks them;
# leave empty to download with torchvision instead.
DATASETS ?= $(ALIGNFL_DATASETS)
export OMP_NUM_THREADS ?= 1

.PHONY: install demo test data clean slurm-up slurm-down

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[mpich,test]'
	touch $@

install: $(VENV)/.installed

data: install
	@for d in mnist fashion-mnist; do \
	  if [ ! -d data/$$d ]; then \
	    if [ -n "$(DATASETS)" ]; then $(BIN)/alignfl-mpi data import $(DATASETS)/$$d --dataset $$d || exit 1; \
	    else $(BIN)/alignfl-mpi data download --dataset $$d || exit 1; fi; \
	  fi; \
	done

# Each demo run gets its own folder, so a second `make demo` never refuses or overwrites.
STAMP := $(shell date +%Y%m%d-%H%M%S)
RUN_DIR ?= runs/demo-$(STAMP)

demo: data
	PATH=$(abspath $(BIN)):$$PATH mpiexec -n $(NP) $(BIN)/alignfl-mpi run --preset $(PRESET) --output $(RUN_DIR) $(ARGS)
	$(BIN)/alignfl-mpi report $(RUN_DIR) --out $(RUN_DIR)/report

# The checks CI runs, in order: lint and import order, the import contracts (only the
# transport imports mpi4py; see [importlinter] in setup.cfg), the types ([mypy] in
# setup.cfg), then the tests and doctests in two passes: the in-process tests on every core
# (pytest-xdist; each is one thread), then the tests that launch ranks (`mpi`, `slurm`) one
# at a time, since a launch already keeps every core busy. Exit status 5 (nothing selected,
# e.g. by PYTEST_ARGS="-k name") is not a failure of either pass.
TEST_WORKERS ?= $(shell nproc 2>/dev/null || echo 2)
test: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy alignfl_mpi
	PATH=$(abspath $(BIN)):$$PATH $(PY) -m pytest -q -n $(TEST_WORKERS) \
	  -m "not mpi and not slurm" $(PYTEST_ARGS) || [ $$? -eq 5 ]
	PATH=$(abspath $(BIN)):$$PATH $(PY) -m pytest -q -m "mpi or slurm" $(PYTEST_ARGS) \
	  || [ $$? -eq 5 ]

# The single-host test SLURM of tests/test_slurm.py (as root): apt-get install slurm-wlm munge
# when missing, start munged, slurmctld and two slurmd; then `eval "$$(.ci/slurm.sh env)"`.
slurm-up:
	.ci/slurm.sh install
	.ci/slurm.sh up

slurm-down:
	.ci/slurm.sh down

clean:
	rm -rf $(VENV) build *.egg-info
