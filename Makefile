# Two commands on a fresh machine with only Python 3.10+:  make demo,  make test.
# Each builds the environment .venv first when it is missing or out of date, then calls
# .venv/bin/python directly (no activation).  PYTHON=python3.12 make test  picks the interpreter.

PYTHON ?= python3
VENV   = .venv
ARGS   =

VPY   := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# The interpreter .venv runs and the one PYTHON names; when they differ (another PYTHON=..., or a
# system upgrade that left .venv/bin/python dangling) the environment is built again from scratch.
want_version := $(shell $(PYTHON) -c 'import sys; print(sys.version.split()[0])' 2>/dev/null)
have_version := $(shell $(VPY) -c 'import sys; print(sys.version.split()[0])' 2>/dev/null)
ifneq ($(want_version),$(have_version))
$(STAMP): .FORCE
endif

.PHONY: help demo test bench-smoke gpu-on-cpu check-env env .FORCE

help:
	@echo 'make demo        build .venv if needed, then train the tiny GPT example on 2 CPU processes'
	@echo '                 (python examples/gpt/train.py fit --config configs/gpt-tiny-desloc.yaml)'
	@echo 'make test        build .venv if needed, then python -m pytest $$ARGS'
	@echo '                 (make test ARGS="tests/test_schedule.py -q"; no tests collected is a failure)'
	@echo 'make bench-smoke build .venv if needed, then the benchmark scripts end to end (--smoke), which'
	@echo '                 make test leaves out (python -m pytest -m bench_smoke; CI runs both)'
	@echo 'make gpu-on-cpu  build .venv if needed, then tests/gpu on CPU with plain gloo (DESLOC_GPU_TESTS_ON_CPU=1):'
	@echo '                 the GPU tests'"'"' own expectations, which make test skips without CUDA (CI runs it)'
	@echo 'make check-env   build .venv if needed, then import lightning, torch, litdata, torchmetrics, lightning_desloc'
	@echo 'make env         only build or refresh .venv (python3 -m venv .venv; pip install -e ".[dev]")'
	@echo 'PYTHON=python3.12 make ...   build .venv with another interpreter (default: python3)'

# Refreshed when pyproject.toml is newer than the stamp, when the stamp is missing (a failed or
# interrupted install leaves none) or when the interpreter changed; otherwise reused in no time.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null || { \
	  echo "make: '$(PYTHON)' is missing or older than Python 3.10; choose another: PYTHON=python3.12 make $(or $(MAKECMDGOALS),env)" >&2; \
	  exit 1; }
	@if [ -f $(VENV)/pyvenv.cfg ] && [ "$(have_version)" != "$(want_version)" ]; then \
	  echo "make: $(VENV) runs Python $(or $(have_version),(none)), $(PYTHON) is $(want_version): building $(VENV) again"; \
	  rm -rf $(VENV); fi
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[dev]"
	@touch $@

env: $(STAMP)

check-env: $(STAMP)
	$(VPY) -c "import lightning, torch, litdata, torchmetrics, lightning_desloc; print('torch', torch.__version__, 'lightning', lightning.__version__)"

demo: $(STAMP)
	$(VPY) examples/gpt/train.py fit --config configs/gpt-tiny-desloc.yaml $(ARGS)

# pytest's exit code 5 (no tests collected) becomes a failure; every other code is passed on to make,
# which reports it as "Error N" and itself exits 2 on any failure.
test: $(STAMP)
	$(info $(VPY) -m pytest $(ARGS))
	@status=0; $(VPY) -m pytest $(ARGS) || status=$$?; \
	if [ $$status -eq 5 ]; then \
	  echo "make test: pytest collected no tests (exit 5); that is a failure" >&2; exit 1; fi; \
	exit $$status

bench-smoke: $(STAMP)
	$(info $(VPY) -m pytest -m bench_smoke $(ARGS))
	@status=0; $(VPY) -m pytest -m bench_smoke $(ARGS) || status=$$?; \
	if [ $$status -eq 5 ]; then \
	  echo "make bench-smoke: pytest collected no tests (exit 5); that is a failure" >&2; exit 1; fi; \
	exit $$status

# tests/gpu skip without CUDA; on CPU they still check their harness and their own expectations, so that
# a stale expectation is found here and not on the first GPU a session is lent.
gpu-on-cpu: $(STAMP)
	$(info DESLOC_GPU_TESTS_ON_CPU=1 $(VPY) -m pytest tests/gpu -q $(ARGS))
	@status=0; DESLOC_GPU_TESTS_ON_CPU=1 $(VPY) -m pytest tests/gpu -q $(ARGS) || status=$$?; \
	if [ $$status -eq 5 ]; then \
	  echo "make gpu-on-cpu: pytest collected no tests (exit 5); that is a failure" >&2; exit 1; fi; \
	exit $$status
