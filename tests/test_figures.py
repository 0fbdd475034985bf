"""The paper's remaining pictures: Figures 3-5 side by side (HTML, spaCy tags, model text escaped) and Figure 1
(PNG from a real mask optimisation on a tiny Llama)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from atmanrl.eval.side_by_side import side_by_side_html, tagged_html

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def record(label, cot, question="Tom has 3 apples. How many?"):
    return {"label": label, "samples": [{"problem": 0, "sample": 0, "question": question, "cot": cot,
                                         "answer": " 3", "correct": True, "gold": "3", "cot_tokens": 9}]}


def test_side_by_side_escapes_model_text_and_colours_tags():
    evil = "<script>alert(1)</script> so 3 + 4 = 7 & done"
    page = side_by_side_html(record("Base<b>", evil), record("AtManRL", "3 + 4 = 7"), [0])
    assert "<script" not in page and "Base<b>" not in page
    assert "&lt;script&gt;" in page and "&amp;" in page and "Base&lt;b&gt;" in page
    assert '<span class="num">3</span>' in page and '<span class="sym">=</span>' in page


def test_tagged_html_keeps_the_text_and_its_spacing():
    import html
    import re

    text = "Janet sells 16 - 3 - 4 = 9 duck eggs a day.\n\nSo <9>."
    out = tagged_html(text)
    assert html.unescape(re.sub(r"</?span[^>]*>", "", out)) == text
    assert '<span class="stop">a</span>' in out and '<span class="num">16</span>' in out


def test_side_by_side_refuses_different_problems(tmp_path):
    with pytest.raises(ValueError, match="same --data, --n and --seed"):
        side_by_side_html(record("a", "x"), record("b", "y", question="Another question?"), [0])
    spec = importlib.util.spec_from_file_location("side_by_side", EXPERIMENTS / "side_by_side.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    (tmp_path / "a.json").write_text(json.dumps(record("a", "3 + 4 = 7")))
    (tmp_path / "b.json").write_text(json.dumps(record("b", "7")))
    assert cli.main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "s.html")]) == 0
    assert "<h2>Problem 0</h2>" in (tmp_path / "s.html").read_text()
    assert cli.main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--problems", "5"]) == 2


def test_figure1_png_from_a_real_mask(tmp_path):
    pytest.importorskip("matplotlib")
    from atmanrl.model.llama import Llama, LlamaConfig
    from atmanrl.saliency import SaliencyConfig, SaliencyInput, saliency
    from atmanrl.saliency.figure1 import figure1

    torch.set_num_threads(1)
    cfg = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rope_scaling=None, max_position_embeddings=64,
                      tie_word_embeddings=True)
    model = Llama(cfg).init_weights(std=0.3, generator=torch.Generator().manual_seed(0)).eval()
    x = SaliencyInput.from_parts([1, 2, 3], list(range(5, 17)), [4], [20, 21])
    (result,) = saliency(model, [x], SaliencyConfig(steps=5, lr=1e-2, return_mask=True))
    tokens = [f" w{i}" for i in range(12)]
    path = figure1(result, tokens, tmp_path / "fig" / "figure1.png", answer_row=x.answer[0] - x.cot[0])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    with pytest.raises(ValueError, match="return_mask=True"):
        (plain,) = saliency(model, [x], SaliencyConfig(steps=2))
        figure1(plain, tokens, tmp_path / "x.png")
