# Slim API image: FastAPI + Redis + Celery client, no torch (the API sends Celery tasks by name).
FROM python:3.11-slim
WORKDIR /app
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY pyproject.toml README.md ./
COPY services ./services
COPY dgtext ./dgtext
COPY engine ./engine
COPY worker ./worker
COPY models ./models
# --no-deps keeps torch out; the API's own needs are listed explicitly.
RUN pip install --no-cache-dir --no-deps . \
 && pip install --no-cache-dir "celery[redis]>=5.4" "redis>=5.0" "pydantic>=2.6" "pydantic-settings>=2.2" \
    "fastapi>=0.110" "uvicorn>=0.29" "httpx>=0.27" "prometheus-client>=0.20" "tokenizers>=0.19" \
    "jinja2>=3.1" "huggingface-hub>=0.24"
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request;urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
CMD ["dgserve", "api", "--host", "0.0.0.0", "--port", "8000"]
