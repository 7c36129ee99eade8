# mmar — make test | make demo | make train | make eval | make bench
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
MODEL  ?= runs/digits
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test train eval demo clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest

$(MODEL)/model.safetensors: | install
	$(VENV)/bin/mmar train --config configs/digits.yaml --output_dir $(MODEL)

train: $(MODEL)/model.safetensors

eval: train
	$(VENV)/bin/mmar eval --model $(MODEL) --task digits --output $(MODEL)/metrics.json

# The demo issue adds the Gradio app; until then `make demo` trains the default model if needed and evaluates it.
demo: eval

clean:
	rm -rf $(VENV) runs .pytest_cache
