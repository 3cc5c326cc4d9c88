"""The shipped small model `models/dgtiny` (issue 5): released file layout and size, the tokenizer's
special layout, logits parity between our engine and the `transformers` reference on real code, evidence
that the weights are trained (not random), and a quick generation through the engine.

Shape legend: T prompt tokens, C canvas length, V vocab.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dgtext.byte_tokenizer import special_token_layout
from engine.engine import Engine
from engine.kv_cache import KVCache
from engine.loader import load_model
from engine.types import EngineRequest, SamplingParams

MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "dgtiny"
MAX_BYTES = 20 * 1024 * 1024
TOLERANCE = 1e-4
# Not stdlib text: code written for this test, so the trained-weights check is not a memorisation check.
SNIPPET = '''def count_words(path):
    """Return a dict mapping each word in the file to its count."""
    counts = {}
    with open(path) as handle:
        for line in handle:
            for word in line.split():
                counts[word] = counts.get(word, 0) + 1
    return counts
'''


@pytest.fixture(scope="module")
def loaded():
    return load_model(MODEL_DIR)


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def test_released_layout_within_size_budget() -> None:
    names = {p.name for p in MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "chat_template.jinja"} <= names
    assert sum(p.stat().st_size for p in MODEL_DIR.iterdir()) <= MAX_BYTES
    config = json.loads((MODEL_DIR / "config.json").read_text())
    assert config["model_type"] == "diffusion_gemma"
    text = config["text_config"]
    assert set(text["layer_types"]) == {"sliding_attention", "full_attention"}
    assert text["num_experts"] >= 4 and text["top_k_experts"] == 2
    generation = json.loads((MODEL_DIR / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [1, 106]


def test_tokenizer_special_layout_matches_the_released_model(loaded) -> None:
    tokenizer = loaded.tokenizer
    assert tokenizer.vocab_size == loaded.config.vocab_size
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_ids) == (0, 2, (1, 106))
    raw = tokenizer._tokenizer
    for token_id, token in enumerate(special_token_layout()):
        assert raw.token_to_id(token) == token_id
    chat = tokenizer.encode_prompt(messages=[{"role": "user", "content": "hi"}])
    assert chat[:2] == [2, 105] and 106 in chat
    assert tokenizer.decode(tokenizer.encode(SNIPPET)) == SNIPPET


@torch.no_grad()
def test_transformers_reference_gives_the_same_logits(loaded) -> None:
    transformers = pytest.importorskip("transformers")
    reference = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    cfg = loaded.config
    prompt = torch.tensor(loaded.tokenizer.encode_prompt(prompt=SNIPPET[:150]))  # [T]
    gen = torch.Generator().manual_seed(0)
    canvas = torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length), generator=gen)  # [1, C]
    sc_logits = 3 * torch.randn(1, cfg.canvas_length, cfg.vocab_size, generator=gen)  # [1, C, V]
    n = prompt.numel()
    cache = KVCache(cfg, num_slots=1, max_context=n + cfg.canvas_length)
    slots, lens = torch.tensor([0]), torch.tensor([n])
    ours_encoder = loaded.model.encode(prompt[None], torch.arange(n)[None], torch.ones(1, n, dtype=torch.bool),
                                       cache, slots, return_logits=True)
    canvas_positions = torch.arange(n, n + cfg.canvas_length)[None]
    ours_plain = loaded.model.denoise(canvas, canvas_positions, cache, slots, lens, None)
    ours_sc = loaded.model.denoise(canvas, canvas_positions, cache, slots, lens,
                                   loaded.model.self_conditioning_embeds(sc_logits))
    for sc, ours in ((None, ours_plain), (sc_logits, ours_sc)):
        out = reference(input_ids=prompt[None], decoder_input_ids=canvas, self_conditioning_logits=sc)
        assert relative_error(ours, out.logits) < TOLERANCE
    cap = cfg.final_logit_softcapping
    ref_encoder = torch.tanh(reference.lm_head(out.encoder_last_hidden_state).float() / cap) * cap
    assert relative_error(ours_encoder, ref_encoder) < TOLERANCE


@torch.no_grad()
def test_weights_are_trained_on_code(loaded) -> None:
    """Next-token loss on unseen code: ln(4096) = 8.3 nats for a uniform guess; the shipped model must
    be far below (a random-weight checkpoint scores about 8.3)."""
    ids = torch.tensor(loaded.tokenizer.encode_prompt(prompt=SNIPPET))[None]  # [1, T]
    n = ids.shape[1]
    cache = KVCache(loaded.config, num_slots=1, max_context=n)
    logits = loaded.model.encode(ids, torch.arange(n)[None], torch.ones(1, n, dtype=torch.bool), cache,
                                 torch.tensor([0]), return_logits=True)
    assert F.cross_entropy(logits[0, :-1], ids[0, 1:]).item() < 4.0


@pytest.mark.timeout(120)
def test_engine_generates_text_for_a_signature() -> None:
    engine = Engine.from_pretrained(MODEL_DIR, kv_cache_bytes=16 << 20, max_context=512)
    (result,) = engine.generate(
        [EngineRequest(prompt="def fibonacci(n):", params=SamplingParams(seed=0, max_new_tokens=64))], max_steps=200)
    assert result.finish_reason in ("stop", "length")
    assert engine.tokenizer.decode(result.token_ids).strip()
