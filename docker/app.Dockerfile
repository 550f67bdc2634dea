# syntax=docker/dockerfile:1
# prefloop's app image: the REST API, the labeling UI, the admin view and the store (SQLite or
# PostgreSQL). No torch, transformers, ray, vllm or deepspeed: the policy is served by an upstream
# OpenAI-compatible server (the vLLM service in docker/compose.yaml), training runs in the
# trainer image (docker/trainer.Dockerfile).
#
#   docker build -f docker/app.Dockerfile -t prefloop-app:0.1.0 .        # from the repo root
#   docker run --rm -p 127.0.0.1:8000:8000 -v prefloop-data:/data prefloop-app:0.1.0
#
# Without PREFLOOP_DB_URL the store is a SQLite file in the /data volume.

FROM python:3.11.13-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY . .
# The project itself (its dependencies are the ranges in pyproject.toml; there is no lock file),
# then the point of this image: the build fails if anything pulled torch or another heavy stack in.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[app,judge]" \
    && python -c "import importlib.util as u, sys; heavy = [m for m in ('torch', 'transformers', \
'ray', 'vllm', 'deepspeed', 'triton') if u.find_spec(m)]; sys.exit(f'heavy: {heavy}' if heavy else 0)"

FROM python:3.11.13-slim-bookworm
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PREFLOOP_DATA_DIR=/data \
    GRADIO_ANALYTICS_ENABLED=False
# A fixed uid/gid shared with the trainer image, so both can write the shared /data volume.
RUN groupadd --system --gid 10001 prefloop \
    && useradd --system --uid 10001 --gid prefloop --home-dir /data --no-create-home prefloop \
    && mkdir -p /data \
    && chown prefloop:prefloop /data
COPY --from=build /opt/venv /opt/venv
COPY --chmod=0755 docker/app-entrypoint.sh /usr/local/bin/prefloop-app-entrypoint
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
ENTRYPOINT ["prefloop-app-entrypoint"]
