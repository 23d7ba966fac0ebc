# syntax=docker/dockerfile:1.7
#
# The pipelora-k8s trainer image: the chart runs it as the dataprep Job, the MPIJob launcher and the
# MPIJob workers (sshd as the non-root user `mpiuser`, uid 1000, port 2222, for the MPI Operator).
#
#   docker buildx build -t ghcr.io/pipelora/pipelora-k8s:0.1.0 .                                  # CUDA
#   docker buildx build --build-arg VARIANT=cpu -t ghcr.io/pipelora/pipelora-k8s:0.1.0-cpu .     # CPU
#
# VARIANT picks the runtime base: `cuda` (NVIDIA CUDA runtime + cuDNN, torch built for TORCH_CHANNEL)
# or `cpu` (a plain Python base with the CPU torch build; what the kind end-to-end workflow runs).
# TORCH_VERSION and DEEPSPEED_VERSION are the ones the Makefile installs for the test suite.

ARG VARIANT=cuda
ARG CUDA_BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG PYTHON_BASE=python:3.12-slim-bookworm
ARG TORCH_VERSION=2.13.0
ARG TORCH_CHANNEL=cu128
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
# builder: the project's own wheel (pure Python; the chart ships inside it as package data).
FROM ${PYTHON_BASE} AS builder
ARG PIP_VERSION
ARG SETUPTOOLS_VERSION
ARG WHEEL_VERSION
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
# Runtime bases: each provides a Python virtualenv at /opt/venv and nothing else.
FROM ${CUDA_BASE} AS base-cuda
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Ubuntu's release (the base tag) pins these; its archive drops superseded versions, so exact pins
# would break every rebuild after a security update.
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

FROM ${PYTHON_BASE} AS base-cpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DS_ACCELERATOR=cpu
RUN python -m venv /opt/venv

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
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PATH=/opt/venv/bin:${PATH} \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/home/mpiuser/.cache/huggingface

# Open MPI launches ranks over ssh; the workers run sshd. The distribution's release pins these (see
# above). Containers lack ptrace rights, so Open MPI's shared-memory transport must not use CMA.
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      openmpi-bin openssh-server openssh-client ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /run/sshd \
 && echo "btl_vader_single_copy_mechanism = none" >> /etc/openmpi/openmpi-mca-params.conf

# The heavy layers come before the user and ssh set-up, so editing those rebuilds little.
# torch first, from the build for this variant (a bare `torch` requirement pulls a CUDA build);
# DeepSpeed's build imports torch, so it is built against that torch, with no ops compiled ahead
# of time (they compile on first use where a toolchain exists). The build host has no GPU: name the
# accelerator DeepSpeed records at install time instead of letting it guess `cpu`.
RUN channel="${TORCH_CHANNEL}"; accelerator=cuda; \
    if [ "${VARIANT}" = cpu ]; then channel=cpu; accelerator=cpu; fi; \
    pip install --no-cache-dir "pip==${PIP_VERSION}" "setuptools==${SETUPTOOLS_VERSION}" \
      "wheel==${WHEEL_VERSION}" "packaging==${PACKAGING_VERSION}" \
 && pip install --no-cache-dir --index-url "https://download.pytorch.org/whl/${channel}" \
      "torch==${TORCH_VERSION}" \
 && DS_BUILD_OPS=0 DS_ACCELERATOR="${accelerator}" \
      pip install --no-cache-dir --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}" \
 && python -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)"

# uid/gid 1000 is the contract with the chart (and the MPI Operator's sshAuthMountPath); Ubuntu
# images ship a user `ubuntu` with that uid, which has to go first.
RUN if getent passwd 1000 >/dev/null; then userdel --remove "$(getent passwd 1000 | cut -d: -f1)"; fi \
 && if getent group 1000 >/dev/null; then groupdel "$(getent group 1000 | cut -d: -f1)"; fi \
 && groupadd --gid 1000 mpiuser \
 && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/mpiuser --shell /bin/bash mpiuser

# Inside the cluster the launcher reaches workers by pod DNS names that change every run: host keys
# cannot be known ahead, so the client does not check them (the MPI Operator's own images do the same).
COPY <<'EOF' /etc/ssh/ssh_config.d/50-pipelora.conf
Host *
    Port 2222
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    LogLevel ERROR
    ConnectionAttempts 10
EOF

# sshd runs as mpiuser (no root, no privileged port). Its config and host keys live in ~/.sshd
# because the MPI Operator mounts its Secret over ~/.ssh (sshAuthMountPath): that Secret holds the
# per-job client key and authorized_keys, and its key is also offered as a host key. The Secret's
# files are root-owned, hence StrictModes no. SetEnv gives the ranks Open MPI starts over ssh the
# image's PATH (ssh sessions do not inherit the container's environment).
COPY --chown=1000:1000 <<'EOF' /home/mpiuser/.sshd/sshd_config
Port 2222
PidFile /home/mpiuser/.sshd/sshd.pid
HostKey /home/mpiuser/.sshd/ssh_host_ed25519_key
HostKey /home/mpiuser/.sshd/ssh_host_ecdsa_key
HostKey /home/mpiuser/.ssh/id_rsa
AuthorizedKeysFile /home/mpiuser/.ssh/authorized_keys
StrictModes no
AllowUsers mpiuser
PermitRootLogin no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
X11Forwarding no
PrintMotd no
SetEnv PATH=/opt/venv/bin:/usr/local/nvidia/bin:/usr/local/cuda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LD_LIBRARY_PATH=/usr/local/nvidia/lib:/usr/local/nvidia/lib64
EOF

RUN ssh-keygen -q -t ed25519 -N "" -f /home/mpiuser/.sshd/ssh_host_ed25519_key \
 && ssh-keygen -q -t ecdsa -N "" -f /home/mpiuser/.sshd/ssh_host_ecdsa_key \
 && mkdir -p /home/mpiuser/.ssh /home/mpiuser/.cache \
 && chown -R 1000:1000 /home/mpiuser \
 && chmod 700 /home/mpiuser/.sshd /home/mpiuser/.ssh \
 && chmod 600 /home/mpiuser/.sshd/ssh_host_*_key

COPY --from=builder /dist/ /tmp/dist/
RUN pip install --no-cache-dir /tmp/dist/pipelora_k8s-*.whl \
      "transformers==${TRANSFORMERS_VERSION}" "peft==${PEFT_VERSION}" \
 && rm -rf /tmp/dist \
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
