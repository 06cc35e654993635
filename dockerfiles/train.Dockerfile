# TaskVision training image: the Kubeflow pipeline's steps (validate, split, train,
# evaluate, register) run in it. KFP sets the container command itself
# (`python3 -m kfp.dsl.executor_main ...`, components are compiled with
# install_kfp_package=False), so the project and kfp must be installed here: nothing is
# installed at run time.
# Build from the repository root:
#   docker build -f dockerfiles/train.Dockerfile -t ghcr.io/taskvision/taskvision-train:0.1.0 .
FROM python:3.11-slim

# Empty: PyPI's default torch wheels, which on Linux x86_64 include CUDA, so the train
# step can fine-tune on the GPUs it requests (TASKVISION_TRAIN_GPU_COUNT). For a smaller
# CPU-only image: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_INDEX_URL=

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
    && cd / && python -c "import kfp, kfp.dsl.executor_main, components.train" \
    && rm -rf /src

WORKDIR /home/taskvision
USER 10001:10001
CMD ["python"]
