# Two entry points for a fresh machine with only Python and make:
#   make run   - create .venv, install everything, run the main job on the embedded digits data
#   make test  - create .venv, install everything, run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch comes first, pinned to the release this project is tested on (override TORCH for another platform)
TORCH ?= torch==2.14.1 torchvision==0.29.1
MAIN ?= qat

.PHONY: run test setup clean

$(BIN)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

setup: $(BIN)/.installed

run: setup
	$(BIN)/fqtbench run --method $(MAIN)

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
