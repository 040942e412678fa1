# syntax=docker/dockerfile:1.7
# rnnserve trainer image: torch for `rnn-train` and `rnn-export`, writing checkpoints to /runs and
# exported versions into the model repository at /models (the volume the server serves).
#
#   docker build -f docker/trainer.Dockerfile -t rnnserve/trainer:0.1.0 .
#   docker build -f docker/trainer.Dockerfile --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 \
#       -t rnnserve/trainer:0.1.0-cuda .      # CUDA torch for `rnn-train --device cuda`

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    PIP_ROOT_USER_ACTION=ignore \
    EDITABLE=0
# torch==2.13.0 (pinned in pyproject) is taken from this extra index: PyTorch's CPU build by default,
# because the PyPI wheel drags in ~3 GB of CUDA libraries a CPU trainer never loads. pip prefers the
# local version 2.13.0+cpu over PyPI's 2.13.0. Empty = PyPI's default (CUDA) wheel.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY pyproject.toml README.md ./
COPY scripts/install.sh scripts/install.sh
COPY protos protos
COPY trainer trainer
COPY client client
COPY server server
RUN --mount=type=cache,target=/root/.cache/pip \
    PIP_EXTRA_INDEX_URL="${TORCH_INDEX_URL}" scripts/install.sh /opt/venv train

FROM ${PYTHON_IMAGE} AS trainer
# A C compiler: trainer/fused.c (the LSTM's per-step kernels) is built at first use with -march=native,
# for the CPU the job runs on, so it cannot be built here. Without one the LSTM trains on torch ops, slower.
# gcc and libc6-dev follow the base image's libc: pinning them would break at each Debian point release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
# The same UID/GID as the server image: both write the shared model volume.
ARG UID=10001
ARG GID=10001
RUN groupadd --system --gid "${GID}" rnnserve \
 && useradd --system --no-log-init --uid "${UID}" --gid rnnserve \
        --home-dir /nonexistent --shell /usr/sbin/nologin rnnserve \
 && install -d -o rnnserve -g rnnserve /models /runs /data
COPY --from=build /opt/venv /opt/venv
# The default corpus, so `docker compose --profile train run train` works with no bind mount.
COPY --chown=rnnserve:rnnserve data/tinyshakespeare.txt /data/tinyshakespeare.txt
# The shipped models too: Docker seeds an empty named volume from whichever image mounts it first, so
# a job run before the server's first start must not leave the shared `models` volume without them.
COPY --chown=rnnserve:rnnserve models/ /models/
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MPLBACKEND=Agg \
    MPLCONFIGDIR=/tmp/matplotlib \
    HOME=/tmp
WORKDIR /runs
USER ${UID}:${GID}
CMD ["rnn-train", "--help"]
