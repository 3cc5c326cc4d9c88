"""Settings from the environment and the wire schemas' own validation (no server needed)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.schemas import EditJobCreate, GenerateJobCreate, parse_job_create
from services.settings import BUNDLED_MODEL_DIR, Settings, hash_api_key


def test_settings_from_environment_hashes_keys(monkeypatch):
    monkeypatch.setenv("DGSERVE_REDIS_URL", "redis://10.0.0.5:6380/2")
    monkeypatch.setenv("DGSERVE_MODEL", "google/diffusion-gemma-2b")
    monkeypatch.setenv("DGSERVE_MAX_QUEUED_JOBS", "17")
    monkeypatch.setenv("DGSERVE_API_KEYS", f" first-key-123 , sha256:{'ab' * 32},")
    settings = Settings()
    assert settings.redis_url == "redis://10.0.0.5:6380/2" and settings.max_queued_jobs == 17
    assert settings.queue_name == "dgemma.diffusion-gemma-2b" and settings.model_name == "diffusion-gemma-2b"
    assert settings.api_keys == {hash_api_key("first-key-123"), "ab" * 32}
    assert "first-key-123" not in repr(settings) and "first-key-123" not in settings.model_dump_json()
    assert settings.owner_of_key("first-key-123") == hash_api_key("first-key-123")
    assert settings.owner_of_key("other-key-123") is None


@pytest.mark.parametrize(("overrides", "message"), [
    ({"redis_url": "http://localhost:6379"}, "redis_url must start with redis://"),
    ({"api_keys": "short"}, "at least 8 characters"),
    ({"api_keys": "sha256:xyz"}, "64 hex digits"),
    ({"queue_name": "bad queue!"}, "may hold only"),
    ({"max_queued_jobs": 0}, "greater than or equal to 1"),
    ({"model": "  "}, "not empty"),
])
def test_settings_reject_bad_values_with_clear_messages(overrides, message):
    with pytest.raises(ValidationError, match=message):
        Settings(**overrides)


def test_default_model_and_explicit_queue(monkeypatch, tmp_path):
    monkeypatch.setenv("DGSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("DGSERVE_MODEL", raising=False)
    settings = Settings(queue_name="dgemma.custom")
    assert settings.queue_name == "dgemma.custom"
    # The bundled trained model wins when the repository ships one; otherwise the cached random one.
    assert settings.model in {str(tmp_path / "models" / "random-tiny"), str(BUNDLED_MODEL_DIR)}


def test_job_without_kind_is_generate_and_round_trips():
    job = parse_job_create({"prompt": "hi", "seed": 1})
    assert isinstance(job, GenerateJobCreate) and parse_job_create(job.model_dump()) == job
    assert job.sampling_params() == {"seed": 1, "stream_drafts": False}


def test_edit_offsets_are_code_points_and_find_counts_overlaps():
    document = "naïve café 😀 done"
    job = EditJobCreate(document=document, edits=[{"find": "😀"}, {"start": 0, "end": 5}])
    assert job.resolved_spans() == [(11, 12), (0, 5)] and document[0:5] == "naïve"
    with pytest.raises(ValidationError, match=r"edits\[0\]: find text 'aa' occurs more than once"):
        EditJobCreate(document="aaa", edits=[{"find": "aa"}])


def test_edit_insertions_at_one_point_are_ambiguous_but_adjacent_spans_are_fine():
    EditJobCreate(document="abcdef", edits=[{"start": 0, "end": 3}, {"start": 3, "end": 6}, {"start": 6, "end": 6}])
    with pytest.raises(ValidationError, match=r"edits\[1\]: span \[2, 2\) overlaps edits\[0\]"):
        EditJobCreate(document="abcdef", edits=[{"start": 2, "end": 2}, {"start": 2, "end": 2}])


def test_api_and_workers_agree_on_the_visibility_timeout(monkeypatch) -> None:
    """The producer's kombu channel gets the same visibility timeout as the workers' (override or default)."""
    from services.job_messages import JobQueue
    from worker.settings import WorkerSettings

    assert Settings(job_deadline_seconds=60).visibility_timeout_seconds == 660
    monkeypatch.setenv("DGSERVE_BROKER_VISIBILITY_TIMEOUT_SECONDS", "123")
    api, worker = Settings(), WorkerSettings()
    queue = JobQueue(api)
    try:
        assert queue.celery.conf.broker_transport_options["visibility_timeout"] == 123
        assert worker.visibility_timeout_seconds == 123
    finally:
        queue.close()


def test_a_bad_setting_names_the_field_without_echoing_its_secret_value(monkeypatch):
    monkeypatch.setenv("DGSERVE_KEY_LIMITS", "sk-very-secret-key=queued:notanumber")
    with pytest.raises(Exception) as caught:
        Settings()
    assert "key_limits" in str(caught.value) and "sk-very-secret-key" not in str(caught.value)
