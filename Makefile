VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install serve test bench bench-serving fuzz-api
install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml scripts/install.sh
	VENV=$(VENV) bash scripts/install.sh

serve: install
	$(VENV)/bin/mlx-loom serve

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) benchmarks/bench_engine.py

# Installs the bench extra once (llama-cpp-python builds llama.cpp: ~5 min on 2 cores) and
# llama.cpp's native llama-server (benchmarks/build_llama_server.sh, ~10 min), then runs
# every server; e.g. make bench-serving BENCH_SERVING_ARGS=--quick
bench-serving: install
	$(PY) -c "import llama_cpp, matplotlib" 2>/dev/null || $(VENV)/bin/pip install -e ".[test,bench]"
	test -x benchmarks/.cache/llama-server/bin/llama-server || VENV=$(VENV) bash benchmarks/build_llama_server.sh
	$(PY) benchmarks/run_serving.py $(BENCH_SERVING_ARGS)

# Schemathesis (positive mode) over the real server's OpenAPI document, bounded by FUZZ_MAX_TIME
# seconds (default 300): 0 server errors expected (scripts/fuzz_api.sh).
fuzz-api: install
	$(PY) -c "import schemathesis" 2>/dev/null || $(VENV)/bin/pip install -q schemathesis
	VENV=$(VENV) bash scripts/fuzz_api.sh
