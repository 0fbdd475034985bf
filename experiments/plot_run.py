"""Draw the paper's Figure 2 -- accuracy and mean response length during training -- for one or more runs.

    python experiments/plot_run.py runs/paper_baseline runs/paper_atmanrl --out figure2.png

What is drawn, from which log, and how runs are labelled: ``atmanrl.rl.figure2``.
matplotlib is an optional extra (``pip install atmanrl[plot]``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from atmanrl.rl.figure2 import plot_runs
from atmanrl.rl.rundir import RunDirError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories (out_dir of run_gsm8k.py)")
    parser.add_argument("--out", default="figure2.png")
    args = parser.parse_args(argv)
    try:
        print(plot_runs(args.runs, Path(args.out)))
    except (ImportError, FileNotFoundError, RunDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
