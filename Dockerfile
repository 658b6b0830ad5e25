# One image for every process of the platform: dagster-webserver, dagster-daemon, the
# dagster-celery workers, Dagster's run workers, `mlops serve`, `mlops exporter` and the MLflow
# server. deploy/compose.yaml and deploy/helm/values.yaml pick the process by its command.
#
#   docker build -t mlops:$(git describe --tags) .
#
# Checked by hadolint in `make test` (tests/test_ci_files.py). The release workflow builds it
# on a v* tag and pushes it under the same tag (.github/workflows/release.yml).

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# --- build: the locked dependency set, installed with hashes into /opt/venv -------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_NO_CACHE=1 \
    UV_COMPILE_BYTECODE=1
# The same uv as the Makefile's (UV_VERSION), so the image resolves nothing the tests did not.
RUN pip install uv==0.13.8 \
    && python -m venv /opt/venv
WORKDIR /app
# Only the runtime lock (deploy/requirements-runtime.lock: requirements.lock less the dev and
# test tools, same pins, same hashes): a layer that changes only when the pins do.
COPY deploy/requirements-runtime.lock /tmp/requirements.lock
RUN uv pip sync --python /opt/venv/bin/python --require-hashes /tmp/requirements.lock
COPY pyproject.toml README.md workspace.yaml ./
COPY mlops ./mlops
COPY cli ./cli
COPY catalog ./catalog
COPY demo ./demo
COPY assets ./assets
COPY resources ./resources
COPY sensors ./sensors
COPY orchestration ./orchestration
COPY serving ./serving
COPY deploy ./deploy
COPY specs ./specs
# Editable: the platform finds its specs/ and state folder beside its code (mlops/settings.py,
# PROJECT_ROOT), so the code stays at /app in the runtime stage.
RUN uv pip install --python /opt/venv/bin/python --no-deps -e /app \
    && /opt/venv/bin/python -m compileall -q mlops cli catalog demo assets resources sensors \
       orchestration serving deploy

# --- runtime: no compiler, no uv, a non-root user -----------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="mlops" \
      org.opencontainers.image.description="Continuous training on Dagster assets: webserver, daemon, celery worker, run worker, mlops serve" \
      org.opencontainers.image.licenses="Apache-2.0"
# xgboost needs OpenMP's runtime; python:slim lacks it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1=12.2.0-14+deb12u1 \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 mlops \
    && useradd --system --uid 10001 --gid mlops --home-dir /app --shell /usr/sbin/nologin mlops
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=root:root /app /app
# Everything the platform writes by default (lake, SQLite stores, request logs, the default
# DAGSTER_HOME) is under /app/.mlops: the one writable folder, a volume in compose.
RUN mkdir -p /app/.mlops/dagster \
    && chown -R mlops:mlops /app/.mlops
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DAGSTER_HOME=/app/.mlops/dagster
WORKDIR /app
USER 10001:10001
VOLUME ["/app/.mlops"]
# 3000 dagster-webserver, 4000 the code server, 8000 mlops serve, 9108 mlops exporter,
# 5050 mlflow server. Each binds 127.0.0.1 unless its command says otherwise.
EXPOSE 3000 4000 8000 9108 5050
# No image-wide HEALTHCHECK: what "healthy" means is the process's (the webserver's
# /server_info, the service's /health/ready); deploy/compose.yaml checks each.
CMD ["mlops", "--help"]
