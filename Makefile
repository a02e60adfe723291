VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install serve test bench
install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml scripts/install.sh
	VENV=$(VENV) bash scripts/install.sh

serve: install
	$(VENV)/bin/mlx-loom serve

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) benchmarks/bench_engine.py
