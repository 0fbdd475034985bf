"""Bad command-line input to every script in experiments/: each case ends with one sentence naming the argument,
file, key or limit (no traceback) and exit code 2, before any model is loaded or any work runs (a model loaded on
purpose -- to learn its context length or vocabulary -- is a tiny one); and --out decides both output files of
eval_gsm8k.py from its suffix."""

import errno
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def script(name):
    """The script ``experiments/NAME.py`` as a module (registered in sys.modules while it runs, as dataclasses with
    string annotations need)."""
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def run(name, argv, capsys):
    """(exit code, stderr) of ``experiments/NAME.py`` with ``argv``: the code main returns, or argparse's."""
    try:
        code = script(name).main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    return code, err


def refused(name, argv, capsys, message):
    """The script ends with exit code 2 and one error sentence holding ``message``, without a traceback."""
    code, err = run(name, argv, capsys)
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if ": error: " in line or line.startswith("[reproduce_toy] error:")]
    assert len(errors) == 1 and message in errors[0], err
    return errors[0]


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model is an error: every refusal must come before it."""
    import atmanrl.model

    def refuse(*a, **k):
        raise AssertionError("the model was loaded although the arguments are invalid")

    monkeypatch.setattr(atmanrl.model, "load", refuse)


@pytest.fixture(scope="module")
def toy_model_dir(tmp_path_factory):
    """A tiny model of the toy world's vocabulary as a Hugging Face directory (64 positions), built in a second."""
    from atmanrl.model import Llama, LlamaConfig, save_hf
    from atmanrl.tasks.toyworld import build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=tokenizer.tokenizer.get_vocab_size(), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, rope_scaling=None,
                         max_position_embeddings=64, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("toy_model")
    save_hf(Llama(config).init_weights(generator=torch.Generator().manual_seed(0)), path)
    tokenizer.save(path)
    return path


def copy_of(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------------------------
# eval_gsm8k.py
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["--k", "0"], "argument --k: 0 must be >= 1 (samples per problem)"),
    (["--n", "0"], "argument --n: 0 must be >= 1 (problems to draw)"),
    (["--n", "-1"], "argument --n: -1 must be >= 1 (problems to draw)"),
    (["--threads", "-1"], "argument --threads: -1 must be >= 1 (torch CPU threads)"),
    (["--k", "two"], "argument --k: 'two' is not an integer (samples per problem)"),
    (["--temperature", "0"], "argument --temperature: 0 must be > 0"),
    (["--top-p", "1.5"], "argument --top-p: 1.5 must be in (0, 1] (nucleus mass)"),
    (["--max-new-tokens", "nan"], "argument --max-new-tokens: 'nan' is not an integer"),
    (["--saliency-lr", "inf"], "argument --saliency-lr: inf must be a finite number"),
    (["--seed", "-1"], "argument --seed: -1 must be >= 0 (a seed)"),
    (["--filler", ""], "argument --filler: --filler must not be empty"),
    (["--label", "a\udcffb"], "argument --label: not UTF-8 text (byte 0xff)"),
    (["--device", "foo"], "--device 'foo' is not a device torch knows; pass cpu, cuda or cuda:N"),
    (["--device", "mps"], "--device mps: only cpu and cuda are supported"),
    (["--task", "nope"], "argument --task: unknown task 'nope'; valid tasks are: gsm8k, toyworld"),
])
def test_eval_refuses_bad_arguments(argv, message, capsys, no_model, tmp_path):
    refused("eval_gsm8k", argv + ["--out", str(tmp_path / "r.json")], capsys, message)
    assert not any(tmp_path.iterdir())  # nothing written


def _gsm8k_file(tmp_path, text: bytes | str, name="d.jsonl"):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.jsonl", "GSM8K file not found"),
    (lambda d: d, "is a directory; give the GSM8K jsonl file inside it"),
    (lambda d: _gsm8k_file(d, b'{"question": "caf\xe9", "answer": "#### 1"}\n'), "is not UTF-8 text"),
    (lambda d: _gsm8k_file(d, '{"question": "x"\n'), "not valid JSON"),
    (lambda d: _gsm8k_file(d, '{"question": "x", "answer": "#### 1"}\n'), "--n 8 is more than the 1 problems"),
])
def test_eval_refuses_a_bad_data_file_before_loading_a_model(make, message, capsys, no_model, tmp_path):
    data = make(tmp_path)
    line = refused("eval_gsm8k", ["--data", str(data), "--n", "8", "--out", str(tmp_path / "o" / "r.json")],
                   capsys, message)
    assert "--data" in line or "--n" in line


def test_eval_refuses_a_missing_or_damaged_model(capsys, tmp_path, toy_model_dir):
    refused("eval_gsm8k", ["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "r.json")], capsys,
            f"--model {tmp_path / 'nope'}: Cannot load")
    broken = copy_of(toy_model_dir, tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    refused("eval_gsm8k", ["--model", str(broken), "--out", str(tmp_path / "r.json")], capsys,
            "is not a readable safetensors file")


def test_eval_refuses_a_nonfinite_model_before_sampling(capsys, tmp_path, monkeypatch):
    """Issue 16, case 6: evaluating a NaN policy exited 0 with a results file."""
    from tiny import tiny_policy

    import atmanrl.eval
    import atmanrl.model

    policy = tiny_policy()
    with torch.no_grad():
        policy.norm.weight[0] = float("nan")
    monkeypatch.setattr(atmanrl.model, "load", lambda *a, **k: (policy, None))
    monkeypatch.setattr(atmanrl.eval, "evaluate", lambda *a, **k: pytest.fail("sampled from a NaN model"))
    refused("eval_gsm8k", ["--out", str(tmp_path / "r.json")], capsys, "['norm.weight'] hold NaN/inf values")
    assert not (tmp_path / "r.json").exists()


def test_eval_refuses_a_filler_the_task_vocabulary_lacks_before_sampling(capsys, tmp_path, toy_model_dir,
                                                                          monkeypatch):
    """--task toyworld without --filler: the toy vocabulary has no '...'; it used to end in a traceback."""
    import atmanrl.eval.faithfulness

    monkeypatch.setattr(atmanrl.eval.faithfulness, "task_inputs", lambda *a, **k: pytest.fail("sampled"))
    monkeypatch.setattr("atmanrl.eval.evaluate", lambda *a, **k: pytest.fail("sampled"))
    refused("eval_gsm8k", ["--task", "toyworld", "--faithfulness", "--model", str(toy_model_dir), "--n", "2",
                           "--out", str(tmp_path / "r.json")], capsys,
            "--filler: the filler '...' is not text this tokenizer can write")


def _results(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else json.dumps(data).encode())
    return str(path)


@pytest.mark.parametrize("data, message", [
    (b"\xff\xfe{}", "byte 0: not UTF-8 text"),
    ([1, 2], "is not a results file (a JSON object with 'label' and 'summary' or 'faithfulness')"),
    ({"label": "x", "summary": {"k": 4}}, "lacks or mangles the results field 'avg_cot_tokens'"),
    (b'{"label": ', "line 1: not valid JSON"),
])
def test_eval_compare_refuses_files_it_cannot_read(data, message, capsys, tmp_path, no_model):
    good = {"label": "b", "summary": {"k": 4, "avg_cot_tokens": 200.0, "numbers_pct": 10.0, "stop_words_pct": 30.0,
                                      "symbols_pct": 5.0, "pass_at_k": 90.0, "accuracy": 70.0}}
    refused("eval_gsm8k", ["--compare", _results(tmp_path, "bad.json", data), _results(tmp_path, "ok.json", good)],
            capsys, message)
    refused("eval_gsm8k", ["--compare", str(tmp_path / "none.json"), _results(tmp_path, "ok.json", good)], capsys,
            "cannot read")


def test_eval_cpu_defaults_are_short_and_say_how_to_ask_for_more(capsys):
    """Issue 16, case 16: the embedded default sampled up to 1024 tokens per completion on a CPU (25 minutes)."""
    eval_script = script("eval_gsm8k")
    args = eval_script.parse_args([])
    eval_script.apply_defaults(args, torch.device("cpu"))
    assert (args.n, args.k, args.max_new_tokens, args.threads) == (4, 2, 128, 1)
    err = capsys.readouterr().err
    assert "CPU default: --n 4 --k 2 --max-new-tokens 128 --threads 1, about a minute" in err
    assert "ask for more with --n, --k, --max-new-tokens, --threads" in err
    args = eval_script.parse_args(["--n", "500", "--max-new-tokens", "1024", "--threads", "2", "--faithfulness"])
    eval_script.apply_defaults(args, torch.device("cpu"))
    assert (args.n, args.k, args.max_new_tokens, args.threads) == (500, 2, 1024, 2)  # what was asked for stays
    assert "CPU default: --k 2, about a minute (--faithfulness takes a few minutes more)" in capsys.readouterr().err
    args = eval_script.parse_args([])
    eval_script.apply_defaults(args, torch.device("cuda"))
    assert (args.n, args.k, args.max_new_tokens, args.threads) == (8, 4, 1024, None)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("out, json_name, md_name", [("res.md", "res.json", "res.md"),
                                                     ("res.json", "res.json", "res.md"),
                                                     ("a.b/res.JSON", "a.b/res.json", "a.b/res.md")])
def test_eval_out_suffix_decides_both_files(out, json_name, md_name):
    assert script("eval_gsm8k").output_paths(out) == (Path(json_name), Path(md_name))


def test_eval_out_md_writes_json_and_markdown_to_two_files(tmp_path, monkeypatch, capsys):
    """--out res.md: the JSON used to be written to res.md and then overwritten by the table."""
    import atmanrl.eval
    import atmanrl.model

    summary = {"problems": 1, "k": 1, "samples": 1, "avg_cot_tokens": 3.0, "numbers_pct": 1.0, "stop_words_pct": 2.0,
               "symbols_pct": 3.0, "pass_at_k": 0.0, "accuracy": 0.0, "with_answer_pct": 0.0}
    monkeypatch.setattr(atmanrl.model, "load", lambda *a, **k: (torch.nn.Linear(2, 2), None))
    monkeypatch.setattr("atmanrl.tasks.registry.make_task", lambda *a, **k: None)
    monkeypatch.setattr(atmanrl.eval, "evaluate", lambda *a, **k: {"summary": summary, "samples": []})
    assert script("eval_gsm8k").main(["--n", "1", "--k", "1", "--out", str(tmp_path / "res.md"), "--label", "x"]) == 0
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
def test_eval_checks_the_output_before_evaluating(make, message, tmp_path, no_model, capsys):
    refused("eval_gsm8k", ["--out", str(make(tmp_path))], capsys, message)


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
    refused("eval_gsm8k", ["--saliency-init", "0"], capsys, "argument --saliency-init: 0 must be < 0")


# ---------------------------------------------------------------------------------------------------------------
# explain.py
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "argument --steps: 0 must be >= 1 (mask steps)"),
    (["--lr", "0"], "argument --lr: 0 must be > 0 (mask learning rate)"),
    (["--lr", "nan"], "argument --lr: nan must be a finite number"),
    (["--steps", "-3"], "argument --steps: -3 must be >= 1"),
    (["--question", "\udcff"], "argument --question: not UTF-8 text (byte 0xff)"),
    (["--answer", ""], "argument --answer: --answer must not be empty"),
    (["--answer", " "], "argument --answer: --answer must not be empty"),
    (["--completion", "##### 10"], "--completion has no chain of thought before '#####'"),
    (["--device", "bogus"], "--device 'bogus' is not a device torch knows; pass cpu, cuda or cuda:N"),
    (["--out", "somedir/"], "is a directory; pass a file name such as somedir/explain.html"),
    (["--out", "page.png"], "name the page NAME.html"),
])
def test_explain_refuses_bad_arguments(argv, message, capsys, no_model):
    """--steps 0 / --lr 0 used to become 20 steps at lr 1e-2 without a word; $'\\xff' ended in a TypeError."""
    refused("explain", argv + (["--device", "cpu"] if "--device" not in argv else []), capsys, message)


def test_explain_refuses_an_existing_directory_as_out_and_a_missing_model(tmp_path, capsys, no_model):
    refused("explain", ["--out", str(tmp_path), "--device", "cpu"], capsys, "is a directory")


def test_explain_names_a_model_it_cannot_load(tmp_path, capsys):
    refused("explain", ["--model", str(tmp_path / "nope"), "--device", "cpu", "--out", str(tmp_path / "e.html")],
            capsys, f"--model {tmp_path / 'nope'}: Cannot load")


# ---------------------------------------------------------------------------------------------------------------
# side_by_side.py
# ---------------------------------------------------------------------------------------------------------------


def _sample(**changes):
    return {"problem": 0, "sample": 0, "question": "Tom has 3 apples.", "cot": "3 apples", "answer": " 3",
            "correct": True, "gold": "3", "cot_tokens": 2, **changes}


@pytest.mark.parametrize("data, message", [
    (b"\xff", "byte 0: not UTF-8 text"),
    (b"[1]", "is not a results file (a JSON object with a text 'label' and a list of 'samples')"),
    ({"label": "x"}, "is not a results file"),
    ({"label": "x", "samples": [3]}, "samples[0] is not an object"),
    ({"label": "x", "samples": [_sample(cot=3)]}, "samples[0].cot must be text, got 3"),
    ({"label": "x", "samples": [_sample(answer=5)]}, "samples[0].answer must be text or null, got 5"),
    ({"label": "x", "samples": [_sample(cot_tokens="<b>x</b>")]}, "samples[0].cot_tokens must be an integer"),
    ({"label": "x", "samples": [_sample(problem=True)]}, "samples[0].problem must be an integer"),
])
def test_side_by_side_refuses_crafted_or_short_files_before_spacy(data, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("atmanrl.eval.side_by_side.load_spacy", lambda: pytest.fail("spaCy ran"))
    good = _results(tmp_path, "good.json", {"label": "g", "samples": [_sample()]})
    refused("side_by_side", [_results(tmp_path, "bad.json", data), good, "--out", str(tmp_path / "s.html")], capsys,
            message)
    refused("side_by_side", [str(tmp_path / "none.json"), good], capsys, "cannot read")
    refused("side_by_side", [good, good, "--out", str(tmp_path)], capsys, "is a directory")
    refused("side_by_side", [good, good, "--problems", "-1"], capsys, "argument --problems: -1 must be >= 0")
    assert not (tmp_path / "s.html").exists()


def test_side_by_side_escapes_every_field_it_shows():
    from atmanrl.eval.side_by_side import _column

    column = _column("x", _sample(cot_tokens="<script>"))  # reached without the script's checks
    assert "<script>" not in column and "&lt;script&gt;" in column


# ---------------------------------------------------------------------------------------------------------------
# sweep.py
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, message", [
    (b"grid: {train.seed: [0]}\noverrides: [3]\n", "'overrides' must be a list of key.sub=value strings"),
    (b"grid: {train.seed: [0]}\nconfig: 5\n", "'config' must be a path, got 5"),
    (b"grid: {train.seed: [0]}\n# Gr\xfc\xdfe\n", "not UTF-8 text; save the sweep file as UTF-8"),
    (b"grid: {train.seed: [0]}\nlast: 0\n", "'last' must be a positive integer"),
    (b"grid: {train.seed: 1}\n", "grid key 'train.seed' must have a non-empty list of values"),
    (b"grid: [1]\n", "a sweep file needs a 'grid' mapping"),
    (b"grid: {train.seed: [0]}\nextra: 1\n", "unknown top-level keys ['extra']"),
    (b"grid: {train.lr: [abc]}\n", "sweep cell 0 {'train.lr': 'abc'}: train.lr: expected a number"),
    (b"grid: {train.seed: [0]}\nconfig: missing.yaml\n", "config file missing.yaml does not exist"),
])
def test_sweep_refuses_a_bad_spec_before_any_run(text, message, tmp_path, capsys, no_model, monkeypatch):
    import atmanrl.rl.trainer

    monkeypatch.setattr(atmanrl.rl.trainer, "train", lambda cfg: pytest.fail("trained"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_bytes(text)
    refused("sweep", [str(tmp_path / "s.yaml")], capsys, message)
    refused("sweep", [str(tmp_path / "nope.yaml")], capsys, "cannot read the sweep file")


def test_sweep_takes_one_string_of_overrides_as_one_override(tmp_path, capsys):
    """A string used to be split into characters, one override each."""
    (tmp_path / "s.yaml").write_text(f"grid: {{train.seed: [0, 1]}}\noverrides: train.max_updates=4\n"
                                     f"out_dir: {tmp_path / 'sw'}\n")
    assert script("sweep").main([str(tmp_path / "s.yaml"), "--dry-run"]) == 0
    assert "cell 1: {'train.seed': 1} ->" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# plot_run.py
# ---------------------------------------------------------------------------------------------------------------


def _metrics(run: Path, *lines: str) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(lines))
    return run


def test_plot_run_draws_a_run_killed_mid_line(tmp_path, capsys):
    """Issue 16, case 11: the partial last line a SIGKILL leaves ended in a JSONDecodeError naming no file."""
    pytest.importorskip("matplotlib")
    run = _metrics(tmp_path / "run", '{"update": 1, "accuracy": 0.5, "completion_len": 9}\n',
                   '{"update": 2, "accuracy": 0.6, "completion_len": 8}\n', '{"update": 3, "accur')
    with pytest.warns(UserWarning, match=r"metrics\.jsonl, line 3: dropping a partial last record"):
        code, _ = run_plot(["--out", str(tmp_path / "f.png"), str(run)], capsys)
    assert code == 0 and (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


def run_plot(argv, capsys):
    return run("plot_run", argv, capsys)


@pytest.mark.parametrize("lines, message", [
    (['{"update": 1, "completion_len": 9}\n'], "metrics.jsonl: records without accuracy"),
    (["garbage\n", '{"update": 1}\n'], "metrics.jsonl, line 1: not a JSON record"),
    ([], "has neither eval.jsonl nor metrics.jsonl records"),
])
def test_plot_run_names_the_file_and_key_it_cannot_read(lines, message, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = _metrics(tmp_path / "run", *lines)
    refused("plot_run", [str(run), "--out", str(tmp_path / "f.png")], capsys, message)
    assert not (tmp_path / "f.png").exists()


def test_plot_run_refuses_an_out_it_cannot_write(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = _metrics(tmp_path / "run", '{"update": 1, "accuracy": 0.5, "completion_len": 9}\n')
    (tmp_path / "file").write_text("x")
    refused("plot_run", [str(run), "--out", str(tmp_path / "file" / "f.png")], capsys, "f.png: cannot write it")
    refused("plot_run", [str(run), "--out", str(tmp_path / "f.xyz")], capsys, "matplotlib cannot write .xyz")
    refused("plot_run", [str(run), "--out", str(tmp_path)], capsys, "is a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "run"]


# ---------------------------------------------------------------------------------------------------------------
# reproduce_toy.py
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_toy_work(monkeypatch):
    """Building or loading the warm start, or evaluating it, is an error: refusals must come first."""
    toy = script("reproduce_toy")
    monkeypatch.setattr("atmanrl.toy.sft.sft_model_dir", lambda *a, **k: pytest.fail("the warm start was built"))
    return toy


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0"], "argument --seeds: 0 must be >= 1"),
    (["--seeds", "-1"], "argument --seeds: -1 must be >= 1"),
    (["--k", "0"], "argument --k: 0 must be >= 1"),
    (["--updates", "0"], "argument --updates: 0 must be >= 1"),
    (["--jobs", "-3"], "argument --jobs: -3 must be >= 1"),
    (["--heldout", "0"], "argument --heldout: 0 must be >= 1"),
    (["train.lr=abc"], "arm baseline, seed 0: command-line override: train.lr: expected a number, got 'abc'"),
    (["trian.lr=1"], "unknown config key 'trian.lr'"),
])
def test_reproduce_toy_refuses_bad_arguments_before_any_work(argv, message, tmp_path, capsys, no_toy_work,
                                                             monkeypatch):
    monkeypatch.setattr(no_toy_work, "sft_model_dir", lambda *a, **k: pytest.fail("the warm start was built"))
    try:
        code = no_toy_work.main(argv + ["--out", str(tmp_path / "toy")])
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_reproduce_toy_refuses_a_file_as_out(tmp_path, capsys, no_toy_work):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as e:
        no_toy_work.main(["--out", str(tmp_path / "file")])
    assert e.value.code == 2 and "argument --out: " in capsys.readouterr().err


def test_reproduce_toy_refuses_a_rerun_before_evaluating_the_warm_start(tmp_path, capsys, no_toy_work, monkeypatch):
    earlier = tmp_path / "toy" / "runs" / "baseline_seed0"
    earlier.mkdir(parents=True)
    (earlier / "atmanrl-run.json").write_text("{}\n")
    (earlier / "metrics.jsonl").write_text('{"update": 1}\n')
    monkeypatch.setattr(no_toy_work, "sft_model_dir", lambda *a, **k: tmp_path / "sft")  # a path, nothing built
    monkeypatch.setattr(no_toy_work, "load", lambda *a, **k: pytest.fail("the warm start was loaded"))
    code = no_toy_work.main(["--out", str(tmp_path / "toy"), "--seeds", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "arm baseline, seed 0: out_dir=" in err and "holds an earlier run" in err
    assert (earlier / "metrics.jsonl").read_text() == '{"update": 1}\n'


def test_reproduce_toy_reuses_only_parts_of_the_same_settings(tmp_path, capsys, no_toy_work):
    """Issue 16, case 7: --reuse --updates 7 took 1-update parts, and report.md said "after 7 updates"."""
    toy = no_toy_work
    args = toy.parse_args(["--out", str(tmp_path), "--updates", "1", "--reuse", "checkpoint.overwrite=true"])
    toy.write_part(args, "baseline", {"baseline_seed0": {"updates": 1}})
    toy.write_part(args, "truth", {"per_seed": {}})
    again = toy.parse_args(["--out", str(tmp_path), "--updates", "1", "--reuse"])  # checkpoint.* is no setting
    assert toy.reusable(again, "baseline") and toy.reusable(again, "truth")
    more = toy.parse_args(["--out", str(tmp_path), "--updates", "7", "--reuse"])
    assert not toy.reusable(more, "baseline") and toy.reusable(more, "truth")  # the study does not train
    assert "parts/baseline.json was computed with other settings (--updates 1 -> 7); computing baseline again" in \
        capsys.readouterr().err
    (tmp_path / "parts" / "eq3.json").write_text('{"eq3_seed0": {"updates": 1}}\n')  # before settings were kept
    assert not toy.reusable(more, "eq3") and "no settings recorded" in capsys.readouterr().err


def test_reproduce_toy_stops_the_other_parts_when_one_fails(tmp_path, no_toy_work, monkeypatch):
    """Issue 16, case 9: a failing part of --jobs 2 left its sibling running as an orphan."""
    import subprocess

    real, started = subprocess.Popen, []

    def child(cmd, **kwargs):  # the first part fails at once, the second would run for a minute
        code = "import sys; sys.exit(3)" if not started else "import time; time.sleep(60)"
        started.append(real([sys.executable, "-c", code], **kwargs))
        return started[-1]

    monkeypatch.setattr(subprocess, "Popen", child)
    args = no_toy_work.parse_args(["--out", str(tmp_path), "--jobs", "2"])
    with pytest.raises(no_toy_work.PartFailed, match=r"part truth failed \(exit 3\); see .*truth\.log"):
        no_toy_work.run_children(args, [], ["truth", "baseline"])
    assert len(started) == 2 and all(p.poll() is not None for p in started)


# ---------------------------------------------------------------------------------------------------------------
# run_gsm8k.py
# ---------------------------------------------------------------------------------------------------------------


def _earlier_run(out: Path, marker: bool = True) -> Path:
    out.mkdir()
    if marker:
        (out / "atmanrl-run.json").write_text("{}\n")
    (out / "config.json").write_text("{}\n")
    (out / "metrics.jsonl").write_text('{"update": 1}\n')  # an earlier run's history
    return out


@pytest.mark.parametrize("overrides, marker, message", [
    (["data.task=gsm9k"], True, "unknown task 'gsm9k'; valid tasks are: gsm8k, toyworld"),
    ([], True, "holds an earlier run"),
    (["checkpoint.overwrite=true"], False, ("not an atmanrl run (config.json, metrics.jsonl): it has no "
                                            "atmanrl-run.json")),
])
def test_train_script_states_run_errors_without_a_traceback(overrides, marker, message, tmp_path, capsys,
                                                            no_model):
    """run_gsm8k.py: an unknown task, or an out_dir that holds an earlier run (or is no run directory at all),
    ends with exit code 2 and the sentence (not a traceback), before a model is loaded."""
    out = _earlier_run(tmp_path / "run", marker)
    refused("run_gsm8k", [f"out_dir={out}", *overrides], capsys, message)
    assert (out / "metrics.jsonl").read_text() == '{"update": 1}\n'  # nothing of the earlier run was touched
    assert (out / "config.json").read_text() == "{}\n"


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.jsonl", "data.path={}: GSM8K file not found"),
    (lambda d: d, "data.path={}: {} is a directory"),
    (lambda d: _gsm8k_file(d, b'{"question": "\xff", "answer": "#### 1"}\n'), "is not UTF-8 text"),
    (lambda d: _gsm8k_file(d, "[1, 2]\n"), "expected an object with string keys 'question' and 'answer'"),
])
def test_train_script_names_a_bad_data_file_before_touching_out_dir(make, message, tmp_path, capsys, no_model):
    data = make(tmp_path)
    refused("run_gsm8k", [f"out_dir={tmp_path / 'run'}", "data.task=gsm8k", f"data.path={data}"], capsys,
            message.format(data, data))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, message", [
    ("out_dir=/runs/victim #2", "YAML reads '#2' as a comment and would drop it"),
    ("train.lr=abc", "command-line override: train.lr: expected a number, got 'abc'"),
    ("saliency.steps=0", "saliency.steps=0 must be >= 1"),
])
def test_train_script_refuses_bad_overrides(override, message, capsys, no_model):
    refused("run_gsm8k", [override], capsys, message)


def test_train_script_names_a_model_it_cannot_read_or_a_length_it_cannot_fit(tmp_path, capsys, toy_model_dir):
    broken = copy_of(toy_model_dir, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes((broken / "model.safetensors").read_bytes()[:64])
    refused("run_gsm8k", [f"out_dir={tmp_path / 'a'}", f"model.name_or_path={broken}"], capsys,
            f"model.name_or_path={broken}: {broken / 'model.safetensors'}")
    refused("run_gsm8k", [f"out_dir={tmp_path / 'b'}", f"model.name_or_path={toy_model_dir}",
                          "rollout.max_new_tokens=100000"], capsys,
            "rollout.max_new_tokens=100000 leaves no room for the prompt in the model's context of 64 positions")


def test_train_script_reports_a_full_disk_in_one_sentence(tmp_path, capsys, monkeypatch):
    run_gsm8k = script("run_gsm8k")

    def full(cfg):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "metrics.jsonl"))

    monkeypatch.setattr(run_gsm8k, "train", full)
    assert run_gsm8k.main([f"out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert f"cannot use {tmp_path / 'run' / 'metrics.jsonl'} (No space left on device); free space on that disk, " \
           "then resume with checkpoint.resume=true" in err and "Traceback" not in err


def test_train_script_reports_a_read_only_out_dir_in_one_sentence(read_only_tmp, capsys):
    assert script("run_gsm8k").main([f"out_dir={read_only_tmp / 'ro'}"]) == 2
    assert "cannot write into out_dir=" in capsys.readouterr().err


def test_train_script_keeps_out_dir_locked_until_it_is_done_with_it(tmp_path, monkeypatch):
    """Issue 16, case 3: the figure and the policy evaluation ran after train() had released the lock."""
    from tiny import TinyTask, tiny_policy

    from atmanrl.rl import rundir
    from atmanrl.rl.trainer import train

    run_gsm8k, seen = script("run_gsm8k"), []

    def tiny_train(cfg):
        return train(cfg, policy=tiny_policy(), task=TinyTask(), problems=list(range(8)))

    def report(cfg, result):
        seen.append(json.loads((Path(cfg.out_dir) / rundir.LOCK).read_text()))

    monkeypatch.setattr(run_gsm8k, "train", tiny_train)
    monkeypatch.setattr(run_gsm8k, "report", report)
    overrides = ["rollout.group_size=8", "rollout.max_new_tokens=2", "train.problems_per_update=4",
                 "train.micro_batch_size=8", "train.max_updates=1", "saliency.weight=0", "eval.every=0",
                 "train.num_minibatches=2"]
    assert run_gsm8k.main([f"out_dir={tmp_path / 'run'}", *overrides]) == 0
    import os

    assert seen and seen[0]["pid"] == os.getpid() and not (tmp_path / "run" / rundir.LOCK).exists()
