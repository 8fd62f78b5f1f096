# The two commands of the README's quick start:
#   make demo   set up, generate raw data, run every stage that exists, end to end
#   make test   set up and run the tests (what .ci/run calls)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAGES := merge_and_clean.py repartition.py parse_ua_strings.py preprocess.py train.py

.PHONY: demo test setup

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

demo: setup
	$(PY) generate_data.py --out data/raw
	@set -e; for script in $(STAGES); do \
		if [ -f $$script ]; then echo "== $$script"; $(PY) $$script; \
		else echo "== $$script: not built yet, skipped"; fi; \
	done

test: setup
	$(PY) -m pytest -q
