import json

import pytest

from dgtext.byte_tokenizer import DEFAULT_EOS_IDS, MIN_VOCAB_SIZE, build_byte_tokenizer, special_token_layout
from dgtext.checkpoint_files import CheckpointError, resolve_model_dir
from dgtext.save_tokenizer import save_tokenizer_files
from dgtext.tokenizer import PromptTokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    save_tokenizer_files(build_byte_tokenizer(512), folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": list(DEFAULT_EOS_IDS), "pad_token_id": 0}))
    return folder


def test_special_layout_matches_released_ids():
    layout = special_token_layout()
    assert (layout[0], layout[1], layout[2], layout[3], layout[4]) == ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
    assert (layout[50], layout[105], layout[106]) == ("<|tool_response>", "<|turn>", "<turn|>")


@pytest.mark.parametrize("text", ["plain", "e\u0301 combining", "emoji 🙂👍🏽", "שלום RTL", "crlf\r\nline\ttab", "", "no newline"])
def test_byte_tokenizer_round_trips(tokenizer_dir, text):
    tok = PromptTokenizer.from_dir(tokenizer_dir)
    assert tok.decode(tok.encode(text)) == text


def test_vocab_size_is_exact_and_minimum_enforced():
    assert build_byte_tokenizer(600).get_vocab_size(with_added_tokens=True) == 600
    with pytest.raises(ValueError, match="at least"):
        build_byte_tokenizer(MIN_VOCAB_SIZE - 1)


def test_chat_template_renders_gemma_turns(tokenizer_dir):
    tok = PromptTokenizer.from_dir(tokenizer_dir)
    ids = tok.encode_prompt(messages=[{"role": "user", "content": "hi"}])
    assert tok.decode(ids, skip_special_tokens=False) == "<bos><|turn>user\nhi<turn|>\n<|turn>model\n"
    assert ids[0] == tok.bos_id == 2 and 105 in ids and 106 in ids


def test_raw_prompt_gets_bos_and_stop_ids_come_from_generation_config(tokenizer_dir):
    tok = PromptTokenizer.from_dir(tokenizer_dir)
    assert tok.encode_prompt(prompt="ab")[0] == 2
    assert tok.eos_ids == (1, 106) and tok.pad_id == 0


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one"),
    ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "exactly one"),
    ({"messages": []}, "non-empty"),
    ({"messages": [{"role": "robot", "content": "y"}]}, r"messages\[0\].role"),
    ({"messages": [{"role": "user", "content": 3}]}, r"messages\[0\].content"),
])
def test_bad_prompt_inputs_raise_clear_errors(tokenizer_dir, kwargs, message):
    tok = PromptTokenizer.from_dir(tokenizer_dir)
    with pytest.raises(ValueError, match=message):
        tok.encode_prompt(**kwargs)


def test_sandboxed_template_cannot_reach_python_internals(tmp_path, tokenizer_dir):
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (tmp_path / name).write_bytes((tokenizer_dir / name).read_bytes())
    (tmp_path / "chat_template.jinja").write_text("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    tok = PromptTokenizer.from_dir(tmp_path)
    with pytest.raises(ValueError, match="could not render"):
        tok.encode_prompt(messages=[{"role": "user", "content": "x"}])


def test_missing_tokenizer_and_missing_folder_are_actionable(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer.json is missing"):
        PromptTokenizer.from_dir(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_model_dir(str(tmp_path / "nope"))
    assert resolve_model_dir(str(tmp_path)) == tmp_path


def test_special_token_strings_in_user_text_stay_text(tokenizer_dir):
    tok = PromptTokenizer.from_dir(tokenizer_dir)
    ids = tok.encode_prompt(prompt="a<eos>b<turn|>")
    assert 1 not in ids and 106 not in ids
    assert tok.decode(ids) == "a<eos>b<turn|>"
    assert tok.encode("<eos>", parse_special=True) == [1]
