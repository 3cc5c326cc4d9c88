# GPU worker image: one process per card (CUDA_VISIBLE_DEVICES is set by `dgserve worker --gpu N`).
# torch is the version the Makefile installs (TORCH_SPEC) and pyproject.toml allows, as a CUDA wheel that
# bundles its CUDA libraries; the host only needs the driver and the NVIDIA container runtime.
FROM python:3.11-slim
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
WORKDIR /app
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md ./
COPY services ./services
COPY dgtext ./dgtext
COPY engine ./engine
COPY worker ./worker
COPY models ./models
# torch is already installed and satisfies pyproject's requirement, so pip keeps it.
RUN pip install --no-cache-dir .
EXPOSE 9400
CMD ["dgserve", "worker", "--gpu", "0"]
