# The API process: FastAPI + the queue client, torch-free (`pip install .[api,s3]`): it checks images
# with Pillow, reads manifests, enqueues JSON jobs and streams files from the store.
#
#   docker build -f docker/api.Dockerfile -t vitedit-api .
#
# Runs as the unprivileged user `vitedit` (uid and gid 10001, as in the worker image: both write
# the shared store volume).

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

# --- the API
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VITEDIT_STORE=/data/store VITEDIT_REDIS_URL=redis://redis:6379/0
COPY --from=wheel /wheels /wheels
# the local wheel by its path (a name could resolve to another package on the index)
# hadolint ignore=DL3013
RUN pip install "$(echo /wheels/vitedit-*.whl)[api,s3]" && rm -rf /wheels \
    && groupadd --system --gid 10001 vitedit \
    && useradd --system --create-home --uid 10001 --gid 10001 vitedit \
    && mkdir -p /data/store && chown vitedit /data/store
USER 10001:10001
WORKDIR /home/vitedit
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
# one process per container (metrics are per process): scale with more API containers
CMD ["uvicorn", "--factory", "service.main:create_app", "--host", "0.0.0.0", "--port", "8000", \
     "--proxy-headers", "--no-server-header"]
