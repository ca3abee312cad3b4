# asr-retune — two commands do everything on a fresh machine:
#   make demo   set-up + the weekly pipeline on the embedded default
#   make test   set-up + the test suite
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell sha256sum pyproject.toml 2>/dev/null | cut -c1-16)
FSDD   ?= ../shared/data/fsdd
PYTEST_ARGS ?=
SETUP_LOG := .asr-retune/logs/setup.log

.PHONY: help setup check-system demo test reliability bench quality clean lint

help:
	@echo "make demo    set up .venv, then three weekly runs of the Airflow DAG on the demo corpus (embedded default): cold start, promotion, refusal"
	@echo "make test    set up .venv, run the test suite (CI runs this)"
	@echo "make reliability  the fault-injection suite, slow scenarios included; writes reliability-scorecard.json"
	@echo "make bench   run the benchmarks in tests/benchmarks/ (prints JSON)"
	@echo "make quality the quality benchmark alone: golden-set WER per front end / augmentation (about 40 min)"
	@echo "make lint    static checks of docker/ infra/ configs/ (hadolint, yamllint, kubernetes-validate, CRD schemas, checkov); tools in .venv-lint"
	@echo "make clean   remove the local store (.asr-retune/); keeps .venv"

check-system:
	@command -v $(PYTHON) >/dev/null 2>&1 || { \
	  echo "asr-retune: '$(PYTHON)' not found. Install Python 3.11 (Debian/Ubuntu: apt-get install python3.11 python3.11-venv; or pyenv install 3.11) or run 'make PYTHON=/path/to/python3.11 ...'." >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' || { \
	  echo "asr-retune: '$(PYTHON)' is not Python 3.11 (it is $$($(PYTHON) -V 2>&1)). Pass PYTHON=/path/to/python3.11." >&2; exit 1; }
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || { \
	  echo "asr-retune: the venv module is missing for $(PYTHON). Debian/Ubuntu: apt-get install python3.11-venv." >&2; exit 1; }
	@bash tools/check-system.sh

# .venv is (re)installed when missing or when pyproject.toml changed (the stamp names its hash).
$(STAMP): pyproject.toml | check-system
	@test -x $(BIN)/python || { echo ">> creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	@echo ">> installing asr-retune and its pinned dependencies into $(VENV) (first time: several minutes, torch is large; log: $(SETUP_LOG))"
	@mkdir -p $(dir $(SETUP_LOG))
	@{ $(BIN)/python -m pip install --quiet --upgrade pip && \
	   $(BIN)/python -m pip install --quiet --progress-bar off -e '.[test]'; } >$(SETUP_LOG) 2>&1 || { \
	  echo "asr-retune: installing the dependencies failed; the last lines of $(SETUP_LOG):" >&2; tail -n 25 $(SETUP_LOG) >&2; exit 1; }
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

setup: check-system $(STAMP)

demo: setup
	@test -d $(FSDD) || { echo "asr-retune: demo data not found at $(FSDD) (the FSDD recordings; set demo.fsdd_dir in the config, or FSDD=... here)." >&2; exit 1; }
	$(BIN)/asr-retune demo --airflow

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# every test marked @pytest.mark.scenario (tests/support/scorecard.py), slow ones included
reliability: setup
	$(BIN)/python -m pytest tests -m scenario --scorecard reliability-scorecard.json $(PYTEST_ARGS)

bench: setup
	@mkdir -p .asr-retune
	$(BIN)/python tests/benchmarks/run_all.py

quality: setup
	@mkdir -p .asr-retune
	$(BIN)/python tests/benchmarks/bench_quality.py

lint: check-system
	bash tools/lint.sh

clean:
	-@test -x $(BIN)/asr-retune && $(BIN)/asr-retune serve stop --quiet >/dev/null 2>&1 || true
	rm -rf .asr-retune
