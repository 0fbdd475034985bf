"""Draw the paper's Figure 2 -- accuracy and mean response length during training -- for one or more runs.

    python experiments/plot_run.py runs/paper_baseline runs/paper_atmanrl --out figure2.png

Each run directory holds ``metrics.jsonl`` (one line per update) and, when ``eval.every > 0``, ``eval.jsonl``
(held-out problems, greedy decoding: what the paper plots). With ``eval.jsonl`` the held-out numbers are drawn;
without it, the training rollouts' accuracy and completion length per update (noisier: sampled, 8 problems).
The legend label is the run's arm: "baseline" when its saliency weight is 0, else "AtManRL" ("Eq. 3 literal" with
``saliency.reward: eq3``).
matplotlib is an optional extra (``pip install atmanrl[plot]``).

The logs are read with ``atmanrl.rl.rundir.read_records``: a partial last line (a run killed while writing it) is
dropped with a warning. A log line without a number the figure needs, a directory that is not a run, or an ``--out``
that cannot be written ends with one sentence naming the file (and key) and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from atmanrl.config import UserError, text_arg
from atmanrl.rl.rundir import read_records


def _read(path: Path) -> list[dict]:
    return read_records(path) if path.is_file() else []


def _label(run: Path) -> str:
    """The legend label: the run's arm from its config.json (just the directory name when that cannot be read)."""
    try:
        saliency = json.loads((run / "config.json").read_text(encoding="utf-8"))["saliency"]
        arm = "baseline" if not saliency["weight"] else "Eq. 3 literal" if saliency["reward"] == "eq3" else "AtManRL"
    except (OSError, ValueError, KeyError, TypeError):
        return run.name
    return f"{arm} ({run.name})"


def _column(records: list[dict], key: str, path: Path) -> list[float]:
    """``key`` of every record, as numbers; a record without it is one sentence naming the file, line and key."""
    values = []
    for i, r in enumerate(records, 1):
        value = r.get(key) if isinstance(r, dict) else None
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise UserError(f"{path}, record {i}: no number under {key!r} (got {value!r:.40}); the log is not one "
                            "atmanrl wrote, or was edited: restore it")
        values.append(value)
    return values


def series(run: Path) -> tuple[str, list, list, list]:
    """(source, updates, accuracy, mean response length) of one run directory."""
    run = Path(run)
    if evals := _read(run / "eval.jsonl"):
        path = run / "eval.jsonl"
        return ("eval", _column(evals, "update", path), _column(evals, "eval_accuracy", path),
                _column(evals, "eval_completion_len", path))
    if not (train := _read(run / "metrics.jsonl")):
        raise UserError(f"{run} has neither eval.jsonl nor metrics.jsonl records; pass run directories (the "
                        "out_dir of run_gsm8k.py)")
    path = run / "metrics.jsonl"
    return ("train rollouts", _column(train, "update", path), _column(train, "accuracy", path),
            _column(train, "completion_len", path))


def plot_runs(runs: list, out: Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("matplotlib is needed for the plot: pip install 'atmanrl[plot]' (or matplotlib)") from e
    data = [(run, *series(run)) for run in map(Path, runs)]  # every log checked before anything is drawn
    fig, (ax_acc, ax_len) = plt.subplots(1, 2, figsize=(10, 3.8))
    sources = set()
    for run, source, x, acc, length in data:
        sources.add(source)
        marker = "o" if len(x) < 30 else None
        ax_acc.plot(x, acc, marker=marker, label=_label(run))
        ax_len.plot(x, length, marker=marker, label=_label(run))
    what = " / ".join(sorted(sources))
    ax_acc.set(xlabel="update", ylabel="accuracy", title=f"Accuracy ({what})")
    ax_len.set(xlabel="update", ylabel="tokens", title=f"Mean response length ({what})")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_acc, ax_len):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # updates are whole numbers
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
    except OSError as e:
        raise UserError(f"cannot write the figure {out} ({e.strerror}); choose another --out") from None
    except ValueError as e:  # an unknown image format
        raise UserError(f"cannot write the figure {out} ({e}); name it NAME.png, NAME.pdf or NAME.svg") from None
    finally:
        plt.close(fig)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=text_arg("runs"), help="run directories (out_dir of run_gsm8k.py)")
    parser.add_argument("--out", type=text_arg("--out"), default="figure2.png")
    args = parser.parse_args(argv)
    try:
        print(plot_runs(args.runs, Path(args.out)))
    except (ImportError, UserError) as e:
        print(f"plot_run.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
