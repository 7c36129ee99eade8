# mmar — make test | make demo | make train | make eval | make bench
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
MODEL  ?= runs/digits
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test train eval demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[dev,demo]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -rfEs

$(MODEL)/model.safetensors: | install
	$(VENV)/bin/mmar train --config configs/digits.yaml --output_dir $(MODEL)

train: $(MODEL)/model.safetensors

eval: train
	$(VENV)/bin/mmar eval --model $(MODEL) --task digits --output $(MODEL)/metrics.json

# `make demo`: trains the default model if $(MODEL) holds none yet, then serves the Gradio demo
# on http://127.0.0.1:7860 (e.g. make demo DEMO_ARGS="--port 8080").
DEMO_ARGS ?=
demo: train
	$(VENV)/bin/mmar demo --model $(MODEL) $(DEMO_ARGS)

# `make bench`: every benchmark, each rewriting its section of BENCHMARKS.md (about 2 hours on 2 cores, most
# of it training the models they compare; run it on an otherwise idle machine: the timings are only as quiet
# as the machine). The [bench] extra brings the peers (transfusion-pytorch; autoregressive-diffusion-pytorch
# without its accelerate<=1.6 pin, see pyproject.toml).
bench: install
	$(PIP) install -q -e ".[bench]"
	$(PIP) install -q --no-deps "autoregressive-diffusion-pytorch==0.4.0"
	$(PY) benchmarks/digits_quality.py --output_dir runs/bench-digits
	$(PY) benchmarks/orthus_table.py --runs runs
	$(PY) benchmarks/scenes_quality.py --model runs/scenes
	$(PY) benchmarks/sampling_steps.py --model runs/bench-digits
	test -d runs/bench-digits-fast || $(VENV)/bin/mmar distill-head --model runs/bench-digits --output runs/bench-digits-fast
	test -d runs/bench-digits-fast-emb || $(VENV)/bin/mmar distill-head --model runs/bench-digits --output runs/bench-digits-fast-emb --embedded_guidance true
	$(PY) benchmarks/generation_speed.py --model runs/bench-digits --fast runs/bench-digits-fast-emb runs/bench-digits-fast --flow_frozen 600 --recipe configs/digits.yaml --compile --speculative 2 4 --peers ard transfusion
	test -f runs/digits-flow/model.safetensors || $(VENV)/bin/mmar train --config configs/digits-flow.yaml --output_dir runs/digits-flow
	$(PY) benchmarks/flow_vs_diffusion.py --diffusion runs/digits-2x2 --flow runs/digits-flow
	$(PY) benchmarks/peers.py --budget seconds
	$(PY) benchmarks/peers.py --budget flops
	$(PY) benchmarks/image_sizes.py --config configs/digits-sizes-large.yaml --num_threads 1
	$(PY) benchmarks/roundtrip.py
	$(PY) benchmarks/speed.py
	$(PY) benchmarks/finetune.py
	$(PY) benchmarks/robustness.py

clean:
	rm -rf $(VENV) runs .pytest_cache
