# The two commands of the README's quick start:
#   make demo   set up, generate raw data, run every stage end to end, then a short training run
#   make test   set up and run the tests (what .ci/run calls)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test setup

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

demo: setup
	$(PY) generate_data.py --out data/raw
	# The four ETL stages in order (merge_and_clean, repartition, parse_ua_strings, preprocess),
	# each skipped when its output is complete and up to date.
	$(PY) pipeline.py run
	# One epoch with train.py's defaults for this device: on a CPU a 100-long history and a
	# small model (about a minute on 2 cores), on a GPU the full history.
	$(PY) train.py --epochs 1

test: setup
	$(PY) -m pytest -q
