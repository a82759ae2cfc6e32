# Two commands for a fresh machine:
#   make run    set everything up, then run the main job
#   make test   set everything up, then run the test suite (what .ci/run calls)
VENV ?= .venv
PY := $(VENV)/bin/python
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: setup run test clean

setup: $(VENV)/.installed

# torch is pinned (2.13.0, CPU build); installing it first keeps pip from pulling CUDA wheels.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(FIND_LINKS) torch==2.13.0
	$(PY) -m pip install -q $(FIND_LINKS) -e ".[dev]"
	touch $@

run: setup
	$(PY) examples/quickstart.py

test: setup
	$(VENV)/bin/pytest -q tests

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
