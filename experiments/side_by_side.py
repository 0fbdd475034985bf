"""The paper's Figures 3-5: the same problems' chains of thought from two evaluation result files, side by side,
with spaCy's numbers, symbols and stop words coloured (HTML).

    python experiments/eval_gsm8k.py --model runs/baseline/policy --label Baseline --out runs/eval/baseline.json
    python experiments/eval_gsm8k.py --model runs/atmanrl/policy --label AtManRL --out runs/eval/atmanrl.json
    python experiments/side_by_side.py runs/eval/baseline.json runs/eval/atmanrl.json --out side_by_side.html

Both files must come from the same problems (the same ``--data``, ``--n`` and ``--seed``). For each problem the
first sample that wrote ``#####`` is shown (else its first sample). ``--problems`` picks which (default: the first
three, as the paper shows three).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("baseline", help="results JSON of the baseline (experiments/eval_gsm8k.py)")
    ap.add_argument("atmanrl", help="results JSON of the AtManRL policy")
    ap.add_argument("--problems", type=int, nargs="+", default=None,
                    help="problem indices (0-based, as in the results files; default: the first three)")
    ap.add_argument("--out", default="outputs/side_by_side.html", help="the HTML page to write")
    args = ap.parse_args(argv)

    from atmanrl.eval.side_by_side import side_by_side_html

    results = []
    for path in (args.baseline, args.atmanrl):
        try:
            results.append(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"cannot read {path} ({e}); pass results files written by experiments/eval_gsm8k.py")
    available = sorted({s["problem"] for s in results[0]["samples"]} & {s["problem"] for s in results[1]["samples"]})
    problems = args.problems if args.problems is not None else available[:3]
    missing = [p for p in problems if p not in available]
    if missing or not problems:
        raise SystemExit(f"problems {missing or problems} are not in both results files (they share problems "
                         f"{available[:10]}{' ...' if len(available) > 10 else ''})")
    try:
        page = side_by_side_html(results[0], results[1], problems)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    print(f"wrote {out.resolve()} ({len(problems)} problems)", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
