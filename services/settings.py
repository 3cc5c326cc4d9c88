"""The one settings object of the service (API, worker, CLI, launcher all read it).

Every field can be set from the environment with the `DGSERVE_` prefix, e.g. `DGSERVE_REDIS_URL`,
`DGSERVE_MAX_QUEUED_JOBS`, `DGSERVE_API_KEYS=key1,key2`.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[1]
# A trained small checkpoint shipped with the repository wins over the random fallback.
BUNDLED_MODEL_DIR = REPO_ROOT / "models" / "dgtiny"
KEY_HASH_PREFIX = "sha256:"
_QUEUE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,199}$")


def cache_dir() -> Path:
    """Folder for the launcher's Redis data and the random default model (`DGSERVE_CACHE_DIR` overrides)."""
    explicit = os.environ.get("DGSERVE_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "dgserve"


def random_model_dir() -> Path:
    """Where `dgserve up` writes the random-weight tiny checkpoint when no trained one is bundled."""
    return cache_dir() / "models" / "random-tiny"


def default_model() -> str:
    """The embedded default model: the bundled `models/dgtiny` if present, else the random tiny checkpoint."""
    if (BUNDLED_MODEL_DIR / "config.json").is_file():
        return str(BUNDLED_MODEL_DIR)
    return str(random_model_dir())


def hash_api_key(key: str) -> str:
    """The stored form of an API key (hex sha256); plaintext keys are never kept."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def model_short_name(model: str) -> str:
    """`org/name` or `/path/to/name` → `name`, restricted to characters safe in queue names and labels."""
    base = model.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1] or "model"
    return re.sub(r"[^A-Za-z0-9._-]", "-", base)


def parse_host_port(entry: str) -> tuple[str, int]:
    """`host:port` → (host, port); ValueError naming the entry otherwise (IPv6 as `[::1]:26379`)."""
    host, sep, port = entry.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"redis_sentinels: {entry!r} is not host:port (e.g. 10.0.0.5:26379)")
    return host, int(port)


class Settings(BaseSettings):
    """Service configuration. Limits are enforced by the API before anything is enqueued."""

    # hide_input_in_errors: a bad setting's error names the field but never echoes its value (DGSERVE_API_KEYS,
    # DGSERVE_KEY_LIMITS and the Redis passwords hold secrets, and startup errors end up in logs).
    model_config = SettingsConfigDict(env_prefix="DGSERVE_", extra="ignore", frozen=True, hide_input_in_errors=True)

    redis_url: str = Field(default="redis://127.0.0.1:6379/0", description="job store and Celery broker")
    model: str = Field(default_factory=default_model, description="checkpoint folder or Hugging Face repo id")
    queue_name: str = Field(default="", description="Celery queue of the model; default dgemma.<model-name>")

    max_body_bytes: int = Field(default=1_048_576, ge=1024, le=64 * 1024 * 1024, description="larger → 413")
    max_batch_file_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, le=512 * 1024 * 1024, description=(
        "largest Batch API input file (POST /v1/files); larger → 413"))
    max_batch_lines: int = Field(default=50_000, ge=1, le=1_000_000, description="most requests in one batch")
    max_prompt_tokens: int = Field(default=8192, ge=1, le=1_000_000, description=(
        "prompt (or edit document) length in the model's tokens; longer → 422"))
    max_new_tokens_limit: int = Field(default=4096, ge=1, le=1_000_000, description="largest max_new_tokens accepted")
    max_document_chars: int = Field(default=200_000, ge=1, le=10_000_000, description="longest edit document")
    max_queued_jobs: int = Field(default=1000, ge=1, description="admission limit: queued jobs per model queue")
    retry_after_seconds: int = Field(default=5, ge=1, le=3600, description="Retry-After sent with a 429")
    max_jobs_per_minute_per_key: int = Field(default=0, ge=0, description=(
        "submissions one API key (or all anonymous callers together) may make per minute; 0 = unlimited"))
    key_limits: str = Field(default="", description=(
        "per-key limits, e.g. `*=queued:200,tpm:400000; <key or sha256:hex>=queued:20`: unfinished "
        "interactive jobs per key and tokens (prompt + requested max_new_tokens) per minute; over one → 429 "
        "(format: services/key_limits.py, docs/operations.md). Empty = no per-key limits"))
    result_ttl_seconds: int = Field(default=86_400, ge=10, description="how long a finished job stays readable")
    job_deadline_seconds: int = Field(default=600, ge=1, description=(
        "a job not finished this long after its creation ends as expired"))
    max_attempts: int = Field(default=3, ge=1, le=100, description="starts (redeliveries) before a job fails")
    events_max_len: int = Field(default=5000, ge=10, description="approximate MAXLEN of a job's event stream")
    job_lease_seconds: int = Field(default=15, ge=1, description=(
        "the length of a running job's lease, which its worker renews every worker_heartbeat_interval_seconds "
        "(a lapsed lease lets another worker take the job over); worker registry records older than this are "
        "dropped (readiness counts a worker only within three of its beat intervals)"))
    broker_visibility_timeout_seconds: int | None = Field(default=None, ge=1, description=(
        "an unacked message is redelivered after this long; default: job deadline + 10 min, so a live run is "
        "never delivered twice. Jobs of a killed worker do not wait for it: live workers requeue them once "
        "their lease lapses (job_lease_seconds). A lower value is safe too: a redelivery of a job whose "
        "lease is alive is only retried later, never run twice"))
    redis_socket_timeout_seconds: float = Field(default=3.0, gt=0, le=300, description=(
        "a Redis command (or connection attempt) that gets no answer this long fails, so a paused or "
        "partitioned Redis turns into a 503 instead of a request that hangs"))
    sse_keepalive_seconds: float = Field(default=15.0, gt=0, le=300, description="comment line after this silence")
    # Redis high availability through Sentinel (docs/operations.md, "Redis high availability").
    redis_sentinels: Annotated[tuple[tuple[str, int], ...], NoDecode] = Field(default=(), description=(
        "Sentinel addresses host:port,host:port; set, every client finds the master through them (redis_url "
        "then gives only the database number and credentials). Empty = one Redis at redis_url"))
    redis_master_name: str = Field(default="dgserve", min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._-]+$",
                                   description="the master's name in the sentinels' `sentinel monitor` line")
    redis_sentinel_password: str | None = Field(default=None, repr=False, description=(
        "password of the sentinels themselves (their requirepass); None = none"))
    redis_password: str | None = Field(default=None, repr=False, description=(
        "password of the Redis master and replicas; overrides one in redis_url"))
    redis_min_replicas_ack: int | None = Field(default=None, ge=0, le=16, description=(
        "replicas that must hold a job (WAIT) before its 202, and a terminal write before its message is "
        "acked; short of that within redis_replica_ack_timeout_ms: 503 with Retry-After. None: 1 with "
        "sentinels, 0 (off) without"))
    redis_replica_ack_timeout_ms: int | None = Field(default=None, ge=1, le=60_000, description=(
        "how long one WAIT for replicas may block (below redis_socket_timeout_seconds); None: 1000 ms, or half "
        "the socket timeout if that is shorter"))

    api_keys: Annotated[frozenset[str], NoDecode] = Field(
        default=frozenset(),
        repr=False,
        description="comma-separated keys (or sha256:<hex> hashes); only the hashes are kept. Empty = no auth",
    )
    api_host: str = Field(default="127.0.0.1", description="`dgserve api` bind address")
    api_port: int = Field(default=8000, ge=0, le=65535, description="`dgserve api` port")
    worker_metrics_port: int = Field(default=9400, ge=0, le=65535, description="Prometheus port of a worker")

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redis_url must start with redis://, rediss:// or unix:// (got {value!r})")
        return value

    @field_validator("redis_sentinels", mode="before")
    @classmethod
    def _parse_sentinels(cls, value: object) -> tuple[tuple[str, int], ...]:
        if value is None or isinstance(value, tuple | list) and all(isinstance(v, tuple | list) for v in value):
            return tuple((str(host), int(port)) for host, port in value or ())
        entries = value.split(",") if isinstance(value, str) else list(value)  # type: ignore[call-overload]
        return tuple(parse_host_port(str(entry).strip()) for entry in entries if str(entry).strip())

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("model must be a checkpoint folder or a Hugging Face repo id, not empty")
        return value.strip()

    @field_validator("api_keys", mode="before")
    @classmethod
    def _hash_api_keys(cls, value: object) -> frozenset[str]:
        if value is None:
            return frozenset()
        entries = value.split(",") if isinstance(value, str) else list(value)  # type: ignore[call-overload]
        hashes = set()
        for raw in entries:
            entry = str(raw).strip()
            if not entry:
                continue
            if entry.startswith(KEY_HASH_PREFIX):
                digest = entry[len(KEY_HASH_PREFIX):].lower()
                if not re.fullmatch(r"[0-9a-f]{64}", digest):
                    raise ValueError("api_keys: a sha256: entry must be followed by 64 hex digits")
                hashes.add(digest)
            elif len(entry) < 8:
                raise ValueError("api_keys: each key must be at least 8 characters long")
            else:
                hashes.add(hash_api_key(entry))
        return frozenset(hashes)

    @field_validator("key_limits")
    @classmethod
    def _check_key_limits(cls, value: str) -> str:
        from services.key_limits import parse_key_limits  # services.key_limits imports this module

        parse_key_limits(value)  # a bad entry fails at startup, naming it
        return value

    @model_validator(mode="after")
    def _derive_queue_name(self) -> Settings:
        if not self.queue_name:
            object.__setattr__(self, "queue_name", f"dgemma.{model_short_name(self.model)}")
        if not _QUEUE_NAME.match(self.queue_name):
            raise ValueError(
                f"queue_name {self.queue_name!r} may hold only letters, digits and . _ : - (at most 200)"
            )
        return self

    @model_validator(mode="after")
    def _check_replica_ack_timeout(self) -> Settings:
        explicit = self.redis_replica_ack_timeout_ms
        if self.replicas_to_ack and explicit is not None and explicit >= self.redis_socket_timeout_seconds * 1000:
            raise ValueError(f"redis_replica_ack_timeout_ms ({self.redis_replica_ack_timeout_ms}) must be below "
                             f"redis_socket_timeout_seconds ({self.redis_socket_timeout_seconds} s), or a WAIT "
                             "would be cut by the socket timeout")
        return self

    @property
    def replicas_to_ack(self) -> int:
        """Replicas a job's creation and terminal writes must reach before they are acknowledged (0 = off)."""
        if self.redis_min_replicas_ack is not None:
            return self.redis_min_replicas_ack
        return 1 if self.redis_sentinels else 0

    @property
    def replica_ack_timeout_ms(self) -> int:
        """How long one WAIT for replicas blocks: `redis_replica_ack_timeout_ms`, by default 1000 ms or half the
        socket timeout (a WAIT cut by the socket timeout would look like a dead Redis)."""
        if self.redis_replica_ack_timeout_ms is not None:
            return self.redis_replica_ack_timeout_ms
        return max(1, min(1000, int(self.redis_socket_timeout_seconds * 500)))

    @property
    def visibility_timeout_seconds(self) -> int:
        if self.broker_visibility_timeout_seconds is not None:
            return self.broker_visibility_timeout_seconds
        return self.job_deadline_seconds + 600

    @property
    def model_name(self) -> str:
        """Short model name used in queue names and the `model` metric label."""
        return model_short_name(self.model)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)

    def owner_of_key(self, key: str) -> str | None:
        """The owner id (key hash) of a presented key, or None if the key is not configured."""
        digest = hash_api_key(key)
        return digest if digest in self.api_keys else None
