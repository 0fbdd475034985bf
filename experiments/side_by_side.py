"""The paper's Figures 3-5: the same problems' chains of thought from two evaluation result files, side by side,
with spaCy's numbers, symbols and stop words coloured (HTML).

    python experiments/eval_gsm8k.py --model runs/baseline/policy --label Baseline --out runs/eval/baseline.json
    python experiments/eval_gsm8k.py --model runs/atmanrl/policy --label AtManRL --out runs/eval/atmanrl.json
    python experiments/side_by_side.py runs/eval/baseline.json runs/eval/atmanrl.json --out side_by_side.html

Both files must come from the same problems (the same ``--data``, ``--n`` and ``--seed``). For each problem the
first sample that wrote ``#####`` is shown (else its first sample). ``--problems`` picks which (default: the first
three, as the paper shows three).

Both files and ``--out`` are checked before spaCy runs: a file that is not UTF-8 JSON, or not a results file (a
``label`` and a list of ``samples``, each with an integer ``problem``, text ``question`` and ``cot``, an ``answer``
that is text or null and an integer ``cot_tokens``), ends with one sentence that names the file and the field, and
exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from atmanrl.config import UserError, number_arg, text_arg
from atmanrl.errors import read_json

USAGE = "pass results files written by experiments/eval_gsm8k.py"
# field -> (accepted types, what it must be)
SAMPLE_FIELDS = {"problem": ((int,), "an integer"), "question": ((str,), "text"), "cot": ((str,), "text"),
                 "answer": ((str, type(None)), "text or null"), "cot_tokens": ((int,), "an integer")}


def read_results(path: str) -> dict:
    """A results file of eval_gsm8k.py, checked field by field (what the page reads)."""
    data = read_json(path, USAGE)
    if not isinstance(data, dict) or not isinstance(data.get("label"), str) or not isinstance(data.get("samples"),
                                                                                               list):
        raise UserError(f"{path} is not a results file (a JSON object with a text 'label' and a list of 'samples'); "
                        f"{USAGE}")
    for i, sample in enumerate(data["samples"]):
        if not isinstance(sample, dict):
            raise UserError(f"{path}: samples[{i}] is not an object; {USAGE}")
        for field, (types, what) in SAMPLE_FIELDS.items():
            value = sample.get(field)
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                raise UserError(f"{path}: samples[{i}].{field} must be {what}, got {value!r:.60}; {USAGE}")
    return data


def check_out(out: Path) -> None:
    """Fail before spaCy runs when the page cannot be written."""
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; pass a file name such as {out / 'side_by_side.html'}")
    existed = out.exists()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a", encoding="utf-8"):
            pass
    except OSError as e:
        raise UserError(f"--out {out}: cannot write it ({e.strerror}); choose another --out") from None
    if not existed:
        out.unlink()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("baseline", type=text_arg("baseline"), help="results JSON of the baseline (eval_gsm8k.py)")
    ap.add_argument("atmanrl", type=text_arg("atmanrl"), help="results JSON of the AtManRL policy")
    ap.add_argument("--problems", type=number_arg(int, "a problem index", 0), nargs="+", default=None,
                    help="problem indices (0-based, as in the results files; default: the first three)")
    ap.add_argument("--out", type=text_arg("--out"), default="outputs/side_by_side.html", help="the HTML page")
    args = ap.parse_args(argv)
    try:
        page(args)
    except UserError as e:
        print(f"side_by_side.py: error: {e}", file=sys.stderr)
        return 2
    return 0


def page(args) -> Path:
    results = [read_results(path) for path in (args.baseline, args.atmanrl)]
    available = sorted({s["problem"] for s in results[0]["samples"]} & {s["problem"] for s in results[1]["samples"]})
    problems = args.problems if args.problems is not None else available[:3]
    missing = [p for p in problems if p not in available]
    if missing or not problems:
        raise UserError(f"problems {missing or problems} are not in both results files (they share problems "
                        f"{available[:10]}{' ...' if len(available) > 10 else ''})")
    out = Path(args.out)
    check_out(out)

    from atmanrl.eval.side_by_side import side_by_side_html

    try:
        html = side_by_side_html(results[0], results[1], problems)
    except ValueError as e:
        raise UserError(str(e)) from None
    out.write_text(html, encoding="utf-8")
    print(f"wrote {out.resolve()} ({len(problems)} problems)", file=sys.stderr)
    return out


if __name__ == "__main__":
    sys.exit(main())
