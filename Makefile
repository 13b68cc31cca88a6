# Two commands on a fresh machine do all the set-up:
#   make demo   -> builds .venv and runs the demo job (local storage, local Ray, fake engine)
#   make test   -> builds .venv-test and runs lint + the whole test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
TEST_VENV := .venv-test
PIP_FLAGS := -q --disable-pip-version-check

.PHONY: demo test lint format bench clean

$(VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) --upgrade pip
	$(VENV)/bin/pip install $(PIP_FLAGS) -e .
	touch $@

$(TEST_VENV)/.stamp: pyproject.toml constraints/cpu.txt
	$(PYTHON) -m venv $(TEST_VENV)
	$(TEST_VENV)/bin/pip install $(PIP_FLAGS) --upgrade pip
	$(TEST_VENV)/bin/pip install $(PIP_FLAGS) -c constraints/cpu.txt -e '.[dev,hf]'
	touch $@

demo: $(VENV)/.stamp
	$(VENV)/bin/qvl-batch demo

lint: $(TEST_VENV)/.stamp
	$(TEST_VENV)/bin/ruff check qvl_batch tests
	$(TEST_VENV)/bin/ruff format --check qvl_batch tests

format: $(TEST_VENV)/.stamp
	$(TEST_VENV)/bin/ruff format qvl_batch tests
	$(TEST_VENV)/bin/ruff check --fix qvl_batch tests

test: lint
	$(TEST_VENV)/bin/python -m pytest -q -ra

bench: $(VENV)/.stamp
	$(VENV)/bin/qvl-batch bench host

clean:
	rm -rf $(VENV) $(TEST_VENV) demo-data demo-output bench-out
