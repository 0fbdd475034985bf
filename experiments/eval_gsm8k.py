"""Table 1 evaluation of a checkpoint on GSM8K (or the embedded GSM8K-style problems).

    python experiments/eval_gsm8k.py                                    # embedded SmolLM2, synthetic problems
    python experiments/eval_gsm8k.py --data ../shared/data/gsm8k/test.jsonl --n 500 --k 4   # the paper's setting
    python experiments/eval_gsm8k.py --model runs/atmanrl/final --label AtManRL --out runs/eval/atmanrl.json
    python experiments/eval_gsm8k.py --compare runs/eval/baseline.json runs/eval/atmanrl.json

Draws ``--n`` problems with ``--seed`` (the paper: 500 GSM8K test problems), samples ``--k`` completions each (the
paper: 4), and writes a JSON file with every sample plus a Markdown Table 1 next to it (``.md``). ``--compare``
reads two such files (baseline first) and prints the table with the relative changes, as the paper shows it.
Progress goes to stderr; the table to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from atmanrl.config import EvalConfig, RolloutConfig


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    help="embedded model name, Hugging Face checkpoint directory or .gguf file")
    ap.add_argument("--data", default=None, help="GSM8K jsonl file (default: the embedded synthetic problems)")
    ap.add_argument("--n", type=int, default=8, help="problems to draw (paper: 500)")
    ap.add_argument("--k", type=int, default=4, help="samples per problem (paper: 4)")
    ap.add_argument("--seed", type=int, default=EvalConfig.seed,
                    help="seed of the problem draw and of the sampling (default: the trainer's eval.seed, so both "
                         "evaluate the same problems)")
    ap.add_argument("--max-new-tokens", type=int, default=RolloutConfig.max_new_tokens,
                    help="generation length (default: the training length, rollout.max_new_tokens)")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=64, help="sequences per generate call")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (the decode step is compiled on CUDA)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--label", default=None, help="row label in the table (default: the model name)")
    ap.add_argument("--out", default="runs/eval/results.json", help="results JSON (the table goes next to it, .md)")
    ap.add_argument("--compare", nargs=2, metavar=("BASELINE_JSON", "ATMANRL_JSON"),
                    help="print Table 1 for two result files, with relative changes against the first")
    args = ap.parse_args(argv)

    from atmanrl.eval import table1_markdown

    if args.compare:
        rows = []
        for path in args.compare:
            result = json.loads(Path(path).read_text(encoding="utf-8"))
            rows.append((result["label"], result["summary"]))
        if rows[0][0] == rows[1][0]:
            rows = [(f"{label} ({Path(p).stem})", s) for (label, s), p in zip(rows, args.compare)]
        # The paper lists AtManRL above the baseline.
        print(table1_markdown([rows[1], rows[0]], baseline=rows[0][0]))
        return

    from atmanrl.data import draw_problems, make_problems, read_gsm8k
    from atmanrl.eval import evaluate
    from atmanrl.model import load

    if args.data:
        pool = read_gsm8k(args.data)
        if args.n > len(pool):
            sys.exit(f"--n {args.n} is more than the {len(pool)} problems in {args.data}")
        problems = draw_problems(pool, args.n, args.seed)
        source = str(args.data)
    else:
        problems = make_problems(args.n, seed=args.seed)
        source = f"synthetic (atmanrl.data.synthetic, seed {args.seed})"
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
    result = evaluate(model, tokenizer, problems, k=args.k, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_p=args.top_p, seed=args.seed, batch_size=args.batch_size)
    label = args.label or Path(args.model).name
    result = {"label": label, "model": args.model, "data": source, "args": vars(args), **result}
    table = table1_markdown([(label, result["summary"])])

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False), encoding="utf-8")
    out.with_suffix(".md").write_text(table + "\n", encoding="utf-8")
    s = result["summary"]
    print(f"[eval] wrote {out} and {out.with_suffix('.md')}; {s['with_answer_pct']:.0f}% of samples wrote '#####'",
          file=sys.stderr)
    print(table)


if __name__ == "__main__":
    main()
