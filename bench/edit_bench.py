"""Edit-job benchmark (issue 4): single-span edits over a fixed set of documents, engine alone and through
the stack (HTTP API → Redis → Celery worker → result).

    OMP_NUM_THREADS=1 .venv/bin/python bench/edit_bench.py --mode engine --n 1000 --docs 50
    OMP_NUM_THREADS=1 .venv/bin/python bench/edit_bench.py --mode stack --n 100            # launches dgserve up
    OMP_NUM_THREADS=1 .venv/bin/python bench/edit_bench.py --mode stack --api http://127.0.0.1:8000

Engine mode keeps `--concurrency` edits in flight (closed loop: a finished edit is replaced by the next one
at the next step boundary) and measures each edit from `add_request` to its `finished` output. Stack mode does
the same with HTTP jobs against a running API (`--api`, or `dgserve up` launched on a free port with the same
model and a worker of `--concurrency`) and measures submit → result (polled every 20 ms).
Both print one JSON line: edits/s, p50/p99 latency, denoising steps per canvas, canvases per edit.
Without `--model` a random tiny checkpoint is written to a temporary folder (noise, but the same work).

Prefix-cache workloads (issue 9; bench/prefix_bench.py), each with the KV prefix cache on and off in one run:

    OMP_NUM_THREADS=1 .venv/bin/python bench/edit_bench.py --mode session --concurrency 16 --n 96 --docs 4 --steps 4
    OMP_NUM_THREADS=1 .venv/bin/python bench/edit_bench.py --mode session --concurrency 16 --n 96 --docs 16 \
        --steps 4 --edit-order forward                  # also --accept-rate, --doc-chars MIN:MAX
    OMP_NUM_THREADS=2 .venv/bin/python bench/edit_bench.py --mode chat --concurrency 64 --chat-requests 64 --steps 2
    OMP_NUM_THREADS=1 .venv/bin/python bench/edit_bench.py --mode capacity
    python bench/edit_bench.py --mode session --preset full --device cuda --dtype bfloat16 --eager --concurrency 16 \
        --n 96 --docs 16 --steps 4 --edit-order forward --doc-chars 1600:16000 --max-context 24576 --kv-cache-gb 24

Without `--model` the prefix modes build random weights of `--preset` on `--device` (no weight file).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dgtext.edit_result import assemble_edit_result  # noqa: E402
from dgtext.edits import EditSpec, plan_edits, resolve_edits  # noqa: E402

_WORDS = ["the", "canvas", "model", "edits", "spans", "of", "text", "in", "place", "while", "both", "sides",
          "stay", "visible", "to", "every", "position", "caf\u00e9", "na\u00efve", "\u05e9\u05dc\u05d5\u05dd",
          "\U0001f600", "r\u00e9sum\u00e9"]
_CODE = ["def {w}(a, b):", "\treturn a + b  # {w}", "for i in range(n):", "    total += values[i]",
         "class {W}:", "    \"\"\"{w} docs\"\"\"", "if {w} is None:\r", "        raise ValueError('{w}')"]


def make_documents(count: int, seed: int = 0, chars: tuple[int, int] = (200, 2000)) -> list[str]:
    """`count` deterministic documents of `chars` (min, max) characters, at least (prose and code, CRLF, tabs,
    unicode); each ends at the first line that reaches its drawn length."""
    rng = random.Random(seed)
    documents = []
    for _ in range(count):
        target = rng.randint(*chars)
        lines: list[str] = []
        while sum(len(line) + 1 for line in lines) < target:
            word = rng.choice(_WORDS)
            if rng.random() < 0.5:
                lines.append(rng.choice(_CODE).format(w=word, W=word.capitalize()))
            else:
                lines.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12))) + ".")
        documents.append("\n".join(lines))  # no trailing newline on purpose
    return documents


@dataclass(frozen=True)
class BenchEdit:
    document_index: int
    start: int
    end: int


def make_edits(documents: list[str], count: int, seed: int = 1) -> list[BenchEdit]:
    """`count` single-span edits: a random word (or run of 1-3 words) of a random document."""
    rng = random.Random(seed)
    words = [[m.span() for m in re.finditer(r"\w+", doc)] for doc in documents]
    edits = []
    for _ in range(count):
        index = rng.randrange(len(documents))
        first = rng.randrange(len(words[index]))
        last = min(first + rng.randint(0, 2), len(words[index]) - 1)
        edits.append(BenchEdit(index, words[index][first][0], words[index][last][1]))
    return edits


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(mode: str, latencies: list[float], wall_s: float, extra: dict) -> dict:
    return {"mode": mode, "edits": len(latencies), "wall_s": round(wall_s, 3),
            "edits_per_s": round(len(latencies) / wall_s, 3),
            "p50_s": round(percentile(latencies, 0.5), 4), "p99_s": round(percentile(latencies, 0.99), 4),
            "mean_s": round(statistics.fmean(latencies), 4), **extra}


def run_engine(engine, documents: list[str], edits: list[BenchEdit], concurrency: int, steps: int | None,
               seed: int) -> dict:
    """Closed-loop engine benchmark; every result is assembled (and so checked) as the worker would."""
    from engine.types import EngineRequest, InfillCanvas, SamplingParams

    tokenizer, canvas_length = engine.tokenizer, engine.config.canvas_length
    pending = list(enumerate(edits))
    in_flight: dict[str, tuple[float, object, list]] = {}
    latencies: list[float] = []
    steps_per_canvas: list[float] = []
    canvases_per_edit: list[int] = []
    # Steps with an encoder forward (prefill of the text before the span, commits) vs decoder-only steps.
    encoder_step_seconds = denoise_only_seconds = 0.0
    encoder_tokens = 0
    started = time.perf_counter()
    while pending or in_flight:
        while pending and len(in_flight) < concurrency:
            number, edit = pending.pop(0)
            document = documents[edit.document_index]
            resolved = resolve_edits(document, [EditSpec(start=edit.start, end=edit.end)])
            plan = plan_edits(document, resolved, tokenizer, canvas_length, insertion_tokens=canvas_length)
            params = SamplingParams(seed=seed + number, max_denoising_steps=steps, fixed_steps=steps is not None)
            canvases = tuple(InfillCanvas(c.leading_token_ids, c.token_ids, c.is_fixed) for c in plan.canvases)
            request_id = engine.add_request(
                EngineRequest(prompt_token_ids=plan.prompt_token_ids, params=params, infill=canvases),
                request_id=f"edit-{number}")
            in_flight[request_id] = (time.perf_counter(), plan, [])
        outputs = engine.step()
        stats = engine.last_step_stats
        if stats.num_encoder_tokens:
            encoder_step_seconds += stats.forward_seconds
            encoder_tokens += stats.num_encoder_tokens
        else:
            denoise_only_seconds += stats.forward_seconds
        for out in outputs:
            added_at, plan, committed = in_flight[out.request_id]
            if out.kind == "canvas":
                committed.append(out.token_ids)
            elif out.kind == "finished":
                if out.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"{out.request_id} ended with {out.finish_reason}: {out.error}")
                assemble_edit_result(plan, committed, tokenizer)
                latencies.append(time.perf_counter() - added_at)
                if out.stats is not None:
                    steps_per_canvas.append(out.stats.steps_per_canvas)
                canvases_per_edit.append(len(committed))
                del in_flight[out.request_id]
    wall = time.perf_counter() - started
    return summary("engine", latencies, wall, {
        "concurrency": concurrency, "canvas_length": canvas_length,
        "steps_per_canvas": round(statistics.fmean(steps_per_canvas), 2) if steps_per_canvas else None,
        "canvases_per_edit": round(statistics.fmean(canvases_per_edit), 3),
        "encoder_tokens_per_edit": round(encoder_tokens / len(latencies), 1),
        "steps_with_encoder_s": round(encoder_step_seconds, 2), "decoder_only_steps_s": round(denoise_only_seconds, 2)})


def run_stack(api_url: str, documents: list[str], edits: list[BenchEdit], concurrency: int,
              steps: int | None, timeout_s: float, api_key: str | None = None) -> dict:
    """Closed-loop HTTP benchmark: submit edit jobs, poll each to its result, `concurrency` at a time."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    pending = list(edits)
    in_flight: dict[str, float] = {}
    latencies: list[float] = []
    started = time.perf_counter()
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=api_url, headers=headers, timeout=30.0) as client:
        while pending or in_flight:
            if time.monotonic() > deadline:
                raise TimeoutError(f"stack benchmark: {len(in_flight) + len(pending)} edits unfinished")
            while pending and len(in_flight) < concurrency:
                edit = pending.pop(0)
                body = {"kind": "edit", "document": documents[edit.document_index],
                        "edits": [{"start": edit.start, "end": edit.end}]}
                if steps is not None:
                    body["max_denoising_steps"] = steps
                response = client.post("/v1/jobs", json=body)
                response.raise_for_status()
                in_flight[response.json()["id"]] = time.perf_counter()
            for job_id in list(in_flight):
                job = client.get(f"/v1/jobs/{job_id}").json()
                if job["status"] == "succeeded":
                    latencies.append(time.perf_counter() - in_flight.pop(job_id))
                elif job["status"] in ("failed", "cancelled", "expired"):
                    raise RuntimeError(f"job {job_id} ended {job['status']}: {job.get('error')}")
            time.sleep(0.02)
    return summary("stack", latencies, time.perf_counter() - started, {"concurrency": concurrency})


def _model_dir(model: str | None) -> str:
    if model is not None:
        return model
    from engine.checkpoint import write_random_checkpoint

    folder = tempfile.mkdtemp(prefix="edit-bench-model-")
    write_random_checkpoint(folder, preset="tiny", seed=0)
    return folder


@contextlib.contextmanager
def launched_stack(model: str, concurrency: int, device: str) -> Iterator[str]:
    """`dgserve up` (loopback Redis, one worker, the API) on a free port; yields the API URL, then stops it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cache = tempfile.mkdtemp(prefix="edit-bench-stack-")
    env = {**os.environ, "DGSERVE_MODEL": model, "DGSERVE_CACHE_DIR": cache,
           "DGSERVE_WORKER_CONCURRENCY": str(concurrency), "DGSERVE_MAX_QUEUED_JOBS": str(max(1000, concurrency))}
    args = [sys.executable, "-c", "from services.cli import main; raise SystemExit(main())", "up", "--port", str(port)]
    if device == "cpu":
        args.append("--cpu")
    with open(Path(cache) / "up.log", "wb") as log:
        process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while not _ready(url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dgserve up did not become ready; see {cache}/up.log")
            time.sleep(0.5)
        yield url
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def run_prefix_workload(args: argparse.Namespace) -> None:
    """One prefix-cache workload with the cache on and off on the same loaded model; prints one JSON line."""
    import prefix_bench
    import torch

    from engine.checkpoint import random_model_in_memory
    from engine.loader import load_model

    dtype = getattr(torch, args.dtype)
    if args.model is not None:
        loaded = load_model(args.model, device=args.device, dtype=dtype)
    else:  # random weights built on the device: the `full` preset has no file to write or read
        loaded = random_model_in_memory(args.preset, args.device, dtype, seed=0,
                                        folder=tempfile.mkdtemp(prefix="edit-bench-model-"))
    sizes: dict[str, Any] = {"max_canvases_in_flight": args.concurrency, "max_context": args.max_context}
    if args.kv_cache_gb is not None:  # both engines live at once: each needs its own share of the card
        sizes["kv_cache_bytes"] = int(args.kv_cache_gb * 2**30)
    if args.eager:  # no per-bucket compiles (CUDA compiles the step by default): minutes saved on a short lease
        sizes["compile_step"] = False
    if args.mode == "capacity":
        print(json.dumps(prefix_bench.run_capacity(loaded, slots=8, requests=64, max_context=4096, seed=args.seed)))
        return
    results = {}
    if args.mode == "session":  # both engines live at once: the settings take turns, round by round
        engines = {caching: prefix_bench._engine(loaded, caching, **sizes) for caching in (True, False)}
        documents = make_documents(args.docs, seed=args.seed, chars=args.doc_chars)
        results = prefix_bench.run_session(engines, documents, args.n, args.concurrency, args.steps, args.seed,
                                           rounds=args.rounds, order=args.edit_order, accept_rate=args.accept_rate)
    for caching in (True, False) if args.mode == "chat" else ():
        engine = prefix_bench._engine(loaded, caching, **sizes)
        results[caching] = prefix_bench.run_chat(engine, args.chat_requests, args.steps, args.seed)
        del engine
    keys = ("edits_per_s", "p50_s", "p99_s") if args.mode == "session" else ("prefill_tokens_computed", "ttfc_p50_s")
    print(json.dumps(prefix_bench.compare(args.mode, results[True], results[False], keys)), flush=True)


def _char_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    try:
        bounds = int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--doc-chars takes MIN:MAX characters, got {text!r}") from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError(f"--doc-chars needs 1 <= MIN <= MAX, got {text!r}")
    return bounds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["engine", "stack", "both", "session", "chat", "capacity"],
                        default="engine")
    parser.add_argument("--n", type=int, default=1000, help="edits for the engine run")
    parser.add_argument("--stack-n", type=int, default=None, help="edits for the stack run (default --n)")
    parser.add_argument("--docs", type=int, default=50)
    parser.add_argument("--chat-requests", type=int, default=64, help="--mode chat: requests sharing the prompt")
    parser.add_argument("--rounds", type=int, default=3,
                        help="--mode session: rounds in which the cache settings take turns")
    parser.add_argument("--doc-chars", type=_char_range, default=(200, 2000), metavar="MIN:MAX",
                        help="document sizes in characters (default 200:2000)")
    parser.add_argument("--edit-order", choices=["random", "forward"], default="random",
                        help="--mode session: where edits go: random words, or walking forward through each "
                             "document about a dozen spans per pass")
    parser.add_argument("--accept-rate", type=float, default=0.5,
                        help="--mode session: share of finished edits the user accepts (the document moves on)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None, help="fixed denoising steps (default: sampler stops)")
    parser.add_argument("--model", default=None, help="checkpoint folder or hub id (default: random tiny)")
    parser.add_argument("--preset", default="tiny",
                        help="--mode session|chat|capacity without --model: random weights of this preset, built "
                             "on --device (tiny, small, full)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="--mode session|chat|capacity: model dtype")
    parser.add_argument("--max-context", type=int, default=8192,
                        help="--mode session|chat: positions per request (documents longer than this are refused)")
    parser.add_argument("--kv-cache-gb", type=float, default=None,
                        help="--mode session|chat: KV budget of each engine in GiB (default: the engine's)")
    parser.add_argument("--eager", action="store_true",
                        help="--mode session|chat: run the decoder step eagerly on CUDA too (no compiles)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--api", default=None,
                        help="API base URL for --mode stack (default: launch `dgserve up` on a free port)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    documents = make_documents(args.docs, seed=args.seed, chars=args.doc_chars)
    if args.mode in ("session", "chat", "capacity"):
        run_prefix_workload(args)
        return
    model = _model_dir(args.model) if args.mode != "stack" or args.api is None else args.model
    if args.mode in ("engine", "both"):
        from engine import Engine

        engine = Engine.from_pretrained(model, device=args.device, max_canvases_in_flight=args.concurrency)
        edits = make_edits(documents, args.n, seed=args.seed + 1)
        print(json.dumps(run_engine(engine, documents, edits, args.concurrency, args.steps, args.seed)), flush=True)
        del engine
    if args.mode in ("stack", "both"):
        edits = make_edits(documents, args.stack_n or args.n, seed=args.seed + 2)
        with contextlib.ExitStack() as stack:
            url = args.api or stack.enter_context(launched_stack(model, args.concurrency, args.device))
            print(json.dumps(run_stack(url, documents, edits, args.concurrency, args.steps, args.timeout,
                                       args.api_key)), flush=True)


if __name__ == "__main__":
    main()
