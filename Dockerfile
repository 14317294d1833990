# streamer worker image.
#   CPU (default):  docker build -t streamer:0.1.0 .
#   CUDA:           docker build -t streamer:0.1.0-cuda \
#                     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# CUDA wheels bundle the CUDA runtime (nvidia-* wheels), so the same slim base serves both; the
# host only needs the NVIDIA driver and container toolkit.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# ---- build: a venv with torch, the runtime deps and the package --------------------------------
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src

# torch first and on its own index: the largest layer, rebuilt only when the version changes.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# The other dependencies from pyproject.toml against a stub package (README.md stays a stub:
# setuptools only needs it to exist), so this layer is cached until pyproject.toml changes;
# torch is already satisfied and is not replaced from PyPI. confluent-kafka (the fast extra,
# pinned) lets the librdkafka client be chosen by environment alone (kafka.client).
COPY pyproject.toml ./
RUN mkdir -p streamer \
    && touch streamer/__init__.py README.md \
    && pip install --no-cache-dir . "confluent-kafka==2.16.1" \
    && pip uninstall --yes streamer \
    && rm -rf streamer build ./*.egg-info

COPY streamer/ streamer/
RUN pip install --no-cache-dir --no-deps . \
    && streamer --help > /dev/null

# ---- runtime -----------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="streamer" \
      org.opencontainers.image.description="Online per-sensor LSTM forecasting over Kafka" \
      org.opencontainers.image.licenses="Apache-2.0"
# NUMBA_CACHE_DIR: the compiled per-sensor loops are cached there on first use (the image's
# site-packages is read-only to the worker; Kubernetes mounts /tmp as an emptyDir).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NUMBA_CACHE_DIR=/tmp/numba-cache \
    STREAMER_CHECKPOINT__DIR=/var/lib/streamer/checkpoints \
    STREAMER_METRICS__PORT=9100

RUN groupadd --system --gid 10001 streamer \
    && useradd --system --uid 10001 --gid streamer --home-dir /var/lib/streamer \
       --shell /usr/sbin/nologin streamer \
    && mkdir -p /var/lib/streamer/checkpoints \
    && chown -R streamer:streamer /var/lib/streamer

COPY --from=build /opt/venv /opt/venv

USER 10001:10001
WORKDIR /var/lib/streamer
VOLUME ["/var/lib/streamer/checkpoints"]
EXPOSE 9100

# slim has no curl; urlopen raises (exit 1) on connection errors and on any non-2xx answer.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('STREAMER_METRICS__PORT', '9100') + '/healthz', timeout=4)"]

# Exec form: the worker is PID 1 and receives SIGTERM directly to commit and checkpoint.
ENTRYPOINT ["streamer"]
CMD ["run"]
