"""The simulated engine (worker/simulated_engine.py): it keeps the worker's engine contract
(`worker.protocols.EngineLike`), batches like the real engine, sleeps the batch-time model, and a worker runtime
runs real jobs on it against a real Redis job store."""

from __future__ import annotations

import inspect
import threading

import pytest
import torch

from engine.types import EngineRequest, InfillCanvas, SamplingParams, StepOutput
from services.schemas import GenerateJobCreate
from tests.support.processes import free_port
from worker.__main__ import parse_args, worker_environment
from worker.protocols import EngineLike
from worker.runtime import WorkerRuntime, load_engine
from worker.settings import WorkerSettings
from worker.simulated_engine import BatchTimeModel, SimulatedEngine
from worker.tickets import JobOutcome

pytestmark = pytest.mark.timeout(60)
MODEL_DIR = "models/dgtiny"  # tokenizer and config only: the simulated engine reads no weights
TABLE = BatchTimeModel.parse("1:9.16,4:12.49,16:35.58")


class RecordingSleep:
    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def make_engine(max_batch: int = 4, sleep=None) -> SimulatedEngine:
    engine = SimulatedEngine.from_checkpoint(MODEL_DIR, max_batch=max_batch, max_context=4096, batch_time=TABLE)
    if sleep is not None:
        engine._sleep = sleep
    return engine


def request(max_new_tokens: int = 40, steps: int = 3, seed: int | None = 7, **params) -> EngineRequest:
    return EngineRequest(prompt="def fibonacci(n):", params=SamplingParams(
        max_new_tokens=max_new_tokens, max_denoising_steps=steps, seed=seed, **params))


def run_to_end(engine: SimulatedEngine, max_steps: int = 200) -> list[StepOutput]:
    outputs: list[StepOutput] = []
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return outputs
        outputs.extend(engine.step())
    raise AssertionError("the simulated engine did not finish")


def test_it_has_every_member_of_the_engine_protocol_with_the_same_parameters():
    engine = make_engine()
    members = [name for name in vars(EngineLike) if not name.startswith("_")] + list(EngineLike.__annotations__)
    assert {"step", "add_request", "abort", "request_limits", "last_step_stats", "kv_stats"} <= set(members)
    for name in members:
        assert hasattr(engine, name), name
        wanted = getattr(EngineLike, name, None)
        if inspect.isfunction(wanted):
            assert list(inspect.signature(getattr(SimulatedEngine, name)).parameters) == \
                list(inspect.signature(wanted).parameters), name
    assert engine.request_limits.canvas_length == engine.config.canvas_length == 32  # the checkpoint's


def test_batch_time_model_interpolates_the_measured_table_and_extends_it():
    assert TABLE.seconds(0) == 0.0
    assert TABLE.seconds(1) == pytest.approx(0.00916)
    assert TABLE.seconds(16) == pytest.approx(0.03558)
    assert TABLE.seconds(10) == pytest.approx(0.01249 + (0.03558 - 0.01249) * 6 / 12)
    assert TABLE.seconds(28) == pytest.approx(0.03558 + (0.03558 - 0.01249))  # the last segment, extended
    assert BatchTimeModel.parse("1:10", scale=0.5).seconds(8) == pytest.approx(0.005)
    with pytest.raises(ValueError, match="worker_simulated_step_ms"):
        BatchTimeModel.parse("one:ten")
    with pytest.raises(ValueError, match="increasing"):
        BatchTimeModel.parse("4:1,4:2")


def test_it_batches_up_to_max_batch_and_each_step_lasts_the_models_time():
    sleep = RecordingSleep()
    engine = make_engine(max_batch=4, sleep=sleep)
    for n in range(6):
        engine.add_request(request(seed=n), f"r{n}")
    assert engine.num_waiting() == 6
    engine.step()
    assert (engine.num_running(), engine.num_waiting()) == (4, 2)
    assert engine.last_step_stats.num_denoising_canvases == 4
    assert engine.last_step_stats.forward_seconds == pytest.approx(TABLE.seconds(4))
    assert 0 < sleep.calls[-1] <= TABLE.seconds(4)  # the step's own bookkeeping counts towards it
    outputs = engine.step() + engine.step() + engine.step()
    assert [o.request_id for o in outputs if o.kind == "canvas"] == ["r0", "r1", "r2", "r3"]
    outputs = run_to_end(engine)
    finished = {o.request_id: o for o in outputs if o.kind == "finished"}
    assert set(finished) == {f"r{n}" for n in range(6)}  # the waiting two joined as rows freed up
    stats = finished["r5"].stats
    assert stats is not None and (stats.generated_tokens, stats.canvases, stats.denoising_steps) == (40, 2, 6)
    assert finished["r5"].finish_reason == "length" and stats.queue_seconds > 0


def test_tokens_are_deterministic_per_seed_and_never_stop_ids():
    def tokens(seed: int) -> tuple[int, ...]:
        engine = make_engine(sleep=RecordingSleep())
        engine.add_request(request(max_new_tokens=64, seed=seed, stream_drafts=True), "only")
        return tuple(t for o in run_to_end(engine) if o.kind == "canvas" for t in o.token_ids)

    first = tokens(1)
    assert len(first) == 64 and tokens(1) == first and tokens(2) != first
    assert not set(first) & set(make_engine().generation_defaults.stop_token_ids)


def test_it_refuses_what_the_real_engine_refuses_naming_the_field():
    engine = make_engine()
    with pytest.raises(ValueError, match="max_denoising_steps"):
        engine.add_request(request(steps=0))
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.add_request(request(max_new_tokens=10_000))
    with pytest.raises(ValueError, match="prompt_token_ids"):
        engine.add_request(EngineRequest(prompt_token_ids=(1, 10**9)))
    engine.add_request(request(), "same")
    with pytest.raises(ValueError, match="already"):
        engine.add_request(request(), "same")


def test_abort_ends_a_running_or_waiting_request_as_aborted():
    engine = make_engine(max_batch=1, sleep=RecordingSleep())
    engine.add_request(request(), "running")
    engine.add_request(request(), "waiting")
    engine.step()
    engine.abort("running")
    engine.abort("waiting")
    engine.abort("unknown")
    ends = [(o.request_id, o.finish_reason) for o in engine.step() if o.kind == "finished"]
    assert ends == [("running", "aborted"), ("waiting", "aborted")] and not engine.has_unfinished()


def test_infill_canvases_keep_their_fixed_positions():
    engine = make_engine(sleep=RecordingSleep())
    fixed = tuple(range(100, 132))
    is_fixed = tuple(i % 2 == 0 for i in range(32))
    engine.add_request(EngineRequest(prompt="edit", params=SamplingParams(max_denoising_steps=2, seed=3),
                                     infill=(InfillCanvas((), fixed, is_fixed),)), "edit")
    outputs = run_to_end(engine)
    canvas = next(o for o in outputs if o.kind == "canvas").token_ids
    assert [canvas[i] for i in range(0, 32, 2)] == list(fixed[::2])
    assert outputs[-1].finish_reason == "stop"


def test_the_simulated_engine_is_chosen_by_setting_and_refused_on_a_gpu_unless_allowed():
    env = worker_environment(parse_args(["--cpu", "--engine", "simulated"]), {})
    assert env["DGSERVE_WORKER_ENGINE"] == "simulated"
    assert "DGSERVE_WORKER_ENGINE" not in worker_environment(parse_args(["--cpu"]), {})  # the model by default
    assert WorkerSettings().worker_engine == "model"
    settings = WorkerSettings(model=MODEL_DIR, worker_engine="simulated", worker_concurrency=8)
    assert isinstance(load_engine(settings, torch.device("cpu")), SimulatedEngine)
    with pytest.raises(ValueError, match="worker_engine.*DGSERVE_WORKER_ALLOW_SIMULATED_ENGINE"):
        load_engine(settings, torch.device("cuda"))
    allowed = WorkerSettings(model=MODEL_DIR, worker_engine="simulated", worker_allow_simulated_engine=True)
    assert load_engine(allowed, torch.device("cuda")).max_batch == allowed.worker_concurrency  # no card touched


def test_a_worker_runtime_commits_each_job_once_on_the_simulated_engine(fresh_redis_url: str):
    settings = WorkerSettings(redis_url=fresh_redis_url, model=MODEL_DIR, worker_engine="simulated",
                              worker_device="cpu", worker_concurrency=4, worker_metrics_port=free_port(),
                              worker_metrics_host="127.0.0.1", worker_heartbeat_interval_seconds=0.1)
    runtime = WorkerRuntime(settings, hostname="sim-test")
    runtime.start()
    try:
        store = runtime.store
        job_ids = [store.create(GenerateJobCreate(prompt=f"job {n}", max_new_tokens=40, max_denoising_steps=4,
                                                  seed=n)).job_id for n in range(6)]
        outcomes: dict[str, str] = {}
        threads = [threading.Thread(target=lambda j=job_id: outcomes.update({j: runtime.run_job(j)}))
                   for job_id in job_ids]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert outcomes == dict.fromkeys(job_ids, JobOutcome.SUCCEEDED.value)
        for job_id in job_ids:
            job = store.get(job_id)
            assert job is not None and job.result is not None
            assert job.result["usage"]["generated_tokens"] == 40 and job.result["finish_reason"] == "length"
            types = [entry["type"] for _, entry in store.redis.xrange(store.events_key(job_id))]
            assert types == ["queued", "started", "canvas", "canvas", "done"]
        assert store.live_workers()[0]["engine"] == "simulated"
    finally:
        runtime.stop()
