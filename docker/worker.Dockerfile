# A GPU worker: torch (CUDA build) + timm + the project (`pip install .[worker,s3]`), running
# `python -m workers.main` (RQ SimpleWorker: no fork after CUDA). Needs the NVIDIA container
# toolkit on the host (docker-compose.yml reserves a GPU for it).
#
#   docker build -f docker/worker.Dockerfile -t vitedit-worker .
#
# Base: nvidia/cuda's Ubuntu 24.04 image, whose python3 is 3.12 (the project needs >= 3.11; the
# Ubuntu 22.04 images give 3.10). The `base` flavour is enough: the torch wheels carry their own
# CUDA and cuDNN libraries; the image adds the driver hooks. Runs as the unprivileged user
# `vitedit` (uid 10001, as in the API image: both write the shared store volume).
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-base-ubuntu24.04

# --- the project as a wheel (pure Python; the sources stay out of the final image)
FROM python:3.11-slim AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY cli/ cli/
COPY models/ models/
COPY service/ service/
COPY workers/ workers/
RUN pip wheel --no-deps --wheel-dir /wheels .

# --- the worker
FROM ${CUDA_IMAGE}
# torch and torchvision from the PyTorch index for this CUDA (cu126 wheels run on drivers >= 525)
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu126
ARG TORCH_SPEC="torch==2.7.1 torchvision==0.22.1"
ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    VITEDIT_STORE=/data/store VITEDIT_REDIS_URL=redis://redis:6379/0 VITEDIT_DEVICE=auto \
    VITEDIT_METRICS_PORT=9101 VITEDIT_METRICS_ADDR=0.0.0.0

# Ubuntu's own python3 (3.12); a venv, as Ubuntu 24.04 refuses pip into the system Python
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
# hadolint ignore=DL3013
RUN pip install --index-url "$TORCH_INDEX" $TORCH_SPEC
COPY --from=wheel /wheels /wheels
# hadolint ignore=DL3013
RUN pip install "$(echo /wheels/vitedit-*.whl)[worker,s3]" && rm -rf /wheels \
    && groupadd --system --gid 10001 vitedit \
    && useradd --system --create-home --uid 10001 --gid 10001 vitedit \
    && mkdir -p /data/store && chown vitedit /data/store

USER 10001:10001
WORKDIR /home/vitedit
EXPOSE 9101
# healthy = the metrics port answers and the last heartbeat to Redis is fresh (workers/metrics.py);
# the start period covers importing torch and loading the registered models
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-m", "workers.metrics", "check"]
CMD ["python", "-m", "workers.main"]
