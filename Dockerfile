#
# The pipelora-k8s trainer image: the chart runs it as the dataprep Job, the MPIJob launcher and the
# MPIJob workers (sshd as the non-root user `mpiuser`, uid 1000, port 2222, for the MPI Operator).
#
#   docker buildx build -t ghcr.io/pipelora/pipelora-k8s:0.1.0 .                                  # CUDA
#   docker buildx build --build-arg VARIANT=cpu -t ghcr.io/pipelora/pipelora-k8s:0.1.0-cpu .     # CPU
#   scripts/build_image.sh            # CPU, with podman, where no registry can be pulled from
#
# VARIANT picks the runtime base: `cuda` (NVIDIA CUDA runtime + cuDNN, torch built for TORCH_CHANNEL)
# or `cpu` (Debian's slim image with Debian's Python and the CPU torch build; what the kind
# end-to-end workflow runs). Both install into a virtualenv at /opt/venv.
# TORCH_VERSION and DEEPSPEED_VERSION are the ones the Makefile installs for the test suite.
#
# The config files the image ships (ssh client, sshd) are files in image/, copied as they are.
# Build with podman as `podman build --format docker`: in the OCI format podman ignores SHELL,
# and the RUNs below rely on its pipefail.
#
# PIP_CERT and PIP_FIND_LINKS (empty by default) pass a CA bundle and a local wheel folder to pip
# where the build host reaches the package index only through a TLS proxy; the build mounts both
# (`podman build -v`), and a wheel folder that holds this torch build is used instead of PyTorch's
# index. scripts/build_image.sh takes both from `pip config list`.

ARG VARIANT=cuda
# The CUDA base and the torch index agree: torch 2.13.0 is built for CUDA 12.6 and 13.0 (13.0.2 with
# cuDNN 9.20 is its default, the build PyPI carries; since torch 2.12 there is no 12.8 build). The
# image takes that default: the CUDA 13.0.2 base and the cu130 index, so the CUDA and cuDNN
# libraries of the base are the release torch was built with (the torch wheel brings its own too).
# CUDA 13 needs NVIDIA driver 580 or newer on the nodes; for older drivers build with
# CUDA_BASE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 and TORCH_CHANNEL=cu126.
ARG CUDA_BASE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
ARG TORCH_CHANNEL=cu130
ARG DEBIAN_BASE=debian:bookworm-slim
ARG TORCH_VERSION=2.13.0
ARG DEEPSPEED_VERSION=0.19.8
ARG TRANSFORMERS_VERSION=5.24.0
ARG PEFT_VERSION=0.21.2
ARG PIP_VERSION=26.3
ARG SETUPTOOLS_VERSION=84.2.1
ARG WHEEL_VERSION=0.48.0
ARG PACKAGING_VERSION=26.4
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown

# ---------------------------------------------------------------------------------------------------
# Runtime bases: each provides the distribution's Python 3 with a virtualenv at /opt/venv (Debian's
# and Ubuntu's Python refuse system-wide pip installs) and nothing else. The distribution's release
# (the base tag) pins the packages; its archive drops superseded versions, so exact pins would break
# every rebuild after a security update.

# Debian bookworm's Python 3.11. Also the base of the stages that only read or package the project.
FROM ${DEBIAN_BASE} AS base-cpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
ENV DS_ACCELERATOR=cpu

# Ubuntu 24.04's Python 3.12.
FROM ${CUDA_BASE} AS base-cuda
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

# ---------------------------------------------------------------------------------------------------
# requirements: the project's dependencies, read from pyproject.toml alone, so that the layer that
# installs them is rebuilt when they change and not when the code does.
FROM base-cpu AS requirements
COPY pyproject.toml /src/pyproject.toml
RUN python3 -c 'import sys, tomllib; print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))' \
      /src/pyproject.toml > /requirements.txt

# ---------------------------------------------------------------------------------------------------
# builder: the project's own wheel (pure Python; the chart ships inside it as package data).
FROM base-cpu AS builder
ARG PIP_CERT=""
ARG PIP_FIND_LINKS=""
ARG PIP_VERSION
ARG SETUPTOOLS_VERSION
ARG WHEEL_VERSION
ENV PATH=/opt/venv/bin:${PATH} \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN pip install --no-cache-dir "pip==${PIP_VERSION}" "setuptools==${SETUPTOOLS_VERSION}" "wheel==${WHEEL_VERSION}"
COPY pyproject.toml README.md ./
COPY pipelora/ pipelora/
COPY dataprep/ dataprep/
COPY trainer/ trainer/
COPY workflow/ workflow/
COPY helm/ helm/
RUN pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /dist .

# ---------------------------------------------------------------------------------------------------
# runtime: Open MPI + sshd for the MPI Operator, torch, DeepSpeed and the project.
# base-${VARIANT} is one of the stages above, not an image from a registry (hence no tag).
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
ARG VARIANT
ARG TORCH_VERSION
ARG TORCH_CHANNEL
ARG DEEPSPEED_VERSION
ARG TRANSFORMERS_VERSION
ARG PEFT_VERSION
ARG PIP_VERSION
ARG SETUPTOOLS_VERSION
ARG WHEEL_VERSION
ARG PACKAGING_VERSION
ARG PIP_CERT=""
ARG PIP_FIND_LINKS=""
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PATH=/opt/venv/bin:${PATH} \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/home/mpiuser/.cache/huggingface

# Open MPI launches ranks over ssh; the workers run sshd. Containers lack ptrace rights, so Open MPI's
# shared-memory transport must not use CMA. The host keys openssh-server's installation generates
# go: a key baked into an image is shared by everyone who pulls it (the workers make their own).
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      openmpi-bin openssh-server openssh-client ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && rm -f /etc/ssh/ssh_host_*_key /etc/ssh/ssh_host_*_key.pub \
 && mkdir -p /run/sshd \
 && echo "btl_vader_single_copy_mechanism = none" >> /etc/openmpi/openmpi-mca-params.conf

# The heavy layers come first, each rebuilt only when its own pins change: torch, DeepSpeed, then
# the project's other dependencies; the project's code comes last.
# torch from the build for this variant (a bare `torch` requirement pulls a CUDA build). A wheel
# folder passed in PIP_FIND_LINKS that holds this very build stands in for PyTorch's index, and
# torch's own dependencies then come from PyPI.
RUN channel="${TORCH_CHANNEL}"; \
    if [ "${VARIANT}" = cpu ]; then channel=cpu; fi; \
    index="https://download.pytorch.org/whl/${channel}"; \
    for links in ${PIP_FIND_LINKS}; do \
      for wheel in "${links}/torch-${TORCH_VERSION}+${channel}"-*.whl; do \
        if [ -f "${wheel}" ]; then index="https://pypi.org/simple"; fi; \
      done; \
    done; \
    pip install --no-cache-dir "pip==${PIP_VERSION}" "setuptools==${SETUPTOOLS_VERSION}" \
      "wheel==${WHEEL_VERSION}" "packaging==${PACKAGING_VERSION}" \
 && pip install --no-cache-dir --index-url "${index}" "torch==${TORCH_VERSION}+${channel}" \
 && python -c "import torch; print('torch', torch.__version__)"

# DeepSpeed's build imports torch, so it is built against the torch above, with no ops compiled ahead
# of time (they compile on first use where a toolchain exists). The build host has no GPU: name the
# accelerator DeepSpeed records at install time instead of letting it guess `cpu`.
RUN accelerator=cuda; \
    if [ "${VARIANT}" = cpu ]; then accelerator=cpu; fi; \
    DS_BUILD_OPS=0 DS_ACCELERATOR="${accelerator}" \
      pip install --no-cache-dir --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}" \
 && python -c "import deepspeed; print('deepspeed', deepspeed.__version__)"

# The project's dependencies (pyproject.toml's list), with torch and DeepSpeed held where they are.
COPY --from=requirements /requirements.txt /tmp/requirements.txt
RUN pip list --format=freeze | grep -iE '^(torch|deepspeed)==' > /tmp/installed.txt \
 && pip install --no-cache-dir -c /tmp/installed.txt -r /tmp/requirements.txt \
      "transformers==${TRANSFORMERS_VERSION}" "peft==${PEFT_VERSION}" \
 && rm /tmp/requirements.txt /tmp/installed.txt

# uid/gid 1000 is the contract with the chart (and the MPI Operator's sshAuthMountPath); Ubuntu
# images ship a user `ubuntu` with that uid, which has to go first.
RUN if getent passwd 1000 >/dev/null; then userdel --remove "$(getent passwd 1000 | cut -d: -f1)"; fi \
 && if getent group 1000 >/dev/null; then groupdel "$(getent group 1000 | cut -d: -f1)"; fi \
 && groupadd --gid 1000 mpiuser \
 && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/mpiuser --shell /bin/bash mpiuser

# The ssh client's and sshd's settings (see the files). ~/.sshd holds sshd's config, and the host
# keys the worker entrypoint generates at start: it belongs to mpiuser, who alone may read it.
# /run/pipelora is the worker's runtime folder (ready file, the ranks' relay; an emptyDir in the
# chart), here too so that the worker also runs in a bare container.
COPY image/ssh_config /etc/ssh/ssh_config.d/50-pipelora.conf
COPY --chown=1000:1000 image/sshd_config /home/mpiuser/.sshd/sshd_config
RUN mkdir -p /home/mpiuser/.ssh /home/mpiuser/.cache /run/pipelora \
 && chown -R 1000:1000 /home/mpiuser \
 && chown 1000:1000 /run/pipelora \
 && chmod 700 /home/mpiuser/.sshd /home/mpiuser/.ssh \
 && chmod 600 /home/mpiuser/.sshd/sshd_config

COPY --from=builder /dist/ /tmp/dist/
RUN pip install --no-cache-dir --no-deps /tmp/dist/pipelora_k8s-*.whl \
 && rm -rf /tmp/dist \
 && pip check \
 && pipelora-k8s --version

# Last: these change with every commit, and an ARG's new value invalidates every later layer.
ARG VERSION
ARG REVISION
ARG CREATED
LABEL org.opencontainers.image.title="pipelora-k8s" \
      org.opencontainers.image.description="Pipeline-parallel LoRA fine-tuning of decoder LLMs with DeepSpeed, as a Kubernetes batch workflow" \
      org.opencontainers.image.source="https://github.com/pipelora/pipelora-k8s" \
      org.opencontainers.image.url="https://github.com/pipelora/pipelora-k8s" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="pipelora" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}"

USER 1000:1000
WORKDIR /home/mpiuser
EXPOSE 2222
ENTRYPOINT ["pipelora-k8s"]
CMD ["--help"]
