# `make test` and `make demo` install what they need into .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install lint test demo bench bench-sources clean

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
# cores, most of it the ten parts of the learning benchmark (bench/ablations.py, 5-95 min each; it makes each
# corpus's outputs first and skips every run whose curve is already committed under bench/curves).
bench: install bench-sources
	$(PY) bench/score_throughput.py
	$(PY) bench/selection.py
	$(PY) bench/selection_memory.py
	$(PY) bench/input_pipeline.py
	$(PY) bench/loss_parameters.py
	for corpus in demo emoji; do for part in gates headline sweep state larger; do \
	  $(PY) bench/ablations.py --corpus $$corpus --part $$part || exit 1; done; done

# The emoji corpus's sources (demo/emoji_corpus.py): two Debian packages (as root, the way CI and fresh machines run)
# and one PyPI package; nothing in `make test` or `make demo` needs them.
EMOJI_FILES := /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf /usr/share/unicode/emoji/emoji-test.txt
bench-sources: install
	@for f in $(EMOJI_FILES); do test -f $$f || missing=1; done; \
	if [ -n "$$missing" ]; then apt-get update -q && apt-get install -y -q fonts-noto-color-emoji unicode-data; fi
	$(PY) -m pip install --quiet --disable-pip-version-check -r bench/requirements.txt

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
