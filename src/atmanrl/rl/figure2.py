"""The paper's Figure 2 -- accuracy and mean response length during training -- drawn from run directories.

Each run directory holds ``metrics.jsonl`` (one record per update) and, when ``eval.every > 0``, ``eval.jsonl``
(held-out problems, greedy decoding: what the paper plots). With ``eval.jsonl`` the held-out numbers are drawn;
without it, the training rollouts' accuracy and completion length per update (noisier: sampled, a few problems).
The legend label is the run's arm: "baseline" when its saliency weight is 0, else "AtManRL" ("Eq. 3 literal" with
``saliency.reward: eq3``). The logs are read with ``rundir.read_records`` (a half-written last line is dropped).
matplotlib is an optional extra (``pip install atmanrl[plot]``).
"""

from __future__ import annotations

import json
from pathlib import Path

from atmanrl.rl.rundir import RunDirError, read_records

# (log file, what it is, accuracy key, length key)
SOURCES = [("eval.jsonl", "eval", "eval_accuracy", "eval_completion_len"),
           ("metrics.jsonl", "train rollouts", "accuracy", "completion_len")]


def _label(run: Path) -> str:
    try:
        saliency = json.loads((run / "config.json").read_text(encoding="utf-8"))["saliency"]
        arm = "baseline" if not saliency["weight"] else "Eq. 3 literal" if saliency["reward"] == "eq3" else "AtManRL"
    except (OSError, ValueError, KeyError, TypeError):  # no readable config: the folder's name says enough
        return run.name
    return f"{arm} ({run.name})"


def series(run: Path) -> tuple[str, list, list, list]:
    """(source, updates, accuracy, mean response length) of one run directory."""
    for name, source, acc_key, len_key in SOURCES:
        path = run / name
        records = read_records(path) if path.is_file() else []
        if not records:
            continue
        missing = [key for key in ("update", acc_key, len_key) if any(key not in r for r in records)]
        if missing:
            raise RunDirError(f"{path}: records without {', '.join(missing)}; is it a log atmanrl wrote?")
        return (source, [r["update"] for r in records], [r[acc_key] for r in records],
                [r[len_key] for r in records])
    raise FileNotFoundError(f"{run} has neither eval.jsonl nor metrics.jsonl records; is it a run directory?")


def plot_runs(runs: list, out: Path) -> Path:
    """Figure 2 of every run in ``runs`` (accuracy left, response length right), saved as ``out``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError as e:
        raise ImportError("matplotlib is needed for the plot: pip install 'atmanrl[plot]' (or matplotlib)") from e
    curves = [(Path(run), *series(Path(run))) for run in runs]  # every log read before anything is drawn
    fig, (ax_acc, ax_len) = plt.subplots(1, 2, figsize=(10, 3.8))
    for run, _, x, acc, length in curves:
        marker = "o" if len(x) < 30 else None
        ax_acc.plot(x, acc, marker=marker, label=_label(run))
        ax_len.plot(x, length, marker=marker, label=_label(run))
    what = " / ".join(sorted({source for _, source, *_ in curves}))
    ax_acc.set(xlabel="update", ylabel="accuracy", title=f"Accuracy ({what})")
    ax_len.set(xlabel="update", ylabel="tokens", title=f"Mean response length ({what})")
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
