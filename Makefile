# make test   create .venv if needed, install pinned dependencies, run the test suite
#             (TEST_WORKERS processes, pytest-xdist, one test file per process at a time)
# make train  the same environment, then train the default config (configs/camvid_cpu.py)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fcn-installed
CONFIG ?= configs/camvid_cpu.py
WORKDIR ?= runs/$(basename $(notdir $(CONFIG)))
TEST_WORKERS ?= 2

# The development copy of CamVid beside the repository, when there is one.
ifneq ($(wildcard ../shared/datasets/camvid),)
export FCN_CAMVID_DIR ?= $(abspath ../shared/datasets/camvid)
endif

.PHONY: test train env lint clean

env: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

train: $(STAMP)
	$(PY) train.py --config $(CONFIG) --workdir $(WORKDIR)

lint: $(STAMP)
	$(VENV)/bin/ruff format --check . && $(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV)
