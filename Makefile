# Two commands on a fresh machine do all the set-up:
#   make demo   -> builds .venv and runs the demo job (local storage, local Ray, tiny hf model)
#   make test   -> builds .venv-test and runs lint + the whole test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
TEST_VENV := .venv-test
PINNED_VENV := .venv-test-trtllm-pins
ENGINE_TESTS := tests/engines/test_hf_engine.py tests/engines/test_hf_inflight.py tests/engines/test_hf_inputs.py tests/engines/test_hf_vision.py tests/engines/test_hf_decode.py tests/engines/test_hf_gqa.py tests/tooling/test_modelgen.py tests/rows/test_images.py tests/engines/test_trtllm_contract.py
PIP_FLAGS := -q --disable-pip-version-check

.PHONY: demo test lint format bench clean

$(VENV)/.stamp: pyproject.toml constraints/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) --upgrade pip
	$(VENV)/bin/pip install $(PIP_FLAGS) -c constraints/cpu.txt -e '.[hf]'
	touch $@

$(TEST_VENV)/.stamp: pyproject.toml constraints/cpu.txt
	$(PYTHON) -m venv $(TEST_VENV)
	$(TEST_VENV)/bin/pip install $(PIP_FLAGS) --upgrade pip
	$(TEST_VENV)/bin/pip install $(PIP_FLAGS) -c constraints/cpu.txt -e '.[dev,hf]'
	touch $@

# The engine tests again under the versions TensorRT-LLM 1.2.x pins (transformers 4.57.3, numpy<2).
$(PINNED_VENV)/.stamp: pyproject.toml constraints/trtllm-pins.txt
	$(PYTHON) -m venv $(PINNED_VENV)
	$(PINNED_VENV)/bin/pip install $(PIP_FLAGS) --upgrade pip
	$(PINNED_VENV)/bin/pip install $(PIP_FLAGS) -c constraints/trtllm-pins.txt -e '.[dev,hf]'
	touch $@

demo: $(VENV)/.stamp
	$(VENV)/bin/qvl-batch demo

lint: $(TEST_VENV)/.stamp
	$(TEST_VENV)/bin/ruff check qvl_batch tests
	$(TEST_VENV)/bin/ruff format --check qvl_batch tests

format: $(TEST_VENV)/.stamp
	$(TEST_VENV)/bin/ruff format qvl_batch tests
	$(TEST_VENV)/bin/ruff check --fix qvl_batch tests

test: lint $(PINNED_VENV)/.stamp
	$(TEST_VENV)/bin/python -m pytest -q -ra
	$(PINNED_VENV)/bin/python -m pytest -q -ra $(ENGINE_TESTS)

bench: $(VENV)/.stamp
	$(VENV)/bin/qvl-batch bench host

clean:
	rm -rf $(VENV) $(TEST_VENV) $(PINNED_VENV) demo-data demo-output demo-model bench-out
