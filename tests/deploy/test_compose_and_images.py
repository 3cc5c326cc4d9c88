"""docker-compose.yml and the Dockerfiles as an operator reads them: restarts, auth, secrets, caches and
versions that agree with pyproject.toml and the Makefile."""

from __future__ import annotations

import re

import tomllib
import yaml
from packaging.specifiers import SpecifierSet

from services.settings import REPO_ROOT

COMPOSE = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def test_api_and_workers_restart_and_share_hf_token_and_cache():
    for name in ("api", "worker"):
        service = SERVICES[name]
        assert service["restart"] == "unless-stopped"
        assert service["environment"]["HF_TOKEN"] == "${HF_TOKEN:-}"
        assert service["environment"]["HF_HOME"] == "/hf" and "hf-cache:/hf" in service["volumes"]


def test_auth_is_on_by_default_and_nothing_is_published_beyond_loopback_unless_asked():
    keys = SERVICES["api"]["environment"]["DGSERVE_API_KEYS"]
    assert keys.startswith("${DGSERVE_API_KEYS:?"), keys  # compose refuses to start without keys
    assert SERVICES["api"]["ports"] == ["${DGSERVE_PUBLISH_ADDRESS:-127.0.0.1}:8000:8000"]
    for name in ("prometheus", "grafana"):
        assert all(port.startswith("127.0.0.1:") for port in SERVICES[name]["ports"]), name


def test_grafana_has_no_anonymous_admin():
    env = SERVICES["grafana"]["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert env["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")


def test_image_tags_and_torch_agree_with_pyproject_and_makefile():
    version = PYPROJECT["project"]["version"]
    assert SERVICES["api"]["image"] == f"dgserve-api:{version}"
    assert SERVICES["worker"]["image"] == f"dgserve-worker:{version}"
    makefile_torch = re.search(r"^TORCH_SPEC \?= torch==(\S+)$", (REPO_ROOT / "Makefile").read_text(), re.M).group(1)
    worker_file = (REPO_ROOT / "deploy" / "docker" / "worker.Dockerfile").read_text()
    image_torch = re.search(r"^ARG TORCH_VERSION=(\S+)$", worker_file, re.M).group(1)
    assert image_torch == makefile_torch
    torch_spec = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch"))
    assert image_torch in SpecifierSet(torch_spec.removeprefix("torch"))
    api_file = (REPO_ROOT / "deploy" / "docker" / "api.Dockerfile").read_text()
    assert "tomllib.load(open('pyproject.toml'" in api_file  # the API image installs pyproject's own list
    k8s = (REPO_ROOT / "deploy" / "k8s" / "dgserve.yaml").read_text()
    assert f"image: dgserve-api:{version}" in k8s and f"image: dgserve-worker:{version}" in k8s


def test_worker_health_reads_its_heartbeat_and_prometheus_scrapes_redis():
    worker = SERVICES["worker"]
    assert worker["healthcheck"]["test"][:4] == ["CMD", "python", "-m", "worker.heartbeat_probe"]
    assert worker["environment"]["DGSERVE_WORKER_HEARTBEAT_FILE"]
    assert "redis-exporter" in SERVICES
    conf = (REPO_ROOT / "deploy" / "redis" / "redis.conf").read_text()
    assert re.search(r"^maxmemory \d+[kmg]b$", conf, re.M) and "maxmemory-policy noeviction" in conf
