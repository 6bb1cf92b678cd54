# The two set-up commands: `make demo` (a small curriculum search on this machine) and
# `make test`. Each creates the virtual environment and installs what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
PACERAY := $(VENV)/bin/paceray
# torch==2.13.0 is taken from the CPU wheel on disk here. On a CUDA machine install your CUDA
# build of torch 2.13.0 into the venv first; the == pin keeps it (a local version like +cu128
# satisfies ==2.13.0).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

.PHONY: install test demo screenshots clean
install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q -ra --durations=15

demo: install
	$(PACERAY) tune search_spaces/quick.yaml

# The README's pictures, from the newest search in ./runs (the demo's, run first if there is none);
# needs Debian's chromium. Not part of the tests.
screenshots: install
	$(PY) scripts/screenshots.py --run-dir runs

clean:
	rm -rf runs .pytest_cache
