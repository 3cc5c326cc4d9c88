"""Per-key limits (`DGSERVE_KEY_LIMITS`): the format, the store's atomic admission on a real Redis, and the 429s
of every submitting route over HTTP (another key unaffected)."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from services.jobs import JobStore, KeyLimitExceeded
from services.key_limits import KeyLimits, parse_key_limits
from services.schemas import GenerateJobCreate
from services.settings import Settings, hash_api_key
from tests.services.api_keys import KEY_A, KEY_B

AS_A, AS_B = {"Authorization": f"Bearer {KEY_A}"}, {"Authorization": f"Bearer {KEY_B}"}


def test_the_format_names_keys_by_value_or_hash_with_a_default():
    table = parse_key_limits(f"*=queued:9 ; {KEY_A}=queued:2,tpm:500;sha256:{hash_api_key(KEY_B).upper()}=tpm:7")
    assert table.for_owner(hash_api_key(KEY_A)) == KeyLimits(max_queued_jobs=2, tokens_per_minute=500)
    assert table.for_owner(hash_api_key(KEY_B)) == KeyLimits(tokens_per_minute=7)  # replaces *, no merge
    assert table.for_owner("someone-else") == table.for_owner("") == KeyLimits(max_queued_jobs=9)
    assert parse_key_limits("").empty


@pytest.mark.parametrize(("text", "named"), [
    ("key-a-0123456789", "<key>=queued:N"), ("*=queued:0", "at least 1"), ("*=rpm:5", "'rpm:5'"),
    ("sha256:abc=tpm:5", "64 hex digits"), ("*=queued:x", "queued:N or tpm:N")])
def test_a_bad_entry_is_refused_at_startup_naming_it(text: str, named: str):
    with pytest.raises(ValueError, match="key_limits") as refused:
        Settings(key_limits=text)
    assert named in str(refused.value)


def store_with(url: str, key_limits: str, **settings: object) -> JobStore:
    return JobStore(redis.Redis.from_url(url, decode_responses=True),
                    Settings(redis_url=url, queue_name="dgemma.limits", key_limits=key_limits, **settings))


def test_concurrent_submits_cannot_overshoot_the_queued_limit(fresh_redis_url: str):
    store = store_with(fresh_redis_url, "*=queued:5")
    outcomes: list[str] = []

    def submit(index: int) -> None:
        try:
            store.create(GenerateJobCreate(prompt=f"p{index}"), owner="tenant-a")
            outcomes.append("created")
        except KeyLimitExceeded as exc:
            outcomes.append(exc.limit)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(outcomes) == ["created"] * 5 + ["max_queued_jobs"] * 19
    assert store.create(GenerateJobCreate(prompt="other"), owner="tenant-b").created  # its own count


def test_a_finished_job_frees_its_slot_and_batch_lines_are_exempt(fresh_redis_url: str):
    store = store_with(fresh_redis_url, "*=queued:2,tpm:10")
    first, _ = (store.create(GenerateJobCreate(prompt=p), owner="t", token_cost=4).job_id for p in "ab")
    with pytest.raises(KeyLimitExceeded, match="2 unfinished jobs"):
        store.create(GenerateJobCreate(prompt="c"), owner="t", token_cost=1)
    store.cancel(first)  # queued → cancelled: no longer counts
    try:
        store.create(GenerateJobCreate(prompt="d"), owner="t", token_cost=2)
    except KeyLimitExceeded as exc:
        pytest.fail(f"the cancelled job still counted: {exc}")
    with pytest.raises(KeyLimitExceeded) as over_tokens:  # 4 + 4 + 2 used; 10 per minute
        store.create(GenerateJobCreate(prompt="e"), owner="u", token_cost=11)
    assert over_tokens.value.limit == "tokens_per_minute"  # another owner, but the default applies to it too
    line = store.create(GenerateJobCreate(prompt="line"), owner="t", batch_id="batch_1", token_cost=50)
    assert line.created and store.redis.zcard("dgserve:active:t") == 2


def test_over_the_queued_limit_every_submitting_route_answers_429(start_api):
    api = start_api(api_keys=f"{KEY_A},{KEY_B}", key_limits=f"{KEY_A}=queued:2", retry_after_seconds=7)
    assert [api.http.post("/v1/jobs", json={"prompt": f"p{i}"}, headers=AS_A).status_code
            for i in range(2)] == [202, 202]
    refused = api.http.post("/v1/jobs", json={"prompt": "one more"}, headers=AS_A)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "7"
    assert refused.json()["error"]["code"] == "key_queued_limit"
    assert "max_queued_jobs" in refused.json()["error"]["message"]
    openai_routes = [("/v1/completions", {"model": "tiny-api", "prompt": "x", "max_tokens": 4}),
                     ("/v1/chat/completions", {"model": "tiny-api", "max_tokens": 4,
                                               "messages": [{"role": "user", "content": "x"}]}),
                     ("/v1/fim/completions", {"model": "tiny-api", "prompt": "a", "suffix": "b", "max_tokens": 4})]
    for path, body in openai_routes:
        answer = api.http.post(path, json=body, headers=AS_A)
        assert answer.status_code == 429, (path, answer.text)
        assert answer.headers["retry-after"] == "7"
        error = answer.json()["error"]
        assert error["code"] == "key_queued_limit" and error["type"] == "rate_limit_error", (path, error)
    assert api.queue_length() == 2 and len(api.redis.keys("job:*:events")) == 2  # nothing stored when refused
    assert api.http.post("/v1/jobs", json={"prompt": "b"}, headers=AS_B).status_code == 202  # B is unaffected


def test_over_the_tokens_per_minute_limit_is_429_until_the_minute_turns(start_api):
    api = start_api(api_keys=f"{KEY_A},{KEY_B}", key_limits=f"{KEY_A}=tpm:150")
    body = {"prompt": "p", "max_new_tokens": 60}  # byte tokenizer: bos + 1 prompt token + 60 = 62
    if time.time() % 60 > 55:  # keep the three requests inside one minute window
        time.sleep(60 - time.time() % 60 + 0.1)
    codes = [api.http.post("/v1/jobs", json=body, headers=AS_A) for _ in range(3)]
    assert [answer.status_code for answer in codes] == [202, 202, 429]
    error, retry_after = codes[2].json()["error"], int(codes[2].headers["retry-after"])
    assert error["code"] == "key_tokens_limit" and "124 tokens this minute" in error["message"]
    assert 1 <= retry_after <= 60 and retry_after >= 60 - int(time.time()) % 60 - 1
    too_big = api.http.post("/v1/jobs", json={"prompt": "p", "max_new_tokens": 120}, headers=AS_B)
    assert too_big.status_code == 202  # B has no limit
    never = api.http.post("/v1/jobs", json={"prompt": "p" * 30, "max_new_tokens": 128}, headers=AS_A)
    assert never.status_code == 422 and never.json()["error"]["field"] == "max_new_tokens"  # 159 > 150 at once
