# Quick start:  make run   (embedded default end to end)      make test   (the test suite)
# Both create .venv and install the pinned stack on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: setup run test test-slow
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# DeepSpeed JIT-builds its CPU shared-memory comm op (ninja) the first time a process group
	# starts on a CPU machine (minutes, once); build it here so the first training stage doesn't.
	# Same build folder and ninja as the pipeline and the tests (pipeline/process_env.py).
	$(PY) -c "from pipeline.process_env import setup_process_env; setup_process_env(); \
	  from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load()" >/dev/null 2>&1 || true
	touch $@

run: setup
	$(PY) pipeline/main.py $(ARGS)

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow
