# TaskVision predictor: a KServe ModelServer for model bundles (`python -m serving`).
# KServe's ServingRuntime (manifests/base/servingruntime.yaml) passes the arguments:
#   --model-dir=/mnt/models --model_name=<InferenceService name> --http_port=8080
# Build from the repository root:
#   docker build -f dockerfiles/serving.Dockerfile -t ghcr.io/taskvision/taskvision-serving:0.1.0 .
FROM python:3.11-slim

# Serving runs on CPU (ONNX Runtime): take the CPU-only torch wheels.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 taskvision \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/taskvision taskvision

WORKDIR /src
COPY pyproject.toml README.md ./
COPY taskvision ./taskvision
COPY api ./api
COPY pipelines ./pipelines
COPY components ./components
COPY serving ./serving
RUN pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} . \
    && rm -rf /src

WORKDIR /home/taskvision
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["python", "-m", "serving"]
