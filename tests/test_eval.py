"""Table 1 evaluation: pass@k, spaCy composition, the table with relative changes, and one end-to-end run."""

import json
from itertools import combinations
from pathlib import Path

import pytest

from atmanrl.eval import (
    Composition,
    composition,
    evaluate,
    mean_accuracy,
    pass_at_k,
    pass_at_k_unbiased,
    summarize,
    table1_markdown,
)
from atmanrl.tasks import Sample, Score


def test_pass_at_k_on_a_hand_made_result_set():
    correct = [
        [False, False, False, True],  # solved only by the 4th sample
        [True, True, False, False],
        [False, False, False, False],  # never solved
        [False, True, False, False],
    ]
    assert pass_at_k(correct) == 3 / 4  # the paper's pass@4: any of the 4 samples
    assert pass_at_k(correct, k=1) == 1 / 4  # only problem 2's first sample is right
    assert pass_at_k(correct, k=2) == 2 / 4
    assert mean_accuracy(correct) == 4 / 16


@pytest.mark.parametrize("n, c, k", [(4, 0, 4), (4, 1, 4), (4, 1, 1), (6, 2, 3), (8, 3, 2), (5, 5, 2)])
def test_unbiased_pass_at_k_equals_enumerating_all_k_subsets(n, c, k):
    samples = [True] * c + [False] * (n - c)
    subsets = list(combinations(range(n), k))
    expected = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
    assert pass_at_k_unbiased(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_composition_of_a_hand_tagged_sentence():
    # spaCy (en_core_web_sm) tags: Janet/PROPN sells/VERB 16/NUM -/SYM 3/NUM -/SYM 4/NUM =/SYM 9/NUM duck/NOUN
    # eggs/NOUN a/DET(stop) day/NOUN ./PUNCT -> 14 tokens: 4 numbers, 3 symbols, 1 stop word.
    # The newline run is a whitespace token and is not counted.
    (c,) = composition(["Janet sells 16 - 3 - 4 = 9 duck eggs a day.\n\n"])
    assert c == Composition(tokens=14, numbers=4, stop_words=1, symbols=3)
    assert c.percent() == pytest.approx({"numbers": 400 / 14, "stop_words": 100 / 14, "symbols": 300 / 14})
    (empty,) = composition([""])
    assert empty == Composition() and empty.percent()["numbers"] == 0


def sample(problem, correct, cot_tokens, answer="1"):
    return Sample(problem, 0, [], [], [], True, Score(correct, answer is not None, cot_tokens, answer=answer))


def test_summary_pools_composition_and_counts_problems():
    samples = [sample(0, True, 10), sample(0, False, 30, answer=None), sample(1, False, 20), sample(1, False, 40)]
    comps = [Composition(10, 2, 5, 1), Composition(30, 4, 10, 2), Composition(20, 0, 5, 0), Composition(0, 0, 0, 0)]
    s = summarize(samples, comps)
    assert (s["problems"], s["k"], s["samples"]) == (2, 2, 4)
    assert s["avg_cot_tokens"] == 25.0
    assert s["numbers_pct"] == pytest.approx(100 * 6 / 60) and s["stop_words_pct"] == pytest.approx(100 * 20 / 60)
    assert s["symbols_pct"] == pytest.approx(100 * 3 / 60)
    assert s["pass_at_k"] == 50.0 and s["accuracy"] == 25.0 and s["with_answer_pct"] == 75.0


def test_table1_reproduces_the_papers_relative_changes():
    base = {"k": 4, "avg_cot_tokens": 187.8, "numbers_pct": 11.98, "stop_words_pct": 29.27, "symbols_pct": 5.79,
            "pass_at_k": 91.4, "accuracy": 80.0}
    ours = {"k": 4, "avg_cot_tokens": 119.7, "numbers_pct": 15.94, "stop_words_pct": 25.23, "symbols_pct": 8.45,
            "pass_at_k": 89.4, "accuracy": 80.0}
    lines = table1_markdown([("AtManRL", ours), ("Baseline", base)], baseline="Baseline").splitlines()
    assert lines[0] == ("| | Avg. token / CoT ↓ | Numbers % ↑ | Stop words % ↓ | Symbols % ↑ | Pass@4 ↑ "
                        "| Accuracy % ↑ |")
    # Relative changes as in the paper's table; percentage points as its text quotes them ("4% fewer stop words").
    assert lines[2] == ("| AtManRL | 119.7 (-36%) | 15.94 (+33%, +3.96 pp) | 25.23 (-14%, -4.04 pp) "
                        "| 8.45 (+46%, +2.66 pp) | 89.4 (-2%, -2.0 pp) | 80.0 (+0%, +0.0 pp) |")
    assert lines[3] == "| Baseline | 187.8 | 11.98 | 29.27 | 5.79 | 91.4 | 80.0 |"
    with pytest.raises(ValueError, match="not one of the rows"):
        table1_markdown([("AtManRL", ours)], baseline="Baseline")


def test_evaluate_end_to_end_on_smollm2(smollm2, tmp_path):
    from atmanrl.tasks.gsm8k import GSM8KTask
    from atmanrl.tasks.synthetic import synthetic_problems

    model, tok = smollm2
    task, problems = GSM8KTask(tok), synthetic_problems(2, seed=0)
    result = evaluate(model, task, problems, k=2, max_new_tokens=8, seed=0, progress=False)
    samples = result["samples"]
    assert len(samples) == 4 and [s["problem"] for s in samples] == [0, 0, 1, 1]
    for s in samples:
        assert s["completion"].startswith(s["cot"]) and s["cot_tokens"] <= s["completion_tokens"] <= 8
        assert set(s["composition"]) == {"tokens", "numbers", "stop_words", "symbols"}
    assert result["summary"]["samples"] == 4
    json.dumps(result)  # every field serialises
    again = evaluate(model, task, problems, k=2, max_new_tokens=8, seed=0, progress=False)
    assert [s["completion"] for s in again["samples"]] == [s["completion"] for s in samples]


def test_compare_mode_prints_relative_changes(tmp_path, capsys):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "experiments" / "eval_gsm8k.py"
    spec = importlib.util.spec_from_file_location("eval_gsm8k", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    base = {"k": 4, "avg_cot_tokens": 200.0, "numbers_pct": 10.0, "stop_words_pct": 30.0, "symbols_pct": 5.0,
            "pass_at_k": 90.0, "accuracy": 70.0}
    ours = dict(base, avg_cot_tokens=100.0, symbols_pct=6.0)
    for name, summary in [("baseline", base), ("atmanrl", ours)]:
        (tmp_path / f"{name}.json").write_text(json.dumps({"label": "run", "summary": summary, "samples": []}))
    script.main(["--compare", str(tmp_path / "baseline.json"), str(tmp_path / "atmanrl.json")])
    out = capsys.readouterr().out.splitlines()
    assert out[2].startswith("| run (atmanrl) | 100.0 (-50%) | 10.00 (+0%, +0.00 pp) | 30.00 (+0%, +0.00 pp) "
                             "| 6.00 (+20%, +1.00 pp) |")
    assert out[3].startswith("| run (baseline) | 200.0 | 10.00 |")
