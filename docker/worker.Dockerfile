# A GPU worker: torch + timm + the whole package, running `python -m workers.main` (rq
# SimpleWorker: no fork after CUDA). Needs the NVIDIA container runtime (`gpus: all` in compose).
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 \
    VITEDIT_STORE=/data/store VITEDIT_REDIS_URL=redis://redis:6379/0 VITEDIT_DEVICE=auto

RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY models/ models/
COPY workers/ workers/
COPY service/ service/
# torch wheels with CUDA come from the PyTorch index; everything else from PyPI.
RUN pip3 install --extra-index-url https://download.pytorch.org/whl/cu124 ".[worker]"

RUN useradd --create-home vitedit && mkdir -p /data/store && chown vitedit /data/store
USER vitedit
CMD ["python3", "-m", "workers.main"]
