"""The real stack for the OpenAI SDK tests (tests/integration/conftest.py's fixtures: a real redis-server, a
real Celery worker on the tiny checkpoint, the API under uvicorn), and SDK clients pointed at it.

The `openai` package is the official SDK, unchanged: clients only get our base URL, a key and no retries.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import openai
import pytest

from services.api.app import create_app
from tests.integration import conftest as integration
from tests.integration.conftest import Stack
from tests.support.api_server import serve_in_thread

stack, tiny_model_dir = integration.stack, integration.tiny_model_dir  # the shared real-stack fixtures

KEYS = ("key-alice-0001", "key-bob-00002")


def sdk(base_url: str, api_key: str = "unused", **options: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=120, **options)


@pytest.fixture
def client(stack: Stack) -> Iterator[openai.OpenAI]:
    with sdk(stack.api_url) as sync_client:
        yield sync_client


@pytest.fixture
def async_client(stack: Stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{stack.api_url}/v1", api_key="unused", max_retries=0, timeout=120)


@dataclass
class KeyedApi:
    """A second API process (in a thread) on the same Redis and queue, with API keys configured."""

    url: str

    def client(self, key: str) -> openai.OpenAI:
        return sdk(self.url, key)


@pytest.fixture(scope="module")
def keyed_api(stack: Stack) -> Iterator[KeyedApi]:
    settings = stack.settings(queue_name="dgemma.itest", api_keys=",".join(KEYS))
    with serve_in_thread(create_app(settings)) as url:
        yield KeyedApi(url)
