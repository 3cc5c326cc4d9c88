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
# --no-deps keeps torch out; every other runtime dependency comes from pyproject.toml itself, so the image
# cannot drift from the project's list.
RUN pip install --no-cache-dir --no-deps . \
 && python -c "import subprocess, sys, tomllib; deps = [d for d in tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'] if not d.startswith(('torch', 'safetensors'))]; subprocess.check_call([sys.executable, '-m', 'pip', 'install', '--no-cache-dir', *deps])"
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request;urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
CMD ["dgserve", "api", "--host", "0.0.0.0", "--port", "8000"]
