# docker/docker.mk: the Docker targets of qlora-kit (docker/README.md explains them).
# Included from the top-level Makefile (`include docker/docker.mk`); works alone as well:
#   make -f docker/docker.mk docker-build
#
# Secrets: the container gets HF_TOKEN (and any name in DOCKER_PASS_ENV) as `-e NAME`, so docker
# copies the value from this process's environment. No value is ever expanded into a command
# line, a build argument, a file or an image layer; tests/test_docker.py checks `make -n`.

# Resolved from this file's own path, so the targets work from any directory and when included.
QK_DOCKER_DIR := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
QK_REPO_ROOT := $(patsubst %/,%,$(dir $(QK_DOCKER_DIR)))
QK_LOCK := $(QK_REPO_ROOT)/requirements.lock
QK_VERSION := $(shell sed -n 's/^version *= *"\([^"]*\)".*/\1/p' '$(QK_REPO_ROOT)/pyproject.toml' 2>/dev/null | head -n 1)

DOCKER ?= docker
IMAGE ?= qlora-kit:$(if $(QK_VERSION),$(QK_VERSION),dev)
RECIPE ?= tiny

# The container runs as the calling user, so files it writes into the repo and the caches are
# owned by that user. The image's own user gets the same UID/GID at build time; root cannot be
# re-created as a user, so a root caller builds it as 1000 and runs as root.
HOST_UID := $(shell id -u)
HOST_GID := $(shell id -g)
DOCKER_APP_UID := $(if $(filter 0,$(HOST_UID)),1000,$(HOST_UID))
DOCKER_APP_GID := $(if $(filter 0,$(HOST_GID)),1000,$(HOST_GID))

# Host directories mounted as the image's cache volumes (created first, so docker does not
# create them owned by root).
HF_HOME_HOST ?= $(if $(HF_HOME),$(HF_HOME),$(HOME)/.cache/huggingface)
DVC_CACHE_HOST ?= $(HOME)/.cache/qlora-kit-dvc

DOCKER_GPUS ?= --gpus all
# Names only: docker reads each value from the environment of `make`. Add, e.g., the judge's
# API key name here: make docker-reproduce DOCKER_PASS_ENV="HF_TOKEN OPENAI_API_KEY"
DOCKER_PASS_ENV ?= HF_TOKEN HF_HUB_OFFLINE QLORA_KIT_GPUS QLORA_KIT_ACCELERATE_CONFIG
# Extra `docker build` options, e.g. DOCKER_BUILD_ARGS="--build-arg CUDA_ARCHITECTURES=89"
DOCKER_BUILD_ARGS ?=

# A NAME=value entry would put the value on the command line (and in `ps`); refuse it without
# echoing it.
$(foreach v,$(DOCKER_PASS_ENV),$(if $(findstring =,$(v)),$(error DOCKER_PASS_ENV takes variable names only (NAME, never NAME=value))))

# Labels recording the versions, read from the lock at build time (no second list): every
# package named here, the lock's sha256 and the kit's version. `+cpu` is the CPU build's local
# label; the image installs the same version from PyPI (docker/cuda-pins.py select).
DOCKER_LABEL_PKGS := torch transformers peft bitsandbytes trl accelerate datasets dvc \
	huggingface-hub llama-cpp-python nvidia-cuda-runtime nvidia-cublas nvidia-cudnn-cu13 triton
qk_lock_version = $(shell sed -n 's/^$(subst -,[-_.],$(1))==\([^ ;\#]*\).*/\1/Ip' '$(QK_LOCK)' 2>/dev/null | sed 's/+cpu$$//' | head -n 1)
DOCKER_LABELS = --label io.qlora-kit.version=$(QK_VERSION) \
	--label io.qlora-kit.lock-sha256=$(shell sha256sum '$(QK_LOCK)' 2>/dev/null | cut -c 1-64) \
	$(foreach p,$(DOCKER_LABEL_PKGS),--label io.qlora-kit.pkg.$(p)=$(call qk_lock_version,$(p)))

DOCKER_TTY := $(shell [ -t 0 ] && [ -t 1 ] && echo --interactive --tty)

# $(1): extra `docker run` options. The repo is mounted where the image's editable install
# expects it, so the mounted source runs against the image's pinned environment.
qk_docker_run = $(DOCKER) run --rm $(1) $(DOCKER_GPUS) --ipc=host \
	--user $(HOST_UID):$(HOST_GID) \
	$(foreach v,$(DOCKER_PASS_ENV),-e $(v)) \
	--volume '$(QK_REPO_ROOT):/workspace' --workdir /workspace \
	--volume '$(HF_HOME_HOST):/cache/hf' \
	--volume '$(DVC_CACHE_HOST):/cache/dvc' \
	$(IMAGE)

.PHONY: docker-build docker-reproduce docker-shell docker-test docker-cache-dirs

docker-build: ## build the pinned CUDA image (IMAGE=qlora-kit:<version>) from requirements.lock
	DOCKER_BUILDKIT=1 $(DOCKER) build --file '$(QK_DOCKER_DIR)/Dockerfile' \
		--build-arg APP_UID=$(DOCKER_APP_UID) --build-arg APP_GID=$(DOCKER_APP_GID) \
		$(DOCKER_LABELS) $(DOCKER_BUILD_ARGS) --tag $(IMAGE) '$(QK_REPO_ROOT)'

docker-reproduce: docker-cache-dirs ## run RECIPE end to end inside the image on this host's GPUs
	$(call qk_docker_run,$(DOCKER_TTY)) make reproduce RECIPE='$(RECIPE)'

docker-shell: docker-cache-dirs ## open a shell in the image (repo and caches mounted)
	$(call qk_docker_run,--interactive --tty) bash

# The CPU test suite needs neither the Hub nor a token; the GPUs are still passed because the
# CUDA build of llama.cpp links libcuda.so.1, which only the NVIDIA runtime provides.
docker-test: ## run `make test` inside the image
	$(DOCKER) run --rm $(DOCKER_GPUS) --ipc=host --user $(HOST_UID):$(HOST_GID) \
		-e HF_HUB_OFFLINE=1 --volume '$(QK_REPO_ROOT):/workspace' --workdir /workspace \
		$(IMAGE) make test

docker-cache-dirs:
	mkdir -p '$(HF_HOME_HOST)' '$(DVC_CACHE_HOST)'
