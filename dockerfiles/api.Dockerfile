# TaskVision control plane: `taskvision serve` (FastAPI) on port 8000.
# Build from the repository root:
#   docker build -f dockerfiles/api.Dockerfile -t ghcr.io/taskvision/taskvision-api:0.1.0 .
FROM python:3.11-slim

# The control plane never imports torch, but the project depends on it: take the CPU-only
# wheels (much smaller than the CUDA ones). Pass an empty value to use PyPI's default wheels.
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
EXPOSE 8000
ENTRYPOINT ["taskvision"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
