"""The training/evaluation building blocks of the embedded model (issue 5): corpus split, tokenizer
layout, example corruption, infill item extraction and the parse check. All CPU-cheap."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from dgtext.byte_tokenizer import special_token_layout
from engine.checkpoint import initialise_random, save_checkpoint
from engine.config import preset
from engine.kv_cache import KVCache
from engine.model.transformer import DiffusionGemmaModel
from scripts.train_tiny import initial_weights
from training import objective
from training.corpus import SourceFile, is_held_out, load_split
from training.data import DataLayout, ExampleSampler, line_break_ids
from training.eval_tasks import (
    completion_parses,
    disjoint_signatures,
    function_signatures,
    infill_items,
    score_infill,
)
from training.tokenizer import train_bpe_tokenizer

CODE = '''import os


def join_all(parts, sep="/"):
    """Join path parts."""
    result = ""
    for part in parts:
        result = os.path.join(result, part)
    return result


class Box:
    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value
'''


def small_tokenizer() -> Tokenizer:
    return train_bpe_tokenizer([CODE] * 20, vocab_size=420)


def test_split_is_a_pure_function_of_the_path_and_disjoint(tmp_path) -> None:
    names = [f"pkg{i}/mod{i}.py" for i in range(60)]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(f"x = {name!r}\n")
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "test_x.py").write_text("y = 1\n")
    train = {f.relative_path for f in load_split("train", tmp_path)}
    held = {f.relative_path for f in load_split("heldout", tmp_path)}
    assert train.isdisjoint(held) and train | held == set(names)  # test/ is excluded
    assert held == {n for n in names if is_held_out(n)} and 0 < len(held) < len(names) // 3
    assert load_split("heldout", tmp_path) == load_split("heldout", tmp_path)


def test_tokenizer_keeps_the_released_special_layout_and_round_trips() -> None:
    tokenizer = small_tokenizer()
    assert tokenizer.get_vocab_size() == 420
    for token_id, token in enumerate(special_token_layout()):
        assert tokenizer.token_to_id(token) == token_id
    assert [tokenizer.token_to_id(t) for t in ("<pad>", "<eos>", "<bos>", "<mask>", "<|turn>", "<turn|>")] == \
        [0, 1, 2, 4, 105, 106]
    text = "def f(x):\n    return x  # é\n"
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == text and min(ids) >= 107
    assert len(ids) < len(text.encode())  # merges were learned


def test_span_examples_corrupt_only_one_span_and_targets_are_clean() -> None:
    tokenizer = small_tokenizer()
    stream = torch.tensor([2, *tokenizer.encode(CODE).ids, 1])
    layout = DataLayout(canvas_length=16, max_prompt_tokens=8, vocab_size=420, pad_id=0, bos_id=2, eos_id=1,
                        span_fraction=1.0)
    batch = ExampleSampler([stream], layout, seed=3).sample(64)
    corrupted = batch.canvas_noisy != batch.canvas_clean
    for row in corrupted:
        where = row.nonzero().flatten()
        if len(where):  # one contiguous span, never the whole canvas
            assert int(where[-1] - where[0]) < 16 - 1
    for b in range(4):
        n = int(batch.prompt_lens[b])
        assert torch.equal(batch.input_ids[b, n:n + 16], batch.canvas_clean[b])
        assert torch.equal(batch.canvas_positions[b], torch.arange(n, n + 16))
        valid_targets = batch.lm_targets[b][batch.lm_targets[b] != -100]
        assert torch.equal(valid_targets, batch.input_ids[b, 1:n + 16][batch.input_ids[b, 1:n + 16] != 0])
    full = ExampleSampler([stream], DataLayout(16, 8, 420, 0, 2, 1, span_fraction=0.0), seed=3).sample(64)
    assert (full.canvas_noisy != full.canvas_clean).float().mean() > 0.3  # t ~ U(eps, 1): about half


def test_line_span_examples_corrupt_exactly_one_whole_line() -> None:
    tokenizer = small_tokenizer()
    stream = torch.tensor([2, *tokenizer.encode(CODE).ids, 1])
    breaks = line_break_ids(tokenizer)
    assert breaks and all("\n" in tokenizer.decode([i]) for i in breaks)
    layout = DataLayout(16, 8, 420, 0, 2, 1, span_fraction=1.0, line_span_fraction=1.0, line_break_ids=breaks)
    batch = ExampleSampler([stream], layout, seed=4).sample(48)
    whole_lines = 0
    for clean, noisy in zip(batch.canvas_clean.tolist(), batch.canvas_noisy.tolist(), strict=True):
        noised = {i for i, (a, b) in enumerate(zip(clean, noisy, strict=True)) if a != b}
        at = [i for i, t in enumerate(clean) if t in breaks]
        lines = [set(range(a + 1, b)) for a, b in zip(at, at[1:], strict=False) if b - a >= 2]
        if not lines:  # no whole line in this canvas: an ordinary span instead
            continue
        # inside one line, and every token of it replaced (a random id may equal the clean one: 1 in 420)
        (line,) = [line for line in lines if noised <= line]
        assert len(noised) >= len(line) - 1
        whole_lines += 1
    assert whole_lines > 10
    try:
        DataLayout(16, 8, 420, 0, 2, 1, line_span_fraction=0.5)
    except ValueError as exc:
        assert "line_break_ids" in str(exc)
    else:
        raise AssertionError("a line span share without line-break ids must be refused")


def test_infill_items_mask_whole_lines_with_text_on_both_sides() -> None:
    tokenizer = small_tokenizer()
    files = [SourceFile("a.py", CODE)]
    items = infill_items(tokenizer, files, canvas_length=16, max_prompt_tokens=12, count=8, seed=0,
                         bos_id=2, eos_id=1, pad_id=0)
    assert len(items) == 8
    lines = CODE.split("\n")
    for item in items:
        target = tokenizer.decode(list(item.target_ids))
        line = lines[int(item.source.split(":")[1]) - 1]
        assert target.strip() and target.strip() in line and line.endswith(target)
        assert not any(item.is_fixed[: item.num_free]) and all(item.is_fixed[item.num_free:])
        assert 0 < len(item.prompt_ids) <= 12
    perfect = score_infill(items, [list(i.target_ids) for i in items])
    assert perfect.exact_match == 1.0 and perfect.token_accuracy == 1.0
    off_by_one = score_infill(items, [[0] + list(i.target_ids[1:]) for i in items])
    assert off_by_one.exact_match == 0.0 and 0 < off_by_one.token_accuracy < 1


def test_signatures_and_parse_check() -> None:
    assert function_signatures([SourceFile("a.py", CODE)], 5, 0) == ['def join_all(parts, sep="/"):']
    assert completion_parses("def f(x):", "\n    y = x\n    return y\n    if y", stopped=False)
    assert not completion_parses("def f(x):", "\n    if x:\n", stopped=True)
    assert not completion_parses("def f(x):", "\n    for", stopped=False)  # nothing complete is left
    assert not completion_parses("def f(x):", " x +", stopped=True)


def test_tuning_signatures_never_include_the_evaluated_ones() -> None:
    files = [SourceFile(f"m{i}.py", f"def f{i}(x):\n    return x\n") for i in range(30)]
    evaluated = function_signatures(files, 10, seed=0)
    tuning = disjoint_signatures(files, 15, seed=1, excluded=evaluated)
    assert len(tuning) == 15 and not set(tuning) & set(evaluated)
    assert len(disjoint_signatures(files, 50, seed=1, excluded=evaluated)) == 20  # all that is left


def test_corpus_leaves_out_generated_tables(tmp_path) -> None:
    (tmp_path / "pydoc_data").mkdir()
    (tmp_path / "pydoc_data" / "topics.py").write_text("topics = {'assert': 'The assert statement'}\n")
    (tmp_path / "encodings").mkdir()
    (tmp_path / "encodings" / "cp1.py").write_text(
        '""" Python Character Mapping Codec cp1 generated from \'VENDORS/CP1.TXT\'.\n"""\ndecoding_table = ()\n')
    (tmp_path / "encodings" / "idna.py").write_text("def nameprep(label):\n    return label\n")
    kept = {f.relative_path for split in ("train", "heldout") for f in load_split(split, tmp_path)}
    assert kept == {"encodings/idna.py"}


def _trainable_model(seed: int) -> DiffusionGemmaModel:
    config = dataclasses.replace(preset("tiny"), vocab_size=420, sliding_window=64, canvas_length=16)
    model = DiffusionGemmaModel(config)
    initialise_random(model, seed, std=0.2)  # larger than serving init: logits far from uniform
    return model


def test_encoder_loss_in_pieces_equals_the_loss_over_full_logits(monkeypatch) -> None:
    """The training objective scores only positions with a target, in row pieces; the value and the
    gradients must equal cross-entropy over the full [B, L, V] logits of the serving path."""
    tokenizer = small_tokenizer()
    stream = torch.tensor([2, *tokenizer.encode(CODE).ids, 1])
    batch = ExampleSampler([stream], DataLayout(16, 40, 420, 0, 2, 1), seed=5).sample(6)
    monkeypatch.setattr(objective, "ENCODER_LOSS_ROWS", 7)  # force many pieces and a ragged last one
    model = _trainable_model(seed=1)
    _, _, pieces_ce = objective._encode_context(model, batch)
    pieces_ce.backward()
    pieces_grad = model.embed_tokens.weight.grad.clone()
    model.zero_grad()
    rows, width = batch.input_ids.shape
    cache = KVCache(model.config, num_slots=rows, max_context=width, device=torch.device("cpu"), dtype=torch.float32)
    logits = model.encode(batch.input_ids, batch.positions, batch.token_valid, cache, torch.arange(rows),
                          return_logits=True, context_bound=0)
    whole_ce = F.cross_entropy(logits.flatten(0, 1), batch.lm_targets.flatten(), ignore_index=-100)
    whole_ce.backward()
    assert abs(pieces_ce.item() - whole_ce.item()) < 1e-5 and whole_ce.item() > 1.0
    torch.testing.assert_close(pieces_grad, model.embed_tokens.weight.grad, rtol=1e-4, atol=1e-6)


def test_training_logits_equal_serving_logits() -> None:
    """The autograd path of `logits` (one out-of-place expression) matches the chunked in-place path."""
    model = _trainable_model(seed=2)
    hidden = torch.randn(3, 5, model.config.hidden_size)
    with torch.no_grad():
        serving = model.logits(hidden)
    training = model.logits(hidden)
    assert training.requires_grad and float(serving.abs().max()) > 1.0
    torch.testing.assert_close(training.detach(), serving, rtol=1e-6, atol=1e-5)


def test_init_from_a_released_folder_restores_the_weights(tmp_path) -> None:
    model = _trainable_model(seed=3)
    tokenizer = small_tokenizer()
    save_checkpoint(model, model.config, tmp_path / "m", tokenizer)
    restored = initial_weights(tmp_path / "m")
    for name, tensor in model.state_dict().items():
        assert torch.equal(restored[name], tensor), name
