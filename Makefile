# Two entry points for a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO ?= demo
PYTEST_ARGS ?=

.PHONY: install demo test bench bench-relational clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	bash workflows/demo.sh $(BIN) $(DEMO)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	bash benchmarks/run_all.sh $(BIN)

bench-relational: install
	bash benchmarks/bench_relational.sh $(BIN)

clean:
	rm -rf $(DEMO) bench-relational .pytest_cache
