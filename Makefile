# Every target bootstraps .venv on a fresh machine first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# checkov pins networkx and packaging versions that clash with torch's, so it gets its own venv.
CHECKOV := $(VENV)/tools/checkov/bin/checkov

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt $(CHECKOV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[train,dev]'
	$(PY) -m devkit.broker --check
	touch $(STAMP)

$(CHECKOV):
	$(PYTHON) -m venv $(VENV)/tools/checkov
	$(VENV)/tools/checkov/bin/pip install --quiet checkov==3.3.30

test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	$(PY) -m devkit.demo

bench: $(STAMP)
	$(PY) -m worker.bench

clean:
	rm -rf $(VENV) artifacts .cache .pytest_cache
