# GPU worker image: one process per card (CUDA_VISIBLE_DEVICES is set by `dgserve worker --gpu N`).
FROM pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime
WORKDIR /app
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY pyproject.toml README.md ./
COPY services ./services
COPY dgtext ./dgtext
COPY engine ./engine
COPY worker ./worker
COPY models ./models
# torch comes from the base image; pip keeps it because it satisfies torch>=2.4.
RUN pip install --no-cache-dir .
EXPOSE 9400
CMD ["dgserve", "worker", "--gpu", "0"]
