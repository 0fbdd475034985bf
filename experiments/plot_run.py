"""Draw the paper's Figure 2 -- accuracy and mean response length during training -- for one or more runs.

    python experiments/plot_run.py runs/paper_baseline runs/paper_atmanrl --out figure2.png

Each run directory holds ``metrics.jsonl`` (one line per update) and, when ``eval.every > 0``, ``eval.jsonl``
(held-out problems, greedy decoding: what the paper plots). With ``eval.jsonl`` the held-out numbers are drawn;
without it, the training rollouts' accuracy and completion length per update (noisier: sampled, 8 problems).
The legend label is the run's arm: "baseline" when its saliency weight is 0, else "AtManRL" ("Eq. 3 literal" with
``saliency.reward: eq3``).
matplotlib is an optional extra (``pip install atmanrl[plot]``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _label(run: Path) -> str:
    cfg = run / "config.json"
    if cfg.is_file():
        saliency = json.loads(cfg.read_text())["saliency"]
        arm = "baseline" if not saliency["weight"] else "Eq. 3 literal" if saliency["reward"] == "eq3" else "AtManRL"
        return f"{arm} ({run.name})"
    return run.name


def series(run: Path) -> tuple[str, list, list, list]:
    """(source, updates, accuracy, mean response length) of one run directory."""
    evals = _read(run / "eval.jsonl")
    if evals:
        return ("eval", [r["update"] for r in evals], [r["eval_accuracy"] for r in evals],
                [r["eval_completion_len"] for r in evals])
    train = _read(run / "metrics.jsonl")
    if not train:
        raise FileNotFoundError(f"{run} has neither eval.jsonl nor metrics.jsonl; is it a run directory?")
    return ("train rollouts", [r["update"] for r in train], [r["accuracy"] for r in train],
            [r["completion_len"] for r in train])


def plot_runs(runs: list, out: Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("matplotlib is needed for the plot: pip install 'atmanrl[plot]' (or matplotlib)") from e
    fig, (ax_acc, ax_len) = plt.subplots(1, 2, figsize=(10, 3.8))
    sources = set()
    for run in map(Path, runs):
        source, x, acc, length = series(run)
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
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories (out_dir of run_gsm8k.py)")
    parser.add_argument("--out", default="figure2.png")
    args = parser.parse_args(argv)
    try:
        print(plot_runs(args.runs, Path(args.out)))
    except (ImportError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
