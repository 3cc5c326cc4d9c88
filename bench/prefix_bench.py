"""Prefix-cache workloads (issue 9), each run with the cache on and off in one process, side by side:

- `session`: an editing session: a few documents, many single-span edits each, `--concurrency` in flight
  (closed loop); editor i works on document i mod `--docs` and takes its current version; edits go to random
  words or walk forward through the document (`--edit-order`), and a share of the finished edits
  (`--accept-rate`, default half) is accepted, so later edits of that document see the new text. Reports
  edits/s, p50/p99 latency, prompt / cached / encoder tokens per edit, and the model GFLOPs each edit needs
  (engine/flops.py: what an engine bound by arithmetic computes); their off/on ratio,
  `compute_bound_edits_per_s_on_over_off`, is the speed-up such an engine would get from the cache on this
  workload: a ceiling set by the workload and the model's shapes, not by the engine.
- `chat`: `--chat-requests` chat requests sharing a 1,000-token system prompt, all submitted at once:
  prefill tokens computed and time to first canvas.
- `capacity`: at one KV byte budget, prompts of 50..3,000 tokens: how many requests are in flight at once
  with the paged cache, against the slots the previous design (one `max_context` slot per request) allowed.

    OMP_NUM_THREADS=1 .venv/bin/python bench/edit_bench.py --mode session --concurrency 16 --n 96 --docs 4 --steps 4
    OMP_NUM_THREADS=1 .venv/bin/python bench/edit_bench.py --mode session --concurrency 16 --n 96 --docs 16 \
        --steps 4 --edit-order forward
    OMP_NUM_THREADS=2 .venv/bin/python bench/edit_bench.py --mode chat --concurrency 64 --chat-requests 64 --steps 2
    OMP_NUM_THREADS=1 .venv/bin/python bench/edit_bench.py --mode capacity

One OpenMP thread for the session: on the shared 2-core machine two threads stall in every op's parallel
region whenever another process holds a core, which made single steps take seconds (docs/benchmarks.md).
Run through `bench/edit_bench.py` (which owns the model and document options); one JSON line per result.
"""

from __future__ import annotations

import random
import re
import statistics
import time
from typing import Any

from dgtext.edit_result import assemble_edit_result
from dgtext.edits import EditSpec, plan_edits, resolve_edits


def _engine(loaded: Any, caching: bool, **options: Any) -> Any:
    from engine import Engine, EngineConfig

    return Engine(loaded, EngineConfig(enable_prefix_caching=caching, **options))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _edit_request(engine: Any, document: str, rng: random.Random, number: int, steps: int | None,
                  seed: int, last_word: bool = False, at: int | None = None) -> tuple[Any, Any]:
    """A single-span edit of 1-3 words of `document` -> (EngineRequest, plan): at a random word, at its last
    word (`last_word`), or at the first word that ends after character `at` (the first word if none does)."""
    from engine.types import EngineRequest, InfillCanvas, SamplingParams

    words = [m.span() for m in re.finditer(r"\w+", document)]
    if last_word:
        first = len(words) - 1
    elif at is not None:
        first = next((i for i, (_, end) in enumerate(words) if end > at), 0)
    else:
        first = rng.randrange(len(words))
    last = min(first + rng.randint(0, 2), len(words) - 1)
    resolved = resolve_edits(document, [EditSpec(start=words[first][0], end=words[last][1])])
    length = engine.config.canvas_length
    plan = plan_edits(document, resolved, engine.tokenizer, length, insertion_tokens=length)
    params = SamplingParams(seed=seed + number, max_denoising_steps=steps, fixed_steps=steps is not None)
    canvases = tuple(InfillCanvas(c.leading_token_ids, c.token_ids, c.is_fixed) for c in plan.canvases)
    return EngineRequest(prompt_token_ids=plan.prompt_token_ids, params=params, infill=canvases), plan


EDIT_ORDERS = ("random", "forward")
SPANS_PER_PASS = 12  # "an editor sends a dozen spans of one file": forward order's mean gap is 1/12 of a document


class SessionDocuments:
    """One cache setting's documents as the session goes, and where each edit goes.

    `random`: each edit picks a random word of its document. `forward`: each document has a cursor (starting
    at a seeded random place), and each edit of it starts at the first word past the cursor plus a random gap
    of 0..2/SPANS_PER_PASS of the document (so about a dozen spans per pass), then moves the cursor to its
    span's end, wrapping to the top at the end: a user walking through a file span by span. A finished edit
    is accepted with probability `accept_rate`. Edit n draws from its own seeded generator, so
    both settings make the same choices for edit n.

    Accepting applies the edit's replacement to its span in the *current* document, moved past the edits
    accepted since it was submitted (as an editor applies a result to the span it sent); a result whose span
    another accepted edit touched meanwhile is not applied. (Before 2026-11-30 the stale whole result document
    replaced the current one, undoing the edits accepted in between: see docs/benchmarks.md.)"""

    def __init__(self, documents: list[str], order: str, seed: int, accept_rate: float = 0.5) -> None:
        if order not in EDIT_ORDERS:
            raise ValueError(f"order must be one of {EDIT_ORDERS}, got {order!r}")
        self.docs, self.order, self.seed, self.accept_rate = list(documents), order, seed, accept_rate
        self.cursors = [random.Random(f"cursor-{seed}-{i}").randrange(len(doc)) for i, doc in enumerate(documents)]
        # Per document, every accepted change in order: (position, old length, new length).
        self.changes: list[list[tuple[int, int, int]]] = [[] for _ in documents]
        self.accepted = self.conflicts = 0

    def next_edit(self, engine: Any, editor: int, turn: int, steps: int | None) -> tuple[Any, Any, int, int]:
        """Editor `editor`'s edit number `turn`, of document editor % len(docs) -> (EngineRequest, plan,
        document index, version: the number of changes its document had when the edit was made)."""
        index = editor % len(self.docs)
        document, rng = self.docs[index], random.Random(f"edit-{self.seed}-{editor}-{turn}")
        at = None
        if self.order == "forward":
            at = self.cursors[index] + rng.randint(0, 2 * len(document) // SPANS_PER_PASS)
            at = at if at < len(document) else 0
        request, plan = _edit_request(engine, document, rng, editor * 100_000 + turn, steps, self.seed, at=at)
        if self.order == "forward":
            self.cursors[index] = plan.spans[0].edit.end
        return request, plan, index, len(self.changes[index])

    def accept(self, index: int, version: int, outcome: Any) -> None:
        """Apply a finished edit's `outcome` (an `EditOutcome` of a document at `version`) to the document."""
        start, end = outcome.original_start, outcome.original_end
        for position, old, new in self.changes[index][version:]:
            if position + old <= start and (old or position < start):  # wholly before the span: shift it
                start, end = start + new - old, end + new - old
            elif position >= end and (old or position > end):
                continue  # wholly after the span
            else:  # the span was changed meanwhile: the user would not apply this stale result
                self.conflicts += 1
                return
        document = self.docs[index][:start] + outcome.replacement + self.docs[index][end:]
        if not re.search(r"\w", document):  # keep a word to edit
            return
        self.docs[index] = document
        self.changes[index].append((start, end - start, len(outcome.replacement)))
        self.accepted += 1


def run_session(engines: dict[bool, Any], documents: list[str], edits: int, concurrency: int, steps: int | None,
                seed: int, rounds: int = 3, order: str = "random", accept_rate: float = 0.5) -> dict[bool, dict]:
    """`concurrency` editors per cache setting (`engines`: setting -> engine); editor i works on document
    i % len(documents) and sends its next edit when the previous one finished (closed loop), edits placed by
    `order` (`SessionDocuments`); about `edits` edits in all (each editor makes the same number). They run in
    `rounds` rounds, the settings taking turns within each round (the first setting alternates), so that load
    on a shared machine weighs on both alike; each setting keeps its own documents and cache across rounds.
    An editor's n-th edit makes the same seeded choices in both settings. Untimed warm-up first: one edit of
    each document's last word (the editor opening the document)."""
    totals: dict[bool, dict] = {}
    docs = {caching: SessionDocuments(documents, order, seed, accept_rate) for caching in engines}
    for caching, engine in engines.items():
        rng = random.Random(seed)
        for index, document in enumerate(documents):
            request, _ = _edit_request(engine, document, rng, 1_000_000 + index, steps, seed, last_word=True)
            engine.add_request(request, request_id=f"warm-{index}")
        while engine.has_unfinished():
            engine.step()
        totals[caching] = {"latencies": [], "wall": 0.0, "cached": 0, "prompt": 0, "encoder_tokens": 0,
                           "encode_flops": 0, "denoise_flops": 0}
    turns = max(1, -(-edits // (concurrency * rounds)))  # edits per editor per round
    for number in range(rounds):
        for caching in sorted(engines, reverse=number % 2 == 0):
            _closed_loop(engines[caching], docs[caching], range(number * turns, (number + 1) * turns),
                         concurrency, steps, totals[caching])
    return {caching: {**_session_summary(total), "edit_order": order, "accept_rate": accept_rate,
                      "documents": len(documents), "accepted": docs[caching].accepted,
                      "accepts_dropped_as_stale": docs[caching].conflicts} for caching, total in totals.items()}


def _closed_loop(engine: Any, docs: SessionDocuments, turns: range, editors: int, steps: int | None,
                 total: dict) -> None:
    """Every editor makes its edits `turns`, one at a time; accumulates latencies, token counts and model FLOPs in
    `total`."""
    in_flight: dict[str, tuple[float, Any, list, tuple[int, int, int, int]]] = {}

    def submit(editor: int, turn: int) -> None:
        request, plan, doc_index, version = docs.next_edit(engine, editor, turn, steps)
        rid = engine.add_request(request, request_id=f"edit-{editor}-{turn}")
        in_flight[rid] = (time.perf_counter(), plan, [], (editor, turn, doc_index, version))

    for editor in range(editors):
        submit(editor, turns.start)
    started = time.perf_counter()
    while in_flight:
        outputs = engine.step()
        total["encoder_tokens"] += engine.last_step_stats.num_encoder_tokens
        for out in outputs:
            added_at, plan, committed, (editor, turn, doc_index, version) = in_flight[out.request_id]
            if out.kind == "canvas":
                committed.append(out.token_ids)
            elif out.kind == "finished":
                if out.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"{out.request_id} ended with {out.finish_reason}: {out.error}")
                result = assemble_edit_result(plan, committed, engine.tokenizer)
                if random.Random(f"accept-{docs.seed}-{out.request_id}").random() < docs.accept_rate:
                    docs.accept(doc_index, version, result.edits[0])
                total["latencies"].append(time.perf_counter() - added_at)
                total["cached"] += out.stats.cached_prompt_tokens
                total["prompt"] += out.stats.prompt_tokens
                flops = _edit_flops(engine.config, plan, out.stats)
                total["encode_flops"] += flops.encode
                total["denoise_flops"] += flops.denoise
                del in_flight[out.request_id]
                if turn + 1 < turns.stop:  # the editor asks for its next span
                    submit(editor, turn + 1)
    total["wall"] += time.perf_counter() - started


def _session_summary(total: dict) -> dict:
    latencies, n = total["latencies"], len(total["latencies"])
    return {"edits": n, "wall_s": round(total["wall"], 2), "edits_per_s": round(n / total["wall"], 3),
            "p50_s": round(_percentile(latencies, 0.5), 3), "p99_s": round(_percentile(latencies, 0.99), 3),
            "prompt_tokens_per_edit": round(total["prompt"] / n, 1),
            "cached_prompt_tokens_per_edit": round(total["cached"] / n, 1),
            "encoder_tokens_per_edit": round(total["encoder_tokens"] / n, 1),
            "model_gflops_per_edit": round((total["encode_flops"] + total["denoise_flops"]) / n / 1e9, 4),
            "model_encode_gflops_per_edit": round(total["encode_flops"] / n / 1e9, 4)}


def _edit_flops(config: Any, plan: Any, stats: Any) -> Any:
    """The model FLOPs of one finished edit (engine/flops.py): its uncached prompt, every canvas's leading
    text and commit, and its denoising steps, spread evenly over its canvases (exact with fixed steps, as
    `--steps` sets)."""
    from engine.flops import request_flops

    canvases = stats.canvases
    steps = [stats.denoising_steps // canvases + (k < stats.denoising_steps % canvases) for k in range(canvases)]
    leading = [len(canvas.leading_token_ids) for canvas in plan.canvases[:canvases]]
    return request_flops(config, stats.prompt_tokens, stats.cached_prompt_tokens, leading, steps)


SYSTEM_PROMPT_TOKENS = 1000


def _system_prompt(tokenizer: Any, tokens: int, seed: int) -> str:
    """Words of a made-up policy until the text is `tokens` tokens long with this tokenizer."""
    rng = random.Random(seed)
    words = ["policy", "answer", "briefly", "cite", "sources", "never", "guess", "user", "tools", "format"]
    text = ""
    while len(tokenizer.encode(text)) < tokens:
        text += rng.choice(words) + " "
    return text


def run_chat(engine: Any, requests: int, steps: int | None, seed: int) -> dict:
    """`requests` chats sharing one system prompt of about 1,000 tokens, all added at once."""
    from engine.types import EngineRequest, SamplingParams

    system = _system_prompt(engine.tokenizer, SYSTEM_PROMPT_TOKENS, seed)
    added: dict[str, float] = {}
    for number in range(requests):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": f"question {number}?"}]
        params = SamplingParams(seed=seed + number, max_new_tokens=engine.config.canvas_length,
                                max_denoising_steps=steps, fixed_steps=steps is not None)
        added[engine.add_request(EngineRequest(messages=messages, params=params))] = time.perf_counter()
    first_canvas: dict[str, float] = {}
    encoder_tokens, prompt_tokens, cached, started = 0, 0, 0, time.perf_counter()
    while engine.has_unfinished():
        outputs = engine.step()
        encoder_tokens += engine.last_step_stats.num_encoder_tokens
        for out in outputs:
            if out.kind == "canvas" and out.request_id not in first_canvas:
                first_canvas[out.request_id] = time.perf_counter() - added[out.request_id]
            if out.kind == "finished" and out.stats is not None:
                prompt_tokens += out.stats.prompt_tokens
                cached += out.stats.cached_prompt_tokens
    ttfc = list(first_canvas.values())
    return {"requests": requests, "system_prompt_tokens": len(engine.tokenizer.encode(system)),
            "prompt_tokens": prompt_tokens, "cached_prompt_tokens": cached, "prefill_tokens_computed": encoder_tokens,
            "ttfc_p50_s": round(_percentile(ttfc, 0.5), 3), "ttfc_p99_s": round(_percentile(ttfc, 0.99), 3),
            "ttfc_mean_s": round(statistics.fmean(ttfc), 3), "wall_s": round(time.perf_counter() - started, 2)}


def slot_design_bytes(config: Any, max_context: int, dtype: Any) -> int:
    """What one request cost in the previous slot design: full layers max_context + 1 rows, sliding layers a
    ring of window + 1 rows, plus the ring's int64 positions (the formula of its `bytes_per_slot`)."""
    import torch

    elem = torch.empty(0, dtype=dtype).element_size()
    total = 8 * (config.sliding_window + 1)
    for layer, kind in enumerate(config.layer_types):
        rows = max_context + 1 if kind == "full_attention" else config.sliding_window + 1
        total += 2 * rows * config.layer_kv_heads(layer) * config.layer_head_dim(layer) * elem
    return total


def run_capacity(loaded: Any, slots: int, requests: int, max_context: int, seed: int) -> dict:
    """Requests in flight at the byte budget of `slots` slots of the previous design (prompts 50..3000)."""
    from engine.types import EngineRequest, SamplingParams

    budget = slots * slot_design_bytes(loaded.config, max_context, loaded.model.embed_tokens.weight.dtype)
    engine = _engine(loaded, False, max_canvases_in_flight=3 * slots, max_context=max_context,
                     kv_cache_bytes=budget, max_tokens_per_forward=16384, sliding_chunk_tokens=64)
    rng = random.Random(seed)
    lengths = [rng.randint(50, 3000) for _ in range(requests)]
    for number, length in enumerate(lengths):
        ids = tuple(rng.randrange(3, loaded.config.vocab_size) for _ in range(length))
        params = SamplingParams(seed=number, max_new_tokens=loaded.config.canvas_length, max_denoising_steps=4096,
                                fixed_steps=True)  # nobody finishes: in flight is what admission allows
        engine.add_request(EngineRequest(prompt_token_ids=ids, params=params))
    # Admission depends only on the scheduler and the block manager: run their bookkeeping of each step
    # (plans, writes reported) without the forwards, which would not change who is admitted.
    peak, still, scheduler = 0, 0, engine.scheduler
    while scheduler.waiting and still < 3:
        for work in scheduler.schedule(now=time.monotonic()).encodes:
            scheduler.kv.after_write(work.request_id, work.token_ids)
        still = still + 1 if len(scheduler.running) == peak else 0
        peak = max(peak, len(scheduler.running))
    stats = engine.kv_stats()
    return {"budget_bytes": budget, "max_canvases_in_flight": 3 * slots, "sliding_chunk_tokens": 64,
            "slot_design_requests": slots, "paged_requests_in_flight": peak,
            "ratio": round(peak / slots, 2), "mean_prompt_tokens": round(statistics.fmean(lengths)),
            "full_blocks_used": stats.full_blocks_used, "full_blocks_total": stats.full_blocks_total}


def compare(name: str, on: dict, off: dict, keys: tuple[str, ...]) -> dict:
    """One result line: both runs and the on/off ratios of `keys`."""
    ratios = {f"{key}_on_over_off": round(on[key] / off[key], 3) for key in keys if off.get(key)}
    if on.get("model_gflops_per_edit"):
        ratios["compute_bound_edits_per_s_on_over_off"] = round(off["model_gflops_per_edit"]
                                                                / on["model_gflops_per_edit"], 3)
    return {"workload": name, "cache_on": on, "cache_off": off, **ratios}
