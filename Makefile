# Two commands: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DS_ACCELERATOR ?= cpu
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true
export PYTHONUNBUFFERED := 1

.PHONY: demo test install clean docs gpu-check gpu-wheels text-experiment search-experiment

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash launch/demo.sh

# The real-text benchmark (README, "Real text"): needs Debian's fortunes or DKD_TEXT_CORPUS.
text-experiment: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash launch/text_experiment.sh

# Student search on the synthetic default (README, "Student search").
search-experiment: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash launch/search_experiment.sh

test: $(STAMP)
	$(BIN)/python -m pytest tests

# On a CUDA machine: CUDA tests + the softmax bench on CUDA (README, "GPU check").
gpu-check:
	bash launch/gpu_check.sh

# Here, before a GPU run: the wheels a GPU machine without a package index lacks (.whl/).
gpu-wheels: $(STAMP)
	bash launch/gpu_wheels.sh

docs: $(STAMP)
	$(BIN)/python -m dkd.config   # regenerate the README's config table

clean:
	rm -rf runs .pytest_cache
