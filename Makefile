# `make test` and `make demo` install what they need into .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install lint test demo bench clean

install: $(STAMP)

# Rebuilt only when the pins or the package metadata change.
$(STAMP): requirements.txt constraints.txt setup.py
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 required, found " + sys.version' 
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -c constraints.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $(STAMP)

# ruff (pinned in requirements.txt, configured in ruff.toml): lint and format, checked before the suite.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: install lint
	$(PY) -m pytest -q -n 2 -m "not gcs" tests
	$(PY) -m pytest -q -m gcs tests

# The end-to-end demo on the built-in demo corpus: runs/demo/report.md and its plots.
demo: install
	$(PY) -m demo --out runs/demo

# Benchmarks; each writes its figures and the command that made them to bench/RESULTS.md. About 4-6 h on 2 CPU
# cores, most of it the eight parts of the learning benchmark (bench/ablations.py, 5-95 min each; it makes each
# corpus's outputs first and skips every run whose curve is already committed under bench/curves).
bench: install
	$(PY) bench/score_throughput.py
	$(PY) bench/selection.py
	$(PY) bench/selection_memory.py
	$(PY) bench/input_pipeline.py
	$(PY) bench/loss_parameters.py
	for corpus in demo second; do for part in gates headline sweep state; do \
	  $(PY) bench/ablations.py --corpus $$corpus --part $$part || exit 1; done; done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
