# syntax=docker/dockerfile:1.7
# Backend + worker image (CPU or GPU host). The engine runs in its own container: the official vLLM
# OpenAI server image on GPU, Dockerfile.engine-cpu on CPU (see docker-compose.yml). Install steps are
# scripts/setup.sh's, the same ones `make run`/`make test` use.
ARG PYTHON_IMAGE=python:3.11.10-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# The embedded model's checkpoint is written at run time into the shared volume (compose: model-init).
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 DATAENGINE_SKIP_ENGINE_SETUP=1 DATAENGINE_SKIP_MODEL_SETUP=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY scripts/setup.sh scripts/setup.sh
COPY backend backend
COPY training training
COPY dataengine dataengine
COPY label_config label_config
RUN scripts/setup.sh app

FROM ${PYTHON_IMAGE}
RUN useradd --create-home --uid 10001 --user-group dataengine
WORKDIR /app
COPY --from=build --chown=10001:10001 /app /app
# MODEL_DIR is the volume the worker writes adapters to and the engine reads them from (same path in
# every container, see docker-compose.yml); the worker's Hugging Face cache lives there too.
ENV PATH=/app/.venv/bin:$PATH \
    MODEL_DIR=/data \
    HF_HOME=/data/hf-cache \
    DATAENGINE_PORT=9090 \
    PYTHONUNBUFFERED=1
RUN mkdir -p /data/hf-cache && chown -R 10001:10001 /data
USER 10001
EXPOSE 9090
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9090/health', timeout=4).status == 200 else 1)"]
CMD ["dataengine", "serve"]
