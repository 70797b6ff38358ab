# medxfer: `make demo` runs the main job on built-in synthetic data; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint bench install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e ".[test]"
	$(PY) -m pip install --no-deps "lightly>=1.5"  # medxfer[pretrain] without its unused deps: torch/torchvision stay as they are
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m medxfer demo --out demo-output

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)  # the long end-to-end tests (72 kill points, full-size checks): not part of CI
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf demo-output .pytest_cache
