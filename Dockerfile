# syntax=docker/dockerfile:1
# batchserve on one NVIDIA GPU. Build: docker build -t batchserve .
# The CUDA runtime base brings the CUDA user-space libraries; the host brings the driver
# (NVIDIA Container Toolkit). Model weights live in the /models volume (HF_HOME).
ARG CUDA_IMAGE=nvidia/cuda:12.4.1-runtime-ubuntu22.04

FROM ${CUDA_IMAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

FROM base AS build
# Optional: a PyTorch wheel index matching the host driver, e.g.
# --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124
ARG TORCH_INDEX_URL=""
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
RUN if [ -n "$TORCH_INDEX_URL" ]; then pip install --index-url "$TORCH_INDEX_URL" torch; fi
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install ".[gpu]"

FROM base AS runtime
COPY --from=build /opt/venv /opt/venv
RUN groupadd --system --gid 10001 batchserve \
    && useradd --system --uid 10001 --gid batchserve --home-dir /home/batchserve \
       --create-home --shell /usr/sbin/nologin batchserve \
    && mkdir -p /models \
    && chown batchserve:batchserve /models
ENV PATH=/opt/venv/bin:$PATH \
    HF_HOME=/models \
    BATCHSERVE_PORT=8000
VOLUME ["/models"]
USER batchserve
WORKDIR /home/batchserve
EXPOSE 8000
# Ready means loaded, warmed and admitting; model download and warm-up can take minutes.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; url = 'http://127.0.0.1:%s/readyz' % os.environ.get('BATCHSERVE_PORT', '8000'); sys.exit(0 if urllib.request.urlopen(url, timeout=4).status == 200 else 1)"]
CMD ["batchserve", "serve", "--host", "0.0.0.0"]
