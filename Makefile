# qlora-kit. Thin on purpose: hyperparameters live in recipes/, stages in dvc.yaml.
# `make help` lists the targets. Every target that needs Python creates .venv from the lock.
.DEFAULT_GOAL := help
SHELL := /bin/bash
RECIPE ?= tiny
GPUS ?= 1
ACCELERATE_CONFIG ?=
# Read by the train stage (not recipe params: N processes keep the recipe's global batch and give
# the same result within tolerance, so dvc does not rerun train when they change).
export QLORA_KIT_GPUS := $(GPUS)
export QLORA_KIT_ACCELERATE_CONFIG := $(ACCELERATE_CONFIG)
PYTHON ?= python3
ifdef QLORA_KIT_IMAGE
# inside the Docker image: the environment is /opt/venv, installed from the same lock at build time
BIN := /opt/venv/bin
STAMP :=
else
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
endif
export PATH := $(BIN):$(PATH)
# DVC and HF libraries: no telemetry, no update checks
export DVC_NO_ANALYTICS := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false
STAGES := fetch preprocess train merge quantize evaluate

.PHONY: help setup reproduce serve test test-fast bench gpu-smoke clean $(STAGES)

help: ## list targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'
	@echo "  fetch preprocess train merge quantize evaluate: one stage of RECIPE (and what it needs)"
	@echo "  GPUS=N: train on N processes (torchrun); ACCELERATE_CONFIG=recipes/accelerate/<cfg>.yaml: DDP, FSDP-QLoRA, DeepSpeed ZeRO-2/3"
	@echo "  RECIPE=$(RECIPE) (recipes: $$(ls recipes/*.yaml | xargs -n1 basename | sed 's/.yaml//' | tr '\n' ' '))"

ifndef QLORA_KIT_IMAGE
$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "qlora-kit needs Python 3.11, found " + sys.version' 
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip==25.3
	# the CPU/laptop part of the lock; the CUDA-only block below its marker is for the image
	sed '/^# --- cuda/,$$d' requirements.lock > $(VENV)/requirements.cpu.txt
	$(BIN)/python -m pip install -q -r $(VENV)/requirements.cpu.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	$(BIN)/python -m qlora_kit.gguf.converter install
	touch $@
endif

setup: $(STAMP) ## create .venv from requirements.lock (idempotent)

# `enable NAME -- CMD`: NAME joins params.yaml's recipes; if CMD fails, that is undone
reproduce: $(STAMP) ## run RECIPE end to end through DVC (default: tiny, offline, CPU)
	$(BIN)/qlora-kit enable $(RECIPE) -- $(BIN)/dvc repro evaluate@$(RECIPE)
	@echo "report: reports/$(RECIPE)/report.md"

$(STAGES): $(STAMP) ## (each stage) run one stage of RECIPE and what it needs: make train RECIPE=komt
	$(BIN)/qlora-kit enable $(RECIPE) -- $(BIN)/dvc repro $@@$(RECIPE)

serve: $(STAMP) ## serve RECIPE's GGUF with an OpenAI-compatible API on 127.0.0.1 (GGUF=q4_k_m PORT=8000)
	$(BIN)/qlora-kit serve --recipe $(RECIPE) $(if $(GGUF),--gguf $(GGUF)) $(if $(PORT),--port $(PORT))

test: $(STAMP) ## the CI suite: every recipe on a tiny model, on the CPU
	$(BIN)/python -m pytest -q

test-fast: $(STAMP) ## the unit tier only (tests/unit): the edit loop, about two minutes
	$(BIN)/python -m pytest -q tests/unit

bench: $(STAMP) ## performance benchmarks (not part of make test); results in bench/README.md
	$(BIN)/python bench/run_all.py

gpu-smoke: $(STAMP) ## tiny recipe on CUDA in 4-bit and 8-bit: device, versions, timings (any NVIDIA machine)
	$(BIN)/python bench/gpu_smoke.py

clean: ## remove outputs of every recipe (data/*/, models/, reports/); keeps .venv and the DVC cache
	rm -rf data/*/ models reports

-include docker/docker.mk
