"""The edit benchmark's workload and engine loop on a handful of edits (keeps bench/edit_bench.py working)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

from engine import Engine
from tests.support.checkpoints import write_tiny_checkpoint

BENCH = Path(__file__).resolve().parents[2] / "bench" / "edit_bench.py"


@pytest.fixture(scope="module")
def edit_bench():
    spec = importlib.util.spec_from_file_location("edit_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_workload_is_deterministic_single_word_runs(edit_bench):
    documents = edit_bench.make_documents(5, seed=4)
    assert documents == edit_bench.make_documents(5, seed=4)
    assert all(200 <= len(doc) <= 2200 and not doc.endswith("\n") for doc in documents)
    edits = edit_bench.make_edits(documents, 40, seed=5)
    for edit in edits:
        span = documents[edit.document_index][edit.start:edit.end]
        assert re.fullmatch(r"\w+(\W+\w+){0,2}", span), span


def test_engine_loop_reports_every_edit(edit_bench, tmp_path):
    engine = Engine.from_pretrained(write_tiny_checkpoint(tmp_path / "ckpt", seed=1), device="cpu",
                                    dtype=torch.float32, max_canvases_in_flight=4)
    documents = [doc[:300] for doc in edit_bench.make_documents(3, seed=0)]
    edits = edit_bench.make_edits(documents, 6, seed=1)
    report = edit_bench.run_engine(engine, documents, edits, concurrency=4, steps=2, seed=0)
    assert report["edits"] == 6 and report["steps_per_canvas"] == 2.0
    assert report["edits_per_s"] > 0 and 0 < report["p50_s"] <= report["p99_s"]
    assert report["encoder_tokens_per_edit"] > 0


def test_session_workload_reports_model_flops_and_their_compute_bound_ratio(edit_bench, tmp_path):
    spec = importlib.util.spec_from_file_location("prefix_bench", BENCH.parent / "prefix_bench.py")
    prefix_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prefix_bench)
    checkpoint = write_tiny_checkpoint(tmp_path / "ckpt", seed=2)
    engines = {caching: Engine.from_pretrained(checkpoint, device="cpu", dtype=torch.float32,
                                               max_canvases_in_flight=4, enable_prefix_caching=caching)
               for caching in (True, False)}
    documents = [doc[:400] for doc in edit_bench.make_documents(2, seed=3)]
    results = prefix_bench.run_session(engines, documents, edits=8, concurrency=4, steps=2, seed=0, rounds=1,
                                       order="forward")
    on, off = results[True], results[False]
    assert on["edits"] == off["edits"] == 8
    # Each side counts its own edits (batches differ, so sampled tokens, hence later documents, may differ by
    # float rounding): the cache leaves the denoising work alone and removes most of the encoding.
    denoise_on = on["model_gflops_per_edit"] - on["model_encode_gflops_per_edit"]
    denoise_off = off["model_gflops_per_edit"] - off["model_encode_gflops_per_edit"]
    assert denoise_on > 0 and denoise_on == pytest.approx(denoise_off, rel=0.2)
    assert 0 < on["model_encode_gflops_per_edit"] < off["model_encode_gflops_per_edit"] / 2
    assert on["cached_prompt_tokens_per_edit"] > 0 == off["cached_prompt_tokens_per_edit"]
    line = prefix_bench.compare("session", on, off, ("edits_per_s", "p50_s"))
    assert line["compute_bound_edits_per_s_on_over_off"] == round(off["model_gflops_per_edit"]
                                                                  / on["model_gflops_per_edit"], 3) > 1
