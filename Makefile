# MoE from Scratch: two commands do everything.
#   make lab    set up (or reuse) .venv and open the course in JupyterLab
#   make test   set up (or reuse) .venv and run the whole test suite (unit tests + every notebook; the exercise
#               notebooks run in JupyterLab in headless Chromium when a Chromium is installed)
#
# TORCH_SPEC chooses the PyTorch requirement installed before the package. CI and machines that
# carry a local CPU wheel set it to e.g. "torch==2.13.0". On Linux without an NVIDIA driver we ask
# PyTorch's CPU index so that no CUDA libraries are downloaded.

# The first of these that is Python 3.10 or newer (macOS ships an older python3; try the versioned names).
PYTHON     ?= $(shell for p in python3 python3.13 python3.12 python3.11 python3.10; do \
                command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null \
                && { echo $$p; break; }; done)
VENV       ?= .venv
BIN        := $(VENV)/bin
LAB_STAMP  := $(VENV)/.moe_course_lab
STAMP      := $(VENV)/.moe_course_installed
SANITIZE   := tests/nbval_sanitize.cfg
NBVAL      := --nbval-current-env --nbval-sanitize-with $(SANITIZE) --nbval-cell-timeout=600
# The course's JupyterLab settings (no news pop-up), installed where the venv's JupyterLab reads them.
LAB_SETTINGS := $(VENV)/share/jupyter/lab/settings/overrides.json
# The browser for tests/test_browser.py: $(MOE_CHROMIUM), else the first of these names on PATH (the test
# looks for the same names).
CHROMIUM   ?= $(or $(MOE_CHROMIUM),$(shell for b in chromium chromium-browser google-chrome google-chrome-stable; do \
                command -v $$b 2>/dev/null && break; done))

UNAME_S    := $(shell uname -s)
HAS_NVIDIA := $(shell command -v nvidia-smi 2>/dev/null)
ifeq ($(UNAME_S)-$(HAS_NVIDIA),Linux-)
TORCH_SPEC       ?= torch
TORCH_INDEX_ARGS ?= --index-url https://download.pytorch.org/whl/cpu
else
TORCH_SPEC       ?= torch
TORCH_INDEX_ARGS ?=
endif

.PHONY: help setup lab test test-unit test-notebooks test-exercises test-torch test-torch-run lint exercises execute clean handout

help:
	@echo "make lab    - set up .venv and open the course in JupyterLab"
	@echo "make test   - set up .venv and run every test (unit tests, exercise checks, all notebooks)"
	@echo "make exercises - regenerate notebooks/ from solutions/"
	@echo "make execute   - re-execute the solution notebooks in place (after editing them; NB=path for one)"

# make lab installs what a learner needs (the package, PyTorch, JupyterLab); make test adds the test tools.
# PyTorch's index is tried with one retry and a short timeout, so an unreachable index fails in seconds.
$(LAB_STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python 3.10 or newer is required: install it (python.org, Homebrew, apt) and retry"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --retries 1 --timeout 20 \
		$(TORCH_INDEX_ARGS) "$(TORCH_SPEC)" || { echo "could not install PyTorch ($(TORCH_SPEC) $(TORCH_INDEX_ARGS));" \
		"if PyTorch's index is unreachable, install from PyPI instead: make lab TORCH_INDEX_ARGS="; exit 1; }
	$(BIN)/python -m pip install -e ".[lab]"
	touch $(LAB_STAMP)

$(STAMP): $(LAB_STAMP)
	$(BIN)/python -m pip install -e ".[dev,lab]"
	touch $(STAMP)

$(LAB_SETTINGS): jupyter-settings/overrides.json $(LAB_STAMP)
	mkdir -p $(@D)
	cp jupyter-settings/overrides.json $@

setup: $(STAMP) $(LAB_SETTINGS)

# JupyterLab refuses to start as root (containers, Binder-like set-ups) unless told it may.
LAB_ARGS ?= $(if $(filter 0,$(shell id -u)),--allow-root,)

lab: $(LAB_STAMP) $(LAB_SETTINGS)
	$(BIN)/jupyter lab $(LAB_ARGS) --notebook-dir=. notebooks/00_welcome.ipynb

lint: $(STAMP)
	$(BIN)/ruff check .

test-unit: $(STAMP)
	$(BIN)/python -m pytest -m "not browser" tests

# The exercise notebooks (notebooks/) run top to bottom: in JupyterLab in headless Chromium when Chromium and
# Playwright are found (tests/test_browser.py: errors only in cells tagged raises-exception, every figure
# drawn, widgets live), else in a plain kernel with nbval-lax. MOE_REQUIRE_BROWSER=1 (CI) never falls back.
test-exercises: $(STAMP)
	@if [ -n "$(CHROMIUM)" ] && $(BIN)/python -c "import playwright" 2>/dev/null \
			|| [ "$${MOE_REQUIRE_BROWSER:-0}" != 0 ]; then \
		echo "browser test: notebooks/ in JupyterLab, headless $(or $(CHROMIUM),(no browser found))"; \
		echo "$(BIN)/python -m pytest -m browser tests/test_browser.py"; \
		MOE_CHROMIUM="$(CHROMIUM)" $(BIN)/python -m pytest -m browser tests/test_browser.py; \
	else \
		if [ -z "$(CHROMIUM)" ]; then \
			echo "browser test skipped: chromium not found, install it with apt-get install chromium"; \
		else \
			echo "browser test skipped: playwright not found, install it with $(BIN)/pip install playwright"; \
		fi; \
		echo "$(BIN)/python -m pytest --nbval-lax $(NBVAL) notebooks"; \
		$(BIN)/python -m pytest --nbval-lax $(NBVAL) notebooks; \
	fi

test-notebooks: $(STAMP)
	$(BIN)/python -m pytest --nbval $(NBVAL) solutions
	@$(MAKE) --no-print-directory test-exercises

# Notebook outputs were recorded on the CPU: compare on the CPU even where a GPU is present. On x86-64, with
# PyTorch's AVX2 kernels even where the CPU has AVX-512 (they sum in another order), as `make execute` records
# them (moe_course.course.notebooks.RECORDING_ENV), so that trained numbers match on every x86-64 machine.
test test-notebooks test-exercises: export MOE_DEVICE = cpu
ifeq ($(shell uname -m),x86_64)
test test-notebooks test-exercises: export ATEN_CPU_CAPABILITY = avx2
endif

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not browser" tests
	$(BIN)/python -m pytest --nbval $(NBVAL) solutions
	@$(MAKE) --no-print-directory test-exercises

# make test-torch TORCH=2.4.1   the unit tests and every solution notebook under another PyTorch, in its own
#                               venv (.venv-torch-2.4.1, made with $(TORCH_PYTHON)). Notebooks are checked for
#                               errors only (nbval-lax): their outputs were recorded on the pinned torch of
#                               `make test`, and some trained numbers differ in the last digits elsewhere (README,
#                               "Which PyTorch"). CI runs it for the oldest supported torch and a recent one.
TORCH_PYTHON ?= python3.12

test-torch:
	@test -n "$(TORCH)" || { echo "usage: make test-torch TORCH=2.4.1 [TORCH_PYTHON=python3.12]"; exit 1; }
	@$(MAKE) --no-print-directory test-torch-run VENV=.venv-torch-$(TORCH) PYTHON=$(TORCH_PYTHON) \
		TORCH_SPEC=torch==$(TORCH)

test-torch-run: export MOE_DEVICE = cpu
test-torch-run: $(STAMP)
	$(BIN)/python -c "import sys, torch; print('Python', sys.version.split()[0], '+ torch', torch.__version__); \
		assert torch.__version__.split('+')[0] == '$(TORCH)', 'this venv holds another torch: rm -r $(VENV)'"
	$(BIN)/python -m pytest -p no:cacheprovider -m "not browser" tests
	$(BIN)/python -m pytest -p no:cacheprovider --nbval-lax $(NBVAL) solutions

exercises: $(STAMP)
	$(BIN)/python -m moe_course.course.notebooks generate

# make execute                                     every solution notebook
# make execute NB=solutions/04_load_balancing.ipynb  one (or several, space-separated)
execute: $(STAMP)
	$(BIN)/python -m moe_course.course.notebooks execute $(NB)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# The learners' copy of the course: the last commit without solutions/ (INSTRUCTORS.md, "Handing out").
handout:
	$(PYTHON) moe_course/course/handout.py  # standard library only: no venv needed
