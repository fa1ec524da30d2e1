# Every target sets up .venv itself, so a fresh machine with Python 3.11+ and a
# C compiler needs nothing but `make demo` and `make test`.
export NO_MKDOCS_2_WARNING := 1

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SRC    := $(wildcard src tests benchmarks examples)
# Changing any of these reinstalls, which rebuilds the C helpers.
BUILD_INPUTS := pyproject.toml setup.py src/procshare/_backends/posix/_robustmutex.c \
                src/procshare/_backends/posix/_forkstep.c src/procshare/_backends/posix/_shmstep.c \
                src/procshare/_backends/posix/_futex.c \
                src/procshare/_backends/posix/_futex_ring.h \
                src/procshare/_backends/posix/_futex_holds.h \
                src/procshare/_cview.c \
                src/procshare/_engine/_cengine.c \
                src/procshare/_engine/_cengine_record.h \
                src/procshare/_engine/_cengine_lock.h \
                src/procshare/_engine/_cengine_end.h \
                src/procshare/_engine/_cengine_get.h \
                src/procshare/_engine/_cengine_new.h \
                src/procshare/_backends/posix/_lock_layout.h \
                src/procshare/_cview_segment.h \
                src/procshare/_cview_close.h \
                src/procshare/_slots.h \
                src/procshare/_backends/posix/_robustmutex_reuse.h \
                src/procshare/_backends/posix/_shmstep_types.h \
                src/procshare/_backends/posix/_shmstep_holds.h \
                src/procshare/_backends/posix/_shmstep_close.h \
                src/procshare/_backends/posix/_shmstep_create.h \
                src/procshare/_backends/posix/_forkfast.c \
                src/procshare/_backends/posix/_forkjoin.c \
                src/procshare/_backends/posix/_forkfast.h \
                src/procshare/_backends/posix/_forkstep.h \
                src/procshare/_backends/posix/_forkstep_private.h

.PHONY: test lint typecheck docs docs-serve demo bench bench-smoke clean

$(PY):
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "procshare needs Python 3.11+"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Stamps record which extras are installed; pyproject.toml changes reinstall.
$(VENV)/.dev: $(BUILD_INPUTS) | $(PY)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

$(VENV)/.base: $(BUILD_INPUTS) | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.bench: $(BUILD_INPUTS) | $(PY)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $@

lint: $(VENV)/.dev
	$(PY) -m ruff check $(SRC)
	$(PY) -m ruff format --check $(SRC)

typecheck: $(VENV)/.dev
	$(PY) -m mypy src benchmarks

docs: $(VENV)/.dev
	$(PY) -m mkdocs build --strict --quiet --site-dir build/site

test: lint typecheck docs
	$(PY) -m pytest

# Not part of `make test`: the whole suite STRESS_RUNS times in a row, then
# STRESS_LOADED times beside the demo and a CPU hog per core (tests/stress.sh).
STRESS_RUNS   ?= 10
STRESS_LOADED ?= 3
.PHONY: stress-test
stress-test: $(VENV)/.dev
	PY=$(PY) STRESS_RUNS=$(STRESS_RUNS) STRESS_LOADED=$(STRESS_LOADED) tests/stress.sh

# `make demo CLUSTER=1`: the same program as Dask tasks on a LocalCluster of
# 2 worker processes (python -m procshare demo --cluster; installs procshare[dask]).
demo: $(if $(CLUSTER),$(VENV)/.dask,$(VENV)/.base)
	$(PY) -m procshare demo $(if $(CLUSTER),--cluster)

$(VENV)/.dask: $(BUILD_INPUTS) | $(PY)
	$(PY) -m pip install --quiet -e '.[dask]'
	touch $@

bench: $(VENV)/.bench
	$(PY) -m benchmarks

clean:
	rm -rf build .mypy_cache .pytest_cache .ruff_cache
