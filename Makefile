# Two commands do all set-up on a fresh machine with Python 3.11 and pip
# (--no-cache-dir: the stack is ~6 GB and a wheel cache would double the disk it needs):
#   make demo   - create .venv, install fiberbench with its extras, run the main job
#   make test   - same install, then the whole test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fiberbench-installed
PYTEST_ARGS ?=

.PHONY: install demo test test-all browser-deps bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-cache-dir --upgrade pip
	$(BIN)/python -m pip install -q --no-cache-dir -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Debian's chromium for the real-browser notebook test (skipped with a reason if it cannot be installed)
browser-deps:
	@command -v chromium >/dev/null 2>&1 || (command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && apt-get install -y -qq chromium >/dev/null) ) || \
		echo "chromium not installed: the browser test will be skipped"

demo: install
	$(BIN)/fiberbench demo --out out/demo

test: install browser-deps
	$(BIN)/python -m pytest -q --timeout=900 -p no:cacheprovider $(PYTEST_ARGS)

test-all: install browser-deps
	$(BIN)/python -m pytest -q --timeout=3600 -m "" $(PYTEST_ARGS)

bench: install
	$(BIN)/fiberbench bench quality --quick

clean:
	rm -rf out .pytest_cache
