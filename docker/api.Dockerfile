# The API process: FastAPI + the queue client. No torch, no timm: it validates images with Pillow,
# reads manifests, enqueues JSON jobs and streams files from the store.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    VITEDIT_STORE=/data/store VITEDIT_REDIS_URL=redis://redis:6379/0

WORKDIR /app
# Only what the API imports (service, workers' torch-free modules, models.errors/store).
RUN pip install "fastapi>=0.115" "uvicorn[standard]>=0.30" "python-multipart>=0.0.9" \
        "pydantic>=2.7" "pydantic-settings>=2.3" "redis>=5" "rq>=2.3,<3" "pillow>=10" \
        "httpx>=0.27"
COPY service/ service/
COPY workers/ workers/
COPY models/__init__.py models/errors.py models/
COPY models/store/ models/store/

RUN useradd --create-home vitedit && mkdir -p /data/store && chown vitedit /data/store
USER vitedit
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s \
    CMD python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/healthz')"
CMD ["uvicorn", "--factory", "service.main:create_app", "--host", "0.0.0.0", "--port", "8000"]
