"""Choose the small model's sampler defaults on a validation draw that the reported evaluation never uses.

    OMP_NUM_THREADS=2 python -m scripts.sweep_sampler --model models/dgtiny \
        --entropy-bounds 0.1 1 4 16 --steps 16 32 --temperatures 1.0:0.95 0.8:0.4

The validation items are held-out infill lines and signatures drawn with `--seed` + 1, minus anything the
evaluation (`scripts/eval_infill.py --seed S`) draws, so tuning cannot fit the reported numbers. Prints
one row per setting; the chosen values go into generation_config.json (scripts/train_tiny.py --gen-*).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

from engine.engine import Engine
from scripts.eval_infill import ENGINE_OPTIONS, PROMPT_TOKENS, evaluate
from training.corpus import load_split
from training.eval_tasks import disjoint_signatures, function_signatures, infill_items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/dgtiny"))
    parser.add_argument("--seed", type=int, default=0, help="the evaluation's seed (its draw is excluded)")
    parser.add_argument("--eval-infill-items", type=int, default=500, help="the evaluation's --infill-items")
    parser.add_argument("--eval-signatures", type=int, default=20, help="the evaluation's --signatures")
    parser.add_argument("--infill-items", type=int, default=120)
    parser.add_argument("--signatures", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--entropy-bounds", type=float, nargs="+", default=[0.1, 1.0, 4.0])
    parser.add_argument("--steps", type=int, nargs="+", default=[16])
    parser.add_argument("--temperatures", nargs="+", default=["1.0:0.95"], help="t_max:t_min pairs")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = Engine.from_pretrained(args.model, **ENGINE_OPTIONS)
    config, tokenizer = engine.config, engine.tokenizer._tokenizer
    heldout = load_split("heldout")
    ids = {"bos_id": config.bos_token_id, "eos_id": config.eos_token_ids[0], "pad_id": config.pad_token_id}

    def draw(count: int, seed: int) -> list:
        return infill_items(tokenizer, heldout, canvas_length=config.canvas_length, max_prompt_tokens=PROMPT_TOKENS,
                            count=count, seed=seed, **ids)

    evaluated = {item.source for item in draw(args.eval_infill_items, args.seed)}  # exactly the evaluation's draw
    items = [item for item in draw(args.infill_items + len(evaluated), args.seed + 1)
             if item.source not in evaluated][: args.infill_items]
    signatures = disjoint_signatures(heldout, args.signatures, args.seed + 1,
                                     excluded=function_signatures(heldout, args.eval_signatures, args.seed))
    print(f"validation: {len(items)} infill lines, {len(signatures)} signatures")
    print(f"{'entropy_bound':>13} {'steps':>5} {'t_max:t_min':>11} {'exact line':>10} {'token acc':>9} {'parses':>7}")
    for bound, steps, temps in itertools.product(args.entropy_bounds, args.steps, args.temperatures):
        t_max, t_min = (float(v) for v in temps.split(":"))
        sampler = {"entropy_bound": bound, "max_denoising_steps": steps, "t_max": t_max, "t_min": t_min}
        r = evaluate(engine, items, signatures, args.max_new_tokens, sampler)
        print(f"{bound:>13g} {steps:>5} {temps:>11} {r['infill_exact_match']:>10.3f} "
              f"{r['infill_token_accuracy']:>9.3f} {r['generation_parses']:>3}/{r['generation_total']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
