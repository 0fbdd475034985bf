"""Same numbers from two checkouts: the toy evaluation, the intervention truth and the saliency agreement.

A refactor that promises "no behaviour change" is checked with it (the task-layer move was): run it once with each
checkout's ``src`` first on the path, then compare the two files.

    PYTHONPATH=/path/to/old/src python benchmarks/parity.py --out before.json
    PYTHONPATH=src python benchmarks/parity.py --out after.json
    python benchmarks/parity.py --compare before.json after.json     # prints SAME / DIFF per block

Uses the cached toy warm start (``load("toyworld-sft")``, built on first use): 48 held-out problems with 2 samples
each, 12 labelled CoTs, 12 faithfulness inputs. One torch thread, fixed seeds.
"""

from __future__ import annotations

import argparse
import json
import sys


def measure() -> dict:
    import torch

    torch.set_num_threads(1)
    from atmanrl.eval import faithfulness as F
    from atmanrl.model import load
    from atmanrl.saliency import SaliencyConfig
    from atmanrl.toy import truth
    from atmanrl.toy.evaluate import evaluate_toy

    try:  # the layout since the task layer, or the one before it
        from atmanrl.tasks import toyworld as tw
        problems = tw.toy_problems(48, 0, "test")
    except ImportError:
        from atmanrl.data import toyworld as tw
        problems = tw.make_problems(48, 0, "test")
    model, tok = load("toyworld-sft")
    ev = evaluate_toy(model, tok, problems, k=2, seed=0)
    items = truth.labelled_cots(model, tok, problems, 12, 5)
    layout = F.gsm8k_layout(tok, filler="let")
    inputs = F.task_inputs(model, tok, tw.ToyTask(tok), problems[:12], layout, max_new_tokens=64, temperature=1.0,
                           seed=3)
    agr = F.saliency_agreement(model, tok, inputs, layout=layout, saliency_config=SaliencyConfig.compressed(5), seed=1)
    return {"toy_summary": ev["summary"], "toy_cots": [s["cot"] for s in ev["samples"][:20]],
            "carrying": [it.carrying for it in items],
            "study": truth.study(model, items, {"c10": SaliencyConfig.compressed(10)}, readouts=("all_rows",)),
            "agreement": {"flipped": agr.flipped, "auroc": agr.auroc, "top1": agr.top1, "mean": agr.mean_auroc}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write this checkout's numbers to this JSON file")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="compare two such files")
    args = ap.parse_args(argv)
    if args.compare:
        a, b = (json.load(open(path, encoding="utf-8")) for path in args.compare)
        for key in a:
            print(f"{key}: {'SAME' if a[key] == b.get(key) else 'DIFF'}")
        return 0 if a == b else 1
    if not args.out:
        ap.error("give --out FILE (measure) or --compare BEFORE AFTER")
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(measure(), f, indent=0, default=str)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
