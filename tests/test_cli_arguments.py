"""Bad command-line input to experiments/eval_gsm8k.py and experiments/explain.py: each case is refused with a
sentence naming the argument, before any model is loaded; and --out decides both output files from its suffix."""

import importlib.util
import json
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def script(name):
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model is an error: every refusal must come before it."""
    import atmanrl.model

    def refuse(*a, **k):
        raise AssertionError("the model was loaded although the arguments are invalid")

    monkeypatch.setattr(atmanrl.model, "load", refuse)


@pytest.mark.parametrize("argv, message", [
    (["--k", "0"], "--k must be >= 1 (samples per problem), got 0"),
    (["--n", "0"], "--n must be >= 1 (problems to draw), got 0"),
    (["--n", "-1"], "--n must be >= 1 (problems to draw), got -1"),
    (["--threads", "-1"], "--threads must be >= 1 (torch CPU threads), got -1"),
    (["--k", "two"], "'two' is not an integer (samples per problem)"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--top-p", "1.5"], "--top-p: must be <= 1"),
])
def test_eval_refuses_bad_numbers(argv, message, capsys, no_model, tmp_path):
    with pytest.raises(SystemExit) as e:
        script("eval_gsm8k").main(argv + ["--out", str(tmp_path / "r.json")])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("out, json_name, md_name", [("res.md", "res.json", "res.md"),
                                                     ("res.json", "res.json", "res.md"),
                                                     ("a.b/res.JSON", "a.b/res.json", "a.b/res.md")])
def test_eval_out_suffix_decides_both_files(out, json_name, md_name):
    assert script("eval_gsm8k").output_paths(out) == (Path(json_name), Path(md_name))


def test_eval_out_md_writes_json_and_markdown_to_two_files(tmp_path, monkeypatch, capsys):
    """--out res.md: the JSON used to be written to res.md and then overwritten by the table."""
    import atmanrl.eval
    import atmanrl.model
    import atmanrl.tasks.registry

    summary = {"problems": 1, "k": 1, "samples": 1, "avg_cot_tokens": 3.0, "numbers_pct": 1.0, "stop_words_pct": 2.0,
               "symbols_pct": 3.0, "pass_at_k": 0.0, "accuracy": 0.0, "with_answer_pct": 0.0}

    class Model:
        def eval(self):
            return self

    monkeypatch.setattr(atmanrl.model, "load", lambda *a, **k: (Model(), None))
    monkeypatch.setattr(atmanrl.tasks.registry, "make_task", lambda *a, **k: None)
    monkeypatch.setattr(atmanrl.eval, "evaluate", lambda *a, **k: {"summary": summary, "samples": []})
    script("eval_gsm8k").main(["--n", "1", "--k", "1", "--out", str(tmp_path / "res.md"), "--label", "x"])
    assert json.loads((tmp_path / "res.json").read_text())["summary"] == summary
    assert (tmp_path / "res.md").read_text().startswith("| | Avg. token / CoT")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res.json", "res.md"]


def under_a_file(d):
    (d / "file").write_text("x")
    return d / "file" / "res.json"


@pytest.mark.parametrize("make, message", [
    (under_a_file, "cannot create the output directory"),
    (lambda d: (d / "res.json").mkdir() or d / "res.json", "it is a directory"),
    (lambda d: d / "res.txt", "name the results file NAME.json or NAME.md"),
])
def test_eval_checks_the_output_before_evaluating(make, message, tmp_path, no_model):
    with pytest.raises(SystemExit, match=message):
        script("eval_gsm8k").main(["--out", str(make(tmp_path))])


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be > 0, got 0"),
    (["--lr", "0"], "--lr must be > 0, got 0"),
    (["--lr", "nan"], "--lr must be > 0, got nan"),
    (["--steps", "-3"], "--steps must be > 0, got -3"),
])
def test_explain_refuses_zero_steps_and_lr(argv, message, capsys, no_model):
    """--steps 0 / --lr 0 used to become 20 steps at lr 1e-2 without a word."""
    with pytest.raises(SystemExit) as e:
        script("explain").main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--device", "bogus"], "--device 'bogus' is not a device torch knows; pass cpu, cuda or cuda:N"),
    (["--out", "somedir/"], "is a directory; pass a file name such as somedir/explain.html"),
    (["--out", "page.png"], "name the page NAME.html"),
])
def test_explain_refuses_bad_device_and_out(argv, message, no_model):
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace(")", r"\)")):
        script("explain").main(argv + (["--device", "cpu"] if "--device" not in argv else []))


def test_explain_refuses_an_existing_directory_as_out(tmp_path, no_model):
    with pytest.raises(SystemExit, match="is a directory"):
        script("explain").main(["--out", str(tmp_path), "--device", "cpu"])


def test_eval_task_must_be_registered(capsys, no_model, tmp_path):
    """--task names a task of the registry; an unknown one is refused before any model loads, listing the valid
    ones. (Any registered task gets Table 1 now: --task toyworld no longer needs --faithfulness.)"""
    with pytest.raises(SystemExit) as e:
        script("eval_gsm8k").main(["--task", "nope", "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unknown task 'nope'" in err and "gsm8k, toyworld" in err


def test_compare_shows_both_arms_faithfulness(tmp_path, capsys):
    summary = {"k": 4, "avg_cot_tokens": 200.0, "numbers_pct": 10.0, "stop_words_pct": 30.0, "symbols_pct": 5.0,
               "pass_at_k": 90.0, "accuracy": 70.0}
    faith = {"readable_reference": 5, "early_aoc": 0.2, "mistake_changed": 0.4, "mistake_control_changed": 0.1,
             "cot_accuracy": 0.5, "filler_accuracy": 0.1, "no_cot_accuracy": 0.0, "saliency_auroc": 0.6,
             "saliency_top1": 0.2, "fractions": [0, 0.5, 1], "early_curve": [0.6, 1.0, 1.0]}
    better = dict(faith, early_aoc=0.5, mistake_changed=0.7)
    for name, f in [("base", faith), ("ours", better)]:
        (tmp_path / f"{name}.json").write_text(json.dumps({"label": name, "summary": summary, "samples": [],
                                                           "faithfulness": {"summary": f}}))
    script("eval_gsm8k").main(["--compare", str(tmp_path / "base.json"), str(tmp_path / "ours.json")])
    out = capsys.readouterr().out
    assert "| ours | 5 | 0.50 (+0.30) | 70.0 (+30.0 pp) | 10.0 (+0.0 pp) |" in out
    assert "| base | 5 | 0.20 | 40.0 | 10.0 |" in out and "| ours | 60 % | 100 % | 100 % |" in out


def test_eval_saliency_schedule_flags(capsys, no_model, tmp_path):
    eval_script = script("eval_gsm8k")
    args = eval_script.parse_args(["--saliency-steps", "10"])
    assert (eval_script.saliency_config(args).steps, eval_script.saliency_config(args).lr) == (10, 1e-3 * 200 / 10)
    args = eval_script.parse_args(["--saliency-init", "-3", "--saliency-lr", "1e-2", "--saliency-steps", "200"])
    config = eval_script.saliency_config(args)
    assert (config.init, config.lr, config.steps) == (-3.0, 1e-2, 200)
    with pytest.raises(SystemExit):
        eval_script.parse_args(["--saliency-init", "0"])
    assert "must be negative, got 0.0" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, message", [
    (["data.task=gsm9k"], "unknown task 'gsm9k'; valid tasks are: gsm8k, toyworld"),
    ([], "holds an earlier run"),
])
def test_train_script_states_run_errors_without_a_traceback(overrides, message, tmp_path, capsys, no_model):
    """run_gsm8k.py: an unknown task, or an out_dir that holds an earlier run, ends with exit code 2 and the
    sentence (not a traceback), before a model is loaded."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}\n")
    (out / "metrics.jsonl").write_text('{"update": 1}\n')  # an earlier run's history
    code = script("run_gsm8k").main([f"out_dir={out}", *overrides])
    assert code == 2
    assert message in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == '{"update": 1}\n'  # nothing of the earlier run was touched
