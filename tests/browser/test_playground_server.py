"""The server side of the playground, without a browser (these never skip): the page and its files served
from the package, offline; the model defaults inlined; the worker load that /readyz shows the service panel.
The API runs under uvicorn on a real redis-server (tests/conftest.py's session server)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path

import httpx
import pytest
import tomllib

from services.api.app import create_app
from services.api.routes_playground import CONFIG_PLACEHOLDER, PLAYGROUND_DIR
from services.jobs import JobStore
from services.settings import Settings
from tests.support.api_server import serve_in_thread
from worker.metrics import MetricLabels, WorkerMetrics

REPO_ROOT = Path(__file__).resolve().parents[2]
EMBEDDED_MODEL = REPO_ROOT / "models" / "dgtiny"
CONFIG_SCRIPT = re.compile(r'<script type="application/json" id="dgserve-config">(.*?)</script>', re.S)


def playground_settings(redis_url: str, **overrides: object) -> Settings:
    return Settings(redis_url=redis_url, model=str(EMBEDDED_MODEL), queue_name="dgemma.playground-test", **overrides)


@pytest.fixture
def api(fresh_redis_url: str) -> Iterator[httpx.Client]:
    with serve_in_thread(create_app(playground_settings(fresh_redis_url))) as url, \
            httpx.Client(base_url=url, timeout=10) as client:
        yield client


def page_config(html: str) -> dict:
    match = CONFIG_SCRIPT.search(html)
    assert match, "the page carries no configuration"
    return json.loads(match.group(1))


@pytest.mark.parametrize("path", ["/", "/playground"])
def test_the_page_is_served_with_the_models_defaults(api: httpx.Client, path: str) -> None:
    response = api.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert CONFIG_PLACEHOLDER not in response.text
    config = page_config(response.text)
    generation = json.loads((EMBEDDED_MODEL / "generation_config.json").read_text())
    assert config["model"] == "dgtiny" and config["authEnabled"] is False
    assert config["defaults"]["max_new_tokens"] == generation["max_new_tokens"]
    assert config["defaults"]["t_min"] == generation["t_min"]
    # The released layout keeps entropy_bound in sampler_config; the page still gets it.
    assert config["defaults"]["entropy_bound"] == generation["sampler_config"]["entropy_bound"]


def test_every_file_the_page_loads_is_served_and_nothing_comes_from_elsewhere(api: httpx.Client) -> None:
    html = api.get("/").text
    wanted = set(re.findall(r'(?:src|href)="(/playground/static/[^"]+)"', html))
    for script in PLAYGROUND_DIR.glob("*.js"):
        wanted |= {f"/playground/static/{name}" for name in re.findall(r'from "\./([\w.-]+)"', script.read_text())}
    assert {"/playground/static/app.js", "/playground/static/style.css", "/playground/static/api.js"} <= wanted
    for path in sorted(wanted):
        response = api.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-type"].split(";")[0] in {"text/javascript", "text/css", "image/svg+xml"}
    # Offline: no CDN, no absolute URL anywhere in the page's files (the SVG's xmlns is a name, not a fetch).
    for file in PLAYGROUND_DIR.iterdir():
        text = file.read_text(encoding="utf-8").replace('xmlns="http://www.w3.org/2000/svg"', "")
        assert not re.search(r"https?://|(?:src|href)=\"//", text), file.name


@pytest.mark.parametrize("name", ["nope.js", "index.html", ".hidden.js", "..%2Froutes_playground.py",
                                  "%2E%2E%2F%2E%2E%2Fapp.py"])
def test_only_the_pages_own_assets_are_served(api: httpx.Client, name: str) -> None:
    response = api.get(f"/playground/static/{name}")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_the_page_needs_no_key_but_the_api_does(fresh_redis_url: str) -> None:
    settings = playground_settings(fresh_redis_url, api_keys="page-test-key")
    with serve_in_thread(create_app(settings)) as url, httpx.Client(base_url=url, timeout=10) as client:
        page = client.get("/")
        assert page.status_code == 200 and page_config(page.text)["authEnabled"] is True
        assert client.get("/playground/static/app.js").status_code == 200
        assert client.post("/v1/jobs", json={"prompt": "x"}).status_code == 401


def test_the_wheel_ships_every_file_of_the_page() -> None:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["services.api"]
    for file in PLAYGROUND_DIR.iterdir():
        assert any(fnmatch(f"playground/{file.name}", pattern) for pattern in patterns), file.name


def test_workers_report_their_load_and_readyz_shows_it(api: httpx.Client, fresh_redis_url: str) -> None:
    metrics = WorkerMetrics(MetricLabels(model="dgtiny", gpu="cpu"))
    metrics.observe_canvas("generate", num_tokens=32, num_steps=12)
    metrics.observe_canvas("edit", num_tokens=7, num_steps=3)
    metrics.set_load(num_running=2, num_waiting=1)
    metrics.set_memory(used_bytes=5 << 20, total_bytes=8 << 30)
    load = metrics.load_snapshot()
    assert load == {"generated_tokens": 39, "canvases_in_flight": 2, "canvases_waiting": 1,
                    "memory_used_bytes": 5 << 20, "memory_total_bytes": 8 << 30}

    store = JobStore.from_settings(playground_settings(fresh_redis_url))
    store.heartbeat("w-1", {"queue": "dgemma.playground-test", "gpu": "cpu", "load": load})
    store.heartbeat("w-old", {"queue": "dgemma.playground-test", "gpu": "0"})  # a worker without load numbers
    body = api.get("/readyz").json()
    assert body["ready"] is True and body["workers"] == 2
    by_id = {entry["worker_id"]: entry for entry in body["worker_load"]}
    assert {key: by_id["w-1"][key] for key in load} == load
    assert by_id["w-1"]["gpu"] == "cpu"
    assert "generated_tokens" not in by_id["w-old"]


def test_the_page_is_served_when_the_models_files_cannot_be_read(fresh_redis_url: str, tmp_path: Path) -> None:
    settings = Settings(redis_url=fresh_redis_url, model=str(tmp_path / "no-model-here"),
                        queue_name="dgemma.playground-test")
    with serve_in_thread(create_app(settings)) as url, httpx.Client(base_url=url, timeout=10) as client:
        page = client.get("/playground")
        assert page.status_code == 200
        assert page_config(page.text)["defaults"] == {}  # the knobs stay empty: "the model's default"
