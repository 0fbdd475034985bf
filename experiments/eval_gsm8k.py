"""Table 1 evaluation of a checkpoint on GSM8K (or the embedded GSM8K-style problems), and the faithfulness tests.

    python experiments/eval_gsm8k.py                                    # embedded SmolLM2, synthetic problems
    python experiments/eval_gsm8k.py --data /path/to/gsm8k/test.jsonl --n 500 --k 4   # the paper's setting
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
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from atmanrl.config import EvalConfig, RolloutConfig


def _number(kind, name: str, what: str, low: float, inclusive: bool = True):
    """An argparse type: a ``kind`` number >= ``low`` (> ``low`` when not ``inclusive``), with a sentence on error."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'} "
                                             f"({what})") from None
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            bound = f">= {low:g}" if inclusive else f"> {low:g}"
            raise argparse.ArgumentTypeError(f"{name} must be {bound} ({what}), got {text}")
        return value

    return parse


def output_paths(out: str) -> tuple[Path, Path]:
    """(JSON path, Markdown path) from ``--out``: ``NAME.json`` or ``NAME.md`` gives both ``NAME.json`` and
    ``NAME.md``; any other suffix is an error (never two files at one path)."""
    path = Path(out)
    if path.suffix.lower() not in (".json", ".md"):
        raise SystemExit(f"--out {out}: name the results file NAME.json or NAME.md (both NAME.json, with every "
                         f"sample, and NAME.md, with the table, are written)")
    return path.with_suffix(".json"), path.with_suffix(".md")


def check_writable(paths: list[Path]) -> None:
    """Fail now, not after the evaluation, when an output cannot be written (the directory is created)."""
    for path in paths:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SystemExit(f"cannot create the output directory {path.parent}: {e.strerror}; "
                             f"choose another --out") from None
        if path.is_dir():
            raise SystemExit(f"cannot write {path}: it is a directory; choose another --out")
        existed = path.exists()
        try:
            with path.open("a", encoding="utf-8"):
                pass
        except OSError as e:
            raise SystemExit(f"cannot write {path}: {e.strerror}; choose another --out") from None
        if not existed:
            path.unlink()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    help="embedded model name, Hugging Face checkpoint directory or .gguf file")
    ap.add_argument("--data", default=None, help="GSM8K jsonl file (default: the embedded synthetic problems)")
    ap.add_argument("--n", type=_number(int, "--n", "problems to draw", 1), default=8,
                    help="problems to draw (paper: 500)")
    ap.add_argument("--k", type=_number(int, "--k", "samples per problem", 1), default=4,
                    help="samples per problem (paper: 4)")
    ap.add_argument("--seed", type=int, default=EvalConfig.seed,
                    help="seed of the problem draw, the sampling and the mistakes (default: the trainer's eval.seed, "
                         "so both evaluate the same problems)")
    ap.add_argument("--max-new-tokens", type=_number(int, "--max-new-tokens", "tokens per completion", 1),
                    default=RolloutConfig.max_new_tokens,
                    help="generation length (default: the training length, rollout.max_new_tokens)")
    ap.add_argument("--temperature", type=_number(float, "--temperature", "sampling temperature", 0, False),
                    default=0.7)
    ap.add_argument("--top-p", type=_number(float, "--top-p", "nucleus mass, at most 1", 0, False), default=1.0)
    ap.add_argument("--batch-size", type=_number(int, "--batch-size", "sequences per generate call", 1), default=64,
                    help="sequences per generate call")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (the decode step is compiled on CUDA)")
    ap.add_argument("--threads", type=_number(int, "--threads", "torch CPU threads", 1), default=None,
                    help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--label", default=None, help="row label in the table (default: the model name)")
    ap.add_argument("--out", default="runs/eval/results.json",
                    help="NAME.json or NAME.md: writes NAME.json (every sample) and NAME.md (the tables)")
    ap.add_argument("--faithfulness", action="store_true",
                    help="also run the faithfulness tests (atmanrl.eval.faithfulness) on one CoT per problem")
    ap.add_argument("--task", default="gsm8k",
                    help="the task of atmanrl.tasks.registry to evaluate on (gsm8k, toyworld)")
    ap.add_argument("--filler", default="...", help="filler text of the filler-replacement test (default: ...)")
    ap.add_argument("--saliency-steps", type=_number(int, "--saliency-steps", "mask steps", 1), default=20,
                    help="mask steps of the saliency-agreement test (the paper: 200)")
    ap.add_argument("--saliency-lr", type=_number(float, "--saliency-lr", "mask learning rate", 0, False),
                    default=None, help="mask learning rate (default: 1e-3 * 200 / steps, SaliencyConfig.compressed)")
    ap.add_argument("--saliency-init", type=float, default=-0.4,
                    help="the mask's initial value c, negative (the paper: -0.4; docs/DESIGN.md, decision 11)")
    ap.add_argument("--compare", nargs=2, metavar=("BASELINE_JSON", "ATMANRL_JSON"),
                    help="print Table 1 for two result files, with relative changes against the first")
    args = ap.parse_args(argv)
    from atmanrl.tasks.registry import TASKS

    if args.task not in TASKS:
        ap.error(f"argument --task: unknown task {args.task!r}; valid tasks are: {', '.join(sorted(TASKS))}")
    if args.top_p > 1:
        ap.error(f"argument --top-p: must be <= 1 (nucleus mass), got {args.top_p}")
    if not (math.isfinite(args.saliency_init) and args.saliency_init < 0):
        ap.error(f"argument --saliency-init: the mask's initial value must be negative, got {args.saliency_init}")
    return args


def compare(paths: list[str]) -> str:
    from atmanrl.eval import table1_markdown
    from atmanrl.eval.faithfulness import faithfulness_markdown

    results = []
    for path in paths:
        try:
            results.append(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"--compare: cannot read {path} ({e}); pass two results files written by this "
                             f"script (NAME.json)") from None
    labels = [r["label"] for r in results]
    if labels[0] == labels[1]:
        labels = [f"{label} ({Path(p).stem})" for label, p in zip(labels, paths)]
    # The paper lists AtManRL above the baseline. Files of a --task other than gsm8k have no Table 1.
    out = []
    if all("summary" in r for r in results):
        out.append(table1_markdown([(labels[1], results[1]["summary"]), (labels[0], results[0]["summary"])],
                                   baseline=labels[0]))
    faith = [r.get("faithfulness") for r in results]
    if all(faith):
        out.append(faithfulness_markdown([(labels[1], faith[1]["summary"]), (labels[0], faith[0]["summary"])],
                                         baseline=labels[0]))
    elif any(faith):
        print("[eval] only one of the files has faithfulness results (--faithfulness); no faithfulness table",
              file=sys.stderr)
    return "\n\n".join(out)


def run_faithfulness(args, model, tokenizer, inputs):
    """The four faithfulness tests on ``inputs`` (None, with a message, when there is no CoT to test)."""
    from atmanrl.eval.faithfulness import faithfulness, gsm8k_layout

    if not inputs:
        print("[eval] no sample wrote a chain of thought: no faithfulness tests", file=sys.stderr)
        return None
    try:
        layout = gsm8k_layout(tokenizer, filler=args.filler)
    except ValueError as e:
        raise SystemExit(f"--filler: {e}") from None
    print(f"[eval] faithfulness tests on {len(inputs)} CoTs", file=sys.stderr)
    return faithfulness(model, tokenizer, inputs, layout=layout, seed=args.seed, max_new_tokens=args.max_new_tokens,
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
    """``--n`` held-out problems of ``--task`` drawn with ``--seed``: from ``--data``'s file, or generated."""
    from atmanrl.config import ConfigError
    from atmanrl.tasks.gsm8k import draw_problems
    from atmanrl.tasks.registry import task_entry

    try:
        pool = task_entry(args.task).problems(args.data, args.n, args.seed, True)
    except ConfigError as e:
        raise SystemExit(f"--data: {e}") from None
    if args.data and args.n > len(pool):
        sys.exit(f"--n {args.n} is more than the {len(pool)} problems in {args.data}")
    problems = draw_problems(pool, args.n, args.seed) if len(pool) > args.n else pool
    source = str(args.data) if args.data else f"generated by the {args.task} task (seed {args.seed})"
    return problems, source


def main(argv=None):
    args = parse_args(argv)
    if args.compare:
        print(compare(args.compare))
        return

    from atmanrl.eval import evaluate, table1_markdown
    from atmanrl.model import load
    from atmanrl.tasks.registry import make_task

    json_path, md_path = output_paths(args.out)
    check_writable([json_path, md_path])
    problems, source = load_problems(args)
    print(f"[eval] {len(problems)} problems from {source}, k={args.k}, model {args.model}", file=sys.stderr)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: torch sees no CUDA device here; use --device cpu")
    # bf16 on the GPU (as the trainer's rollouts); float32 on the CPU, where bf16 matmuls are slow.
    model, tokenizer = load(args.model, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                            device=device)
    model.eval()
    task = make_task(args.task, tokenizer)
    result = evaluate(model, task, problems, k=args.k, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_p=args.top_p, seed=args.seed, batch_size=args.batch_size)
    label = args.label or Path(args.model).name
    result = {"label": label, "model": args.model, "task": args.task, "data": source, "args": vars(args), **result}
    tables = [table1_markdown([(label, result["summary"])])]

    if args.faithfulness:
        from atmanrl.eval.faithfulness import faithfulness_markdown, gsm8k_layout, inputs_from_samples, task_inputs

        if args.task == "gsm8k":  # one of the Table 1 samples per problem
            inputs = inputs_from_samples(tokenizer, result["samples"], lambda s: task.prompt(problems[s["problem"]]))
        else:  # one CoT per problem drawn for the test (seeds per problem), as the measured reports were made
            inputs = task_inputs(model, tokenizer, task, problems, gsm8k_layout(tokenizer, filler=args.filler),
                                 max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                                 batch_size=args.batch_size)
        faith = run_faithfulness(args, model, tokenizer, inputs)
        if faith is not None:
            result["faithfulness"] = faith.to_dict()
            tables.append(faithfulness_markdown([(label, faith.summary)]))

    json_path.write_text(json.dumps(result, indent=1, ensure_ascii=False), encoding="utf-8")
    md_path.write_text("\n\n".join(tables) + "\n", encoding="utf-8")
    s = result["summary"]
    print(f"[eval] wrote {json_path} and {md_path}; {s['with_answer_pct']:.0f}% of samples wrote '#####'",
          file=sys.stderr)
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
