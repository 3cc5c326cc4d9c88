"""Evaluate the small model on held-out stdlib files (issue 5): single-line infill and signature completion.

    OMP_NUM_THREADS=2 python -m scripts.eval_infill --model models/dgtiny [--json out.json]

Three contestants on identical items: the trained checkpoint, the same config with random weights
(engine.checkpoint.initialise_random, same tokenizer), and a frequency baseline counted on the training
split (infill: the most frequent training line with the masked line's token count; generation: tokens
drawn from the unigram distribution). The models run through the real `Engine` (infill through
`InfillCanvas`: masked line free, following text fixed), with per-item seeds.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from engine.checkpoint import initialise_random, save_checkpoint
from engine.engine import Engine
from engine.loader import load_model
from engine.types import EngineRequest, InfillCanvas, SamplingParams
from training.corpus import load_split
from training.eval_tasks import (
    FrequencyBaseline,
    InfillItem,
    completion_parses,
    function_signatures,
    infill_items,
    score_infill,
)

PROMPT_TOKENS = 96  # left context of an infill item: what the model was trained with (train_tiny --max-prompt-tokens)
ENGINE_OPTIONS = {"max_canvases_in_flight": 32, "kv_cache_bytes": 256 << 20, "max_context": 1024}


def run_to_completion(engine: Engine, requests: Sequence[EngineRequest]) -> list[tuple[list[int], bool]]:
    """(committed ids, finished with "stop") per request, in order."""
    results = engine.generate(requests)
    for result in results:
        if result.finish_reason == "error":
            raise RuntimeError(f"request {result.request_id} failed: {result.finished.error}")
    return [(list(result.token_ids), result.finish_reason == "stop") for result in results]


def model_infill(engine: Engine, items: Sequence[InfillItem], sampler: dict) -> list[list[int]]:
    requests = [EngineRequest(prompt_token_ids=item.prompt_ids, params=SamplingParams(seed=n, **sampler),
                              infill=(InfillCanvas((), item.canvas_ids, item.is_fixed),))
                for n, item in enumerate(items)]
    return [ids[:item.num_free] for (ids, _), item in zip(run_to_completion(engine, requests), items, strict=True)]


def model_generation(engine: Engine, signatures: Sequence[str], max_new_tokens: int,
                     sampler: dict) -> list[tuple[str, bool]]:
    requests = [EngineRequest(prompt=sig, params=SamplingParams(seed=n, max_new_tokens=max_new_tokens, **sampler))
                for n, sig in enumerate(signatures)]
    stop_ids = set(engine.generation_defaults.stop_token_ids)
    return [(engine.tokenizer.decode([t for t in ids if t not in stop_ids]), stopped)
            for ids, stopped in run_to_completion(engine, requests)]


def untrained_engine(model_dir: Path, scratch: Path, seed: int) -> Engine:
    """The shipped config and tokenizer with freshly initialised weights."""
    loaded = load_model(model_dir)
    initialise_random(loaded.model, seed)
    save_checkpoint(loaded.model, loaded.config, scratch, model_dir, loaded.generation_defaults)
    return Engine.from_pretrained(scratch, **ENGINE_OPTIONS)


def evaluate(engine: Engine, items: Sequence[InfillItem], signatures: Sequence[str], max_new_tokens: int,
             sampler: dict | None = None) -> dict:
    """Infill and generation scores; `sampler` overrides the checkpoint's sampler defaults (SamplingParams
    field names), for sweeps."""
    sampler = sampler or {}
    score = score_infill(items, model_infill(engine, items, sampler))
    completions = model_generation(engine, signatures, max_new_tokens, sampler)
    parsed = [completion_parses(sig, text, stopped) for sig, (text, stopped) in zip(signatures, completions, strict=True)]
    return {"infill_exact_match": score.exact_match, "infill_token_accuracy": score.token_accuracy,
            "generation_parses": sum(parsed), "generation_total": len(signatures),
            "samples": [sig + text for sig, (text, _) in zip(signatures[:3], completions[:3], strict=True)]}


def evaluate_baseline(baseline: FrequencyBaseline, tokenizer, items: Sequence[InfillItem],
                      signatures: Sequence[str], max_new_tokens: int, seed: int) -> dict:
    score = score_infill(items, [baseline.predict_line(item.num_free) for item in items])
    rng = random.Random(seed)
    texts = [tokenizer.decode(baseline.sample_tokens(max_new_tokens, rng)) for _ in signatures]
    parsed = sum(completion_parses(sig, text, stopped=False) for sig, text in zip(signatures, texts, strict=True))
    return {"infill_exact_match": score.exact_match, "infill_token_accuracy": score.token_accuracy,
            "generation_parses": parsed, "generation_total": len(signatures)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/dgtiny"))
    parser.add_argument("--infill-items", type=int, default=500)
    parser.add_argument("--signatures", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--max-prompt-tokens", type=int, default=PROMPT_TOKENS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    trained = Engine.from_pretrained(args.model, **ENGINE_OPTIONS)
    config, tokenizer = trained.config, trained.tokenizer._tokenizer
    heldout = load_split("heldout")
    items = infill_items(tokenizer, heldout, canvas_length=config.canvas_length,
                         max_prompt_tokens=args.max_prompt_tokens, count=args.infill_items, seed=args.seed,
                         bos_id=config.bos_token_id, eos_id=config.eos_token_ids[0], pad_id=config.pad_token_id)
    signatures = function_signatures(heldout, args.signatures, args.seed)
    results = {"trained": evaluate(trained, items, signatures, args.max_new_tokens)}
    with tempfile.TemporaryDirectory() as scratch:
        results["untrained"] = evaluate(untrained_engine(args.model, Path(scratch), args.seed + 1), items,
                                        signatures, args.max_new_tokens)
    baseline = FrequencyBaseline(tokenizer, load_split("train"), excluded_ids=range(config.vocab_size)[:363])
    results["frequency"] = evaluate_baseline(baseline, tokenizer, items, signatures, args.max_new_tokens, args.seed)
    print(f"{'model':<10} {'exact line':>10} {'token acc':>10} {'parses':>8}   "
          f"({len(items)} infill lines, {len(signatures)} signatures)")
    for name, r in results.items():
        print(f"{name:<10} {r['infill_exact_match']:>10.3f} {r['infill_token_accuracy']:>10.3f} "
              f"{r['generation_parses']:>5}/{r['generation_total']}")
    for sample in results["trained"]["samples"]:
        print("---\n" + sample)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
