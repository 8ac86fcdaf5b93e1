# The two README commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?= -q

.PHONY: venv demo test benchmark clean

$(STAMP): setup.py requirements.txt requirements-dev.txt requirements-export.txt requirements-convert.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash run/train/train.sh

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) outputs data
