"""How often a seeded request's tokens differ alone vs batched with others (GEMM rounding depends on the row
count), per dtype, and whether re-running the same batch repeats them exactly.

    OMP_NUM_THREADS=2 .venv/bin/python bench/batch_invariance.py --model models/dgtiny --dtypes float32,bfloat16

Each trial: one prompt of 3 sliding windows with seed 77 + trial, run alone, then beside 5 other requests
(prompts of 50..210 tokens), then that same batch again; `--new-tokens` tokens at `--steps` fixed steps.
Prints one line per trial and a total per dtype; with --json writes them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import Engine, EngineConfig, EngineRequest, LoadedModel, SamplingParams, load_model  # noqa: E402


def generate(loaded: LoadedModel, requests: list[EngineRequest]) -> list[list[int]]:
    engine = Engine(loaded, EngineConfig(max_canvases_in_flight=len(requests), max_context=2048))
    ids = [engine.add_request(request) for request in requests]
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    return [[t for o in outputs if o.request_id == i and o.kind == "canvas" for t in o.token_ids] for i in ids]


def trial(loaded: LoadedModel, index: int, new_tokens: int, steps: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(index)
    vocab, window = loaded.config.vocab_size, loaded.config.sliding_window

    def request(length: int, seed: int) -> EngineRequest:
        prompt = tuple(torch.randint(3, vocab, (length,), generator=gen).tolist())
        return EngineRequest(prompt_token_ids=prompt, params=SamplingParams(
            seed=seed, max_new_tokens=new_tokens, max_denoising_steps=steps, fixed_steps=True))

    subject = request(3 * window, 77 + index)
    others = [request(50 + 40 * k, k) for k in range(5)]
    alone = generate(loaded, [subject])[0]
    batched = generate(loaded, [subject, *others])[0]
    again = generate(loaded, [subject, *others])[0]
    return {"trial": index, "alone_first": alone[:4], "batched_first": batched[:4], "tokens": len(alone),
            "differing": sum(a != b for a, b in zip(alone, batched, strict=True)), "rerun_identical": again == batched}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/dgtiny")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    report: dict[str, Any] = {}
    for dtype_name in args.dtypes.split(","):
        loaded = load_model(args.model, dtype=getattr(torch, dtype_name))
        trials = []
        for index in range(args.trials):
            trials.append(trial(loaded, index, args.new_tokens, args.steps))
            print(dtype_name, trials[-1], flush=True)
        total = {"differing": sum(t["differing"] for t in trials), "tokens": sum(t["tokens"] for t in trials),
                 "reruns_identical": all(t["rerun_identical"] for t in trials)}
        print(dtype_name, "total", total, flush=True)
        report[dtype_name] = {"trials": trials, "total": total}
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
