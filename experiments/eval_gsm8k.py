"""Table 1 evaluation of a checkpoint on GSM8K (or the embedded GSM8K-style problems), and the faithfulness tests.

    python experiments/eval_gsm8k.py                                    # embedded SmolLM2, synthetic problems
    python experiments/eval_gsm8k.py --data /path/to/gsm8k/test.jsonl --n 500 --k 4 --max-new-tokens 1024  # paper
    python experiments/eval_gsm8k.py --model runs/atmanrl/policy --label AtManRL --out runs/eval/atmanrl.json
    python experiments/eval_gsm8k.py --faithfulness --out runs/eval/smollm2.json    # + the four faithfulness tests
    python experiments/eval_gsm8k.py --compare runs/eval/baseline.json runs/eval/atmanrl.json

Draws ``--n`` problems with ``--seed`` (the paper: 500 GSM8K test problems), samples ``--k`` completions each (the
paper: 4) and writes two files named after ``--out``: the JSON with every sample (``NAME.json``) and the Markdown
table(s) (``NAME.md``). ``--out`` may name either one (``res.json`` or ``res.md``); any other suffix is refused,
so the two files never share a path. Both paths are checked for writing before the evaluation starts.

``--faithfulness`` adds the tests of ``atmanrl.eval.faithfulness`` (early answering, adding mistakes, filler
replacement, saliency agreement) on one CoT per problem (the first sample that wrote ``#####``, else the first
sample): their per-sample records go into the JSON (``"faithfulness"``) and their summary into a second table.

``--task NAME`` evaluates on another task of the task registry (``atmanrl.tasks.registry``), e.g. the toy world's
policies with ``--task toyworld --model runs/cpu_default/policy``: Table 1 as for GSM8K, through the task's own
prompt and judgement. With ``--faithfulness`` one CoT per problem is sampled for the tests (its own seeds, one per
problem); ``--filler`` names the filler text for a vocabulary without ``...``.

``--compare`` reads two such files (baseline first) and prints Table 1 with the relative and percentage-point
changes, as the paper shows it, and the faithfulness table of both arms when both files have one.
Progress goes to stderr; the tables to stdout.

Defaults: on a GPU, ``--n 8 --k 4 --max-new-tokens 1024`` (the training length). On a CPU, where SmolLM2 rarely
writes ``#####`` and a sample would run the whole 1024 tokens, the defaults are ``CPU_DEFAULTS`` (``--n 4 --k 2
--max-new-tokens 128 --threads 1``: one thread, because two threads on two shared cores ran about three times
slower than one), about a minute; the script says so when it uses them, and the flags ask for more.

Every argument is checked before a model is loaded (numbers, ``--device``, ``--out``, ``--filler``, ``--data``,
``--task``, ``--compare``'s files); a user error ends with one sentence and exit code 2. A model whose weights hold
NaN/inf is refused before it samples.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from atmanrl.config import EvalConfig, RolloutConfig, UserError, device_arg, number_arg, text_arg
from atmanrl.errors import read_json
from atmanrl.tasks.registry import TASKS

# The defaults on a CPU (about a minute); on a GPU, GPU_DEFAULTS (threads: torch's choice).
CPU_DEFAULTS = {"n": 4, "k": 2, "max_new_tokens": 128, "threads": 1}
GPU_DEFAULTS = {"n": 8, "k": 4, "max_new_tokens": RolloutConfig.max_new_tokens, "threads": None}
FLAGS = {"n": "--n", "k": "--k", "max_new_tokens": "--max-new-tokens", "threads": "--threads"}


def output_paths(out: str) -> tuple[Path, Path]:
    """(JSON path, Markdown path) from ``--out``: ``NAME.json`` or ``NAME.md`` gives both ``NAME.json`` and
    ``NAME.md``; any other suffix is an error (never two files at one path)."""
    path = Path(out)
    if path.suffix.lower() not in (".json", ".md"):
        raise UserError(f"--out {out}: name the results file NAME.json or NAME.md (both NAME.json, with every "
                        f"sample, and NAME.md, with the table, are written)")
    return path.with_suffix(".json"), path.with_suffix(".md")


def check_writable(paths: list[Path]) -> None:
    """Fail now, not after the evaluation, when an output cannot be written (the directory is created)."""
    for path in paths:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the output directory {path.parent}: {e.strerror}; "
                            f"choose another --out") from None
        if path.is_dir():
            raise UserError(f"cannot write {path}: it is a directory; choose another --out")
        existed = path.exists()
        try:
            with path.open("a", encoding="utf-8"):
                pass
        except OSError as e:
            raise UserError(f"cannot write {path}: {e.strerror}; choose another --out") from None
        if not existed:
            path.unlink()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=text_arg("--model"), default="smollm2-135m-instruct",
                    help="embedded model name, Hugging Face checkpoint directory or .gguf file")
    ap.add_argument("--data", type=text_arg("--data"), default=None,
                    help="GSM8K jsonl file (default: the embedded synthetic problems)")
    ap.add_argument("--n", type=number_arg(int, "problems to draw", 1), default=None,
                    help=f"problems to draw (paper: 500; default {CPU_DEFAULTS['n']} on a CPU, "
                         f"{GPU_DEFAULTS['n']} on a GPU)")
    ap.add_argument("--k", type=number_arg(int, "samples per problem", 1), default=None,
                    help=f"samples per problem (paper: 4; default {CPU_DEFAULTS['k']} on a CPU, {GPU_DEFAULTS['k']} "
                         "on a GPU)")
    ap.add_argument("--seed", type=number_arg(int, "a seed", 0), default=EvalConfig.seed,
                    help="seed of the problem draw, the sampling and the mistakes (default: the trainer's eval.seed, "
                         "so both evaluate the same problems)")
    ap.add_argument("--max-new-tokens", type=number_arg(int, "tokens per completion", 1), default=None,
                    help=f"generation length (default on a GPU: the training length, {GPU_DEFAULTS['max_new_tokens']};"
                         f" on a CPU {CPU_DEFAULTS['max_new_tokens']})")
    ap.add_argument("--temperature", type=number_arg(float, "sampling temperature", 0, low_open=True), default=0.7)
    ap.add_argument("--top-p", type=number_arg(float, "nucleus mass", 0, 1, low_open=True), default=1.0)
    ap.add_argument("--batch-size", type=number_arg(int, "sequences per generate call", 1), default=64,
                    help="sequences per generate call")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (the decode step is compiled on CUDA)")
    ap.add_argument("--threads", type=number_arg(int, "torch CPU threads", 1), default=None,
                    help="torch CPU threads (default on a CPU: 1; on a GPU: torch's choice)")
    ap.add_argument("--label", type=text_arg("--label"), default=None,
                    help="row label in the table (default: the model name)")
    ap.add_argument("--out", type=text_arg("--out"), default="runs/eval/results.json",
                    help="NAME.json or NAME.md: writes NAME.json (every sample) and NAME.md (the tables)")
    ap.add_argument("--faithfulness", action="store_true",
                    help="also run the faithfulness tests (atmanrl.eval.faithfulness) on one CoT per problem")
    ap.add_argument("--task", default="gsm8k",
                    help="the task of atmanrl.tasks.registry to evaluate on (gsm8k, toyworld)")
    ap.add_argument("--filler", type=text_arg("--filler", empty=False), default="...",
                    help="filler text of the filler-replacement test (default: ...)")
    ap.add_argument("--saliency-steps", type=number_arg(int, "mask steps", 1), default=20,
                    help="mask steps of the saliency-agreement test (the paper: 200)")
    ap.add_argument("--saliency-lr", type=number_arg(float, "mask learning rate", 0, low_open=True),
                    default=None, help="mask learning rate (default: 1e-3 * 200 / steps, SaliencyConfig.compressed)")
    ap.add_argument("--saliency-init", type=number_arg(float, "the mask's initial value c", high=0, high_open=True),
                    default=-0.4, help="the mask's initial value c, negative (the paper: -0.4; docs/DESIGN.md, "
                                       "decision 11)")
    ap.add_argument("--compare", nargs=2, type=text_arg("--compare"), metavar=("BASELINE_JSON", "ATMANRL_JSON"),
                    help="print Table 1 for two result files, with relative changes against the first")
    args = ap.parse_args(argv)
    if args.task not in TASKS:
        ap.error(f"argument --task: unknown task {args.task!r}; valid tasks are: {', '.join(sorted(TASKS))}")
    return args


def apply_defaults(args, device) -> None:
    """``--n``, ``--k``, ``--max-new-tokens``, ``--threads`` left out: the CPU or the GPU default, and a note when
    the short CPU default is used, so that nobody mistakes it for the paper's setting."""
    defaults = CPU_DEFAULTS if device.type == "cpu" else GPU_DEFAULTS
    used = [name for name in defaults if getattr(args, name) is None]
    for name in used:
        setattr(args, name, defaults[name])
    if device.type == "cpu" and used:
        more = " (--faithfulness takes a few minutes more)" if args.faithfulness else ""
        print(f"[eval] CPU default: {' '.join(f'{FLAGS[n]} {defaults[n]}' for n in used)}, about a minute{more}; "
              f"ask for more with {', '.join(FLAGS[n] for n in used)} (the paper: --data test.jsonl --n 500 --k 4 "
              f"--max-new-tokens 1024, on a GPU)", file=sys.stderr)


def read_results(path: str) -> dict:
    """A results file of this script: a JSON object with a ``label`` and a Table 1 ``summary`` and/or
    ``faithfulness`` results; anything else is one sentence naming the file."""
    from atmanrl.eval import table1_markdown
    from atmanrl.eval.faithfulness import faithfulness_markdown

    usage = "pass two results files written by this script (NAME.json)"
    data = read_json(path, usage, "--compare")
    if not isinstance(data, dict) or not isinstance(data.get("label"), str) or not (
            isinstance(data.get("summary"), dict) or isinstance(data.get("faithfulness"), dict)):
        raise UserError(f"--compare: {path} is not a results file (a JSON object with 'label' and 'summary' or "
                        f"'faithfulness'); {usage}")
    try:  # every number the tables read is there
        if isinstance(data.get("summary"), dict):
            table1_markdown([(data["label"], data["summary"])])
        if isinstance(data.get("faithfulness"), dict):
            faithfulness_markdown([(data["label"], data["faithfulness"]["summary"])])
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise UserError(f"--compare: {path} lacks or mangles the results field {e} ({type(e).__name__}); "
                        f"{usage}") from None
    return data


def compare(paths: list[str]) -> str:
    from atmanrl.eval import table1_markdown
    from atmanrl.eval.faithfulness import faithfulness_markdown

    results = [read_results(path) for path in paths]
    labels = [r["label"] for r in results]
    if labels[0] == labels[1]:
        labels = [f"{label} ({Path(p).stem})" for label, p in zip(labels, paths)]
    # The paper lists AtManRL above the baseline. Files of a --task other than gsm8k have no Table 1.
    out = []
    if all(isinstance(r.get("summary"), dict) for r in results):
        out.append(table1_markdown([(labels[1], results[1]["summary"]), (labels[0], results[0]["summary"])],
                                   baseline=labels[0]))
    faith = [r.get("faithfulness") for r in results]
    if all(isinstance(f, dict) for f in faith):
        out.append(faithfulness_markdown([(labels[1], faith[1]["summary"]), (labels[0], faith[0]["summary"])],
                                         baseline=labels[0]))
    elif any(faith):
        print("[eval] only one of the files has faithfulness results (--faithfulness); no faithfulness table",
              file=sys.stderr)
    if not out:
        raise UserError(f"--compare: {paths[0]} and {paths[1]} share neither a Table 1 summary nor faithfulness "
                        "results; compare files of the same kind of evaluation")
    return "\n\n".join(out)


def load_model(args, device):
    """The model and tokenizer of ``--model``, refused (one sentence) when the file cannot be read or a weight holds
    NaN/inf: a NaN policy would otherwise be evaluated and reported as a result."""
    from atmanrl.model import load
    from atmanrl.rl.checkpointing import nonfinite_parameters

    if args.threads:
        torch.set_num_threads(args.threads)
    # bf16 on the GPU (as the trainer's rollouts); float32 on the CPU, where bf16 matmuls are slow.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        model, tokenizer = load(args.model, dtype=dtype, device=device)
    except (OSError, ValueError) as e:
        raise UserError(f"--model {args.model}: {e}") from None
    bad = nonfinite_parameters(model, collective=False)
    if bad:
        raise UserError(f"--model {args.model}: the weights {bad[:5]}{' ...' if len(bad) > 5 else ''} hold NaN/inf "
                        "values, so its samples mean nothing; evaluate an intact model")
    return model.eval(), tokenizer


def layout(args, tokenizer):
    """The faithfulness tests' answer layout; a ``--filler`` the model's vocabulary cannot write is one sentence."""
    from atmanrl.eval.faithfulness import gsm8k_layout

    try:
        return gsm8k_layout(tokenizer, filler=args.filler)
    except ValueError as e:
        raise UserError(f"--filler: {e}") from None


def run_faithfulness(args, model, tokenizer, inputs):
    """The four faithfulness tests on ``inputs`` (None, with a message, when there is no CoT to test)."""
    from atmanrl.eval.faithfulness import faithfulness

    if not inputs:
        print("[eval] no sample wrote a chain of thought: no faithfulness tests", file=sys.stderr)
        return None
    print(f"[eval] faithfulness tests on {len(inputs)} CoTs", file=sys.stderr)
    return faithfulness(model, tokenizer, inputs, layout=layout(args, tokenizer), seed=args.seed,
                        max_new_tokens=args.max_new_tokens,
                        saliency_config=saliency_config(args), batch_size=args.batch_size, progress=True)


def saliency_config(args):
    """The saliency-agreement test's mask schedule: ``--saliency-steps`` at ``--saliency-lr`` (default: the
    paper's 200 x 1e-3 compressed into the given steps) from ``--saliency-init``."""
    from atmanrl.saliency import SaliencyConfig

    config = SaliencyConfig.compressed(args.saliency_steps, init=args.saliency_init)
    if args.saliency_lr is not None:
        config.lr = args.saliency_lr
    return config


def load_problems(args) -> tuple[list, str]:
    """``--n`` held-out problems of ``--task`` drawn with ``--seed``: from ``--data``'s file, or generated; read
    before any model loads, a file that cannot be read (missing, a directory, not UTF-8, bad JSON) is one sentence
    naming it."""
    from atmanrl.tasks.gsm8k import draw_problems
    from atmanrl.tasks.registry import task_entry

    try:
        pool = task_entry(args.task).problems(args.data, args.n, args.seed, True)
    except (OSError, ValueError) as e:  # ConfigError is a ValueError
        raise UserError(f"--data {args.data}: {e}") from None
    if args.data and args.n > len(pool):
        raise UserError(f"--n {args.n} is more than the {len(pool)} problems in {args.data}; lower --n")
    problems = draw_problems(pool, args.n, args.seed) if len(pool) > args.n else pool
    source = str(args.data) if args.data else f"generated by the {args.task} task (seed {args.seed})"
    return problems, source


def write_outputs(json_path: Path, md_path: Path, result: dict, tables: str) -> None:
    try:
        json_path.write_text(json.dumps(result, indent=1, ensure_ascii=False), encoding="utf-8")
        md_path.write_text(tables + "\n", encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot write {e.filename or json_path} ({e.strerror}); free space or choose another "
                        "--out") from None


def main(argv=None) -> int:
    try:
        run(parse_args(argv))
    except UserError as e:
        print(f"eval_gsm8k.py: error: {e}", file=sys.stderr)
        return 2
    return 0


def run(args) -> None:
    if args.compare:
        print(compare(args.compare))
        return
    device = device_arg("--device", args.device)
    apply_defaults(args, device)
    json_path, md_path = output_paths(args.out)
    check_writable([json_path, md_path])

    from atmanrl.eval import evaluate, table1_markdown
    from atmanrl.tasks.registry import make_task

    problems, source = load_problems(args)
    model, tokenizer = load_model(args, device)
    answer_layout = layout(args, tokenizer) if args.faithfulness else None  # a bad --filler stops before sampling
    task = make_task(args.task, tokenizer)
    print(f"[eval] {len(problems)} problems from {source}, k={args.k}, model {args.model}", file=sys.stderr)
    result = evaluate(model, task, problems, k=args.k, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_p=args.top_p, seed=args.seed, batch_size=args.batch_size)
    label = args.label or Path(args.model).name
    result = {"label": label, "model": args.model, "task": args.task, "data": source, "args": vars(args), **result}
    tables = [table1_markdown([(label, result["summary"])])]

    if args.faithfulness:
        from atmanrl.eval.faithfulness import faithfulness_markdown, inputs_from_samples, task_inputs

        if args.task == "gsm8k":  # one of the Table 1 samples per problem
            inputs = inputs_from_samples(tokenizer, result["samples"], lambda s: task.prompt(problems[s["problem"]]))
        else:  # one CoT per problem drawn for the test (seeds per problem), as the measured reports were made
            inputs = task_inputs(model, tokenizer, task, problems, answer_layout, max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, seed=args.seed, batch_size=args.batch_size)
        faith = run_faithfulness(args, model, tokenizer, inputs)
        if faith is not None:
            result["faithfulness"] = faith.to_dict()
            tables.append(faithfulness_markdown([(label, faith.summary)]))

    write_outputs(json_path, md_path, result, "\n\n".join(tables))
    s = result["summary"]
    print(f"[eval] wrote {json_path} and {md_path}; {s['with_answer_pct']:.0f}% of samples wrote '#####'",
          file=sys.stderr)
    print("\n\n".join(tables))


if __name__ == "__main__":
    sys.exit(main())
