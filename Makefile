# Two entry points for a fresh machine with only Python and make:
#   make run   - create .venv, install everything, run the main job on the embedded digits data
#   make test  - create .venv, install everything, run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch comes first, pinned to the release this project is tested on (override TORCH for another platform)
TORCH ?= torch==2.14.1 torchvision==0.29.1
MAIN ?= ccea

.PHONY: run test setup browser clean

$(BIN)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

setup: $(BIN)/.installed

# The leaderboard page is tested in Debian's chromium; installed where this machine allows it
# (root and apt-get), otherwise that one test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1; } || \
	  echo "chromium not installed: the leaderboard browser test will skip"

run: setup
	$(BIN)/fqtbench run --method $(MAIN)

test: setup browser
	$(BIN)/python -m pytest -q

# removes the environment only: run records under runs/ are results, delete them by hand
clean:
	rm -rf $(VENV)
