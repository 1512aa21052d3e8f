# lowbit: `make demo` and `make test` do all the set-up on a fresh machine (Python 3.11, no GPU).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test bench data lint browser clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c requirements.lock -e '.[vision,models,test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lowbit demo --overwrite

test: $(STAMP) browser
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Accuracy and speed runs on real models (slow; figures go to docs/benchmarks.md).
# `make bench BENCH_ARGS=--quick` for reduced sizes.
BENCH_ARGS ?=
bench: $(STAMP) data
	$(PY) -m pytest -q -m slow
	$(PY) bench/run_all.py $(BENCH_ARGS)

# Real labelled data for the benchmarks: Fashion-MNIST ships as a Debian package (root + apt only).
data:
	@dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq >/dev/null 2>&1; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1) \
	  || echo "dataset-fashion-mnist not installed: Fashion-MNIST benchmarks will skip"; }

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

# Headless Chromium renders the HTML report in one test; install it where we can (root + apt), else that test skips.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq >/dev/null 2>&1; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1) \
	  || echo "chromium not installed: the report screenshot test will be skipped"; }

clean:
	rm -rf $(VENV) build dist src/*.egg-info
