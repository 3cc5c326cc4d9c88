"""The playground in a real browser against the real stack.

A redis-server, one Celery worker on the embedded model (models/dgtiny) and two API processes under uvicorn
(one without keys, one with `DGSERVE_API_KEYS`) share one queue, all on loopback. The browser is the
distribution's Chromium (/usr/bin/chromium) driven by Playwright for Python; Playwright's own browsers are
never downloaded. Without /usr/bin/chromium the tests that need the browser skip with a message saying how to
enable them (`.ci/run` installs it); nothing else here skips.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import REPO_ROOT, WorkerProcess, start_worker
from tests.support.processes import api_command, free_port, start_process, stop_process, wait_for_http
from tests.support.redis_server import run_redis_server

CHROMIUM = Path("/usr/bin/chromium")
ENABLE_HINT = ("needs the distribution's Chromium at /usr/bin/chromium and Playwright for Python: "
               "`apt-get install -y chromium chromium-driver` and `pip install -e .[test]` (.ci/run does both)")
# Flags for a quiet, sandbox-free headless run on a CI machine: no GPU, no network of its own.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
BROWSER_FIXTURES = frozenset({"browser", "page", "keyed_page"})
QUEUE = "dgemma.browser"
API_KEY = "playground-test-key"
OTHER_KEY = "another-test-key"
JOBS_PER_MINUTE_PER_KEY = 3  # the keyed API's rate limit, so a test can see a 429 with its Retry-After
EMBEDDED_MODEL = REPO_ROOT / "models" / "dgtiny"


def browser_missing_reason() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} not found"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip (before any stack starts) the tests that drive a browser when there is none."""
    reason = browser_missing_reason()
    if reason is None:
        return
    here = Path(__file__).parent
    marker = pytest.mark.skip(reason=f"browser test: {reason}; {ENABLE_HINT}")
    for item in items:
        if Path(str(item.fspath)).parent == here and BROWSER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(marker)


@dataclass
class ApiProcess:
    """One uvicorn process of the API; `restart()` stops it and starts it again on the same port."""

    env: dict[str, str]
    port: int
    log_path: Path
    process: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = start_process(api_command(self.port), log_path=self.log_path, env={**self.env, "DGSERVE_API_PORT": str(self.port)},
                                     cwd=REPO_ROOT)

    def wait_ready(self) -> None:
        wait_for_http(f"{self.url}/readyz", timeout=60, process=self.process)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def restart(self, hard: bool = False) -> None:
        """`hard`: SIGKILL, so open event streams break at once (a graceful stop may let a stream run to its
        job's end first, and then nothing needs reconnecting)."""
        if hard and self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        self.stop()
        self.start()
        self.wait_ready()


@dataclass
class BrowserStack:
    api: ApiProcess
    keyed_api: ApiProcess
    worker: WorkerProcess
    log_dir: Path

    @property
    def api_url(self) -> str:
        return self.api.url

    @property
    def keyed_api_url(self) -> str:
        return self.keyed_api.url

    def client(self, key: str | None = None, keyed: bool = False) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.keyed_api_url if keyed else self.api_url, headers=headers, timeout=30)


@pytest.fixture(scope="session")
def browser_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserStack]:
    log_dir = tmp_path_factory.mktemp("browser-stack-logs")
    with run_redis_server(tmp_path_factory.mktemp("browser-redis")) as server:
        env = {"DGSERVE_REDIS_URL": server.url, "DGSERVE_MODEL": str(EMBEDDED_MODEL), "DGSERVE_QUEUE_NAME": QUEUE,
               "DGSERVE_CACHE_DIR": str(log_dir / "cache"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "DGSERVE_JOB_LEASE_SECONDS": "5", "PYTHONUNBUFFERED": "1"}
        api = ApiProcess(env, free_port(), log_dir / "api.log")
        keyed_env = {**env, "DGSERVE_API_KEYS": f"{API_KEY},{OTHER_KEY}",
                     "DGSERVE_MAX_JOBS_PER_MINUTE_PER_KEY": str(JOBS_PER_MINUTE_PER_KEY)}
        keyed_api = ApiProcess(keyed_env, free_port(), log_dir / "api-keys.log")
        api.start()
        keyed_api.start()
        worker = None
        try:
            worker = start_worker(env, EMBEDDED_MODEL, log_dir, QUEUE, name="browser")
            api.wait_ready()
            keyed_api.wait_ready()
            yield BrowserStack(api, keyed_api, worker, log_dir)
        finally:
            if worker is not None:
                stop_process(worker.process, timeout=30)
            api.stop()
            keyed_api.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    # Module scope, not session: Playwright's sync API keeps an asyncio loop running on the main thread while
    # it is open, and later test modules that call asyncio.run() (async clients) would find it running.
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # launch() gives every browser a fresh temporary user-data dir; each test gets its own context too.
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def open_page(browser: Any, base_url: str, viewport: dict[str, int] | None = None) -> Iterator[Any]:
    """A page in a fresh context (empty localStorage) on `base_url`; fails the test on any uncaught page error."""
    context = browser.new_context(base_url=base_url, viewport=viewport or {"width": 1280, "height": 800},
                                  accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(60_000)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield page
    finally:
        context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


@pytest.fixture
def page(browser: Any, browser_stack: BrowserStack) -> Iterator[Any]:
    yield from open_page(browser, browser_stack.api_url)


@pytest.fixture
def keyed_page(browser: Any, browser_stack: BrowserStack) -> Iterator[Any]:
    yield from open_page(browser, browser_stack.keyed_api_url)


@pytest.fixture(scope="session")
def screenshot_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the tests save screenshots: $DGSERVE_SCREENSHOT_DIR (docs/ uses these) or a temporary folder."""
    chosen = os.environ.get("DGSERVE_SCREENSHOT_DIR")
    folder = Path(chosen) if chosen else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder
