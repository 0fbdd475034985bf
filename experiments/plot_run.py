"""Draw the paper's Figure 2 -- accuracy and mean response length during training -- for one or more runs.

    python experiments/plot_run.py runs/paper_baseline runs/paper_atmanrl --out figure2.png

What is drawn, from which log, and how runs are labelled: ``atmanrl.rl.figure2``.
matplotlib is an optional extra (``pip install atmanrl[plot]``).

A run directory without logs, a log line without a number the figure needs, and an ``--out`` that cannot be written
(checked before any log is read: its directory, its format) end with one sentence and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from atmanrl.config import UserError, text_arg
from atmanrl.rl.figure2 import plot_runs


def check_out(out: Path) -> Path:
    """``--out``, refused now (not after reading every log) when matplotlib cannot write that format or the file
    cannot be created."""
    from matplotlib.figure import Figure

    if out.is_dir():
        raise UserError(f"--out {out} is a directory; name a file such as {out / 'figure2.png'}")
    if out.suffix.lower().lstrip(".") not in Figure().canvas.get_supported_filetypes():
        raise UserError(f"--out {out}: matplotlib cannot write {out.suffix or 'a file without suffix'}; name it "
                        "NAME.png, NAME.pdf or NAME.svg")
    existed = out.exists()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("ab"):
            pass
    except OSError as e:
        raise UserError(f"--out {out}: cannot write it ({e.strerror}); choose another --out") from None
    if not existed:
        out.unlink()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=text_arg("runs"), help="run directories (out_dir of run_gsm8k.py)")
    parser.add_argument("--out", type=text_arg("--out"), default="figure2.png")
    args = parser.parse_args(argv)
    try:
        print(plot_runs(args.runs, check_out(Path(args.out))))
    except (ImportError, FileNotFoundError, UserError) as e:  # FileNotFoundError: a directory without logs
        print(f"plot_run.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
