"""Ablation sweep: a grid of short training runs from one YAML file, one table of results (the paper's appendix
A.1 names the knobs: the mask's initial value c, the number of mask steps, the saliency reward's weight).

    python experiments/sweep.py experiments/configs/sweep_a1.yaml
    python experiments/sweep.py experiments/configs/sweep_a1.yaml --dry-run     # list the cells, run nothing

The sweep file:

    config: experiments/configs/cpu_default.yaml   # the run config every cell starts from (optional)
    overrides: [train.max_updates=4]               # key.sub=value, applied to every cell (optional)
    out_dir: runs/sweep_a1                         # cell k trains in out_dir/cell_k
    last: 2                                        # the table averages the last `last` updates (default 1)
    grid:                                          # every combination, in the order written (last key fastest)
      saliency.init: [-0.4, -1.0]
      saliency.steps: [10, 20]
      saliency.weight: [0.5, 1.0]

Every cell's configuration is built and checked before the first run (an unknown key or a bad value stops the
sweep at once, naming the cell). Each cell is one call of ``atmanrl.rl.trainer.train``; its row holds the grid values
and, averaged over the last ``last`` updates of its ``metrics.jsonl`` records, accuracy, outcome and saliency
reward, CoT and completion length, zero-variance groups, plus the held-out accuracy of its last evaluation when
``eval.every > 0``, and its wall time. The table goes to ``out_dir/sweep.md`` and stdout, every number to
``out_dir/sweep.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import yaml

# (metrics key, column header, decimals)
COLUMNS = [
    ("accuracy", "accuracy", 3),
    ("reward_outcome", "R_outcome", 3),
    ("reward_saliency", "R_saliency", 4),
    ("cot_len", "CoT tokens", 1),
    ("completion_len", "completion tokens", 1),
    ("zero_variance_share", "zero-var groups", 2),
]
SPEC_KEYS = {"config", "overrides", "out_dir", "grid", "last"}


def read_spec(path: str | Path) -> dict:
    """The sweep file, checked: a mapping with a non-empty ``grid`` of ``key: [values]``."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise SystemExit(f"cannot read the sweep file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise SystemExit(f"{path} is not valid YAML: {e}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("grid"), dict) or not spec["grid"]:
        raise SystemExit(f"{path}: a sweep file needs a 'grid' mapping of key: [values] (see experiments/sweep.py)")
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise SystemExit(f"{path}: unknown top-level keys {sorted(unknown)}; the sweep file knows {sorted(SPEC_KEYS)}")
    for key, values in spec["grid"].items():
        if not isinstance(values, list) or not values:
            raise SystemExit(f"{path}: grid key {key!r} must have a non-empty list of values, got {values!r}")
        if key == "out_dir":
            raise SystemExit(f"{path}: out_dir cannot be swept; each cell trains in out_dir/cell_k")
    if not isinstance(spec.get("last", 1), int) or spec.get("last", 1) < 1:
        raise SystemExit(f"{path}: 'last' must be a positive integer (updates averaged per cell)")
    spec.setdefault("overrides", [])
    spec.setdefault("out_dir", f"runs/{path.stem}")
    spec.setdefault("last", 1)
    return spec


def expand_grid(grid: dict) -> list[dict]:
    """Every combination of the grid's values, as ``{key: value}`` dicts, the last key varying fastest."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def cell_configs(spec: dict) -> list[tuple[dict, object]]:
    """(grid values, RunConfig) per cell, all built before anything runs."""
    from atmanrl.config import ConfigError, load_config

    out = []
    for k, cell in enumerate(expand_grid(spec["grid"])):
        overrides = list(spec["overrides"]) + [f"{key}={json.dumps(value)}" for key, value in cell.items()]
        overrides.append(f"out_dir={Path(spec['out_dir']) / f'cell_{k}'}")
        try:
            out.append((cell, load_config(spec.get("config"), overrides)))
        except ConfigError as e:
            raise SystemExit(f"sweep cell {k} {cell}: {e}") from None
    return out


def summarize(records: list[dict], last: int) -> dict:
    """The table's numbers from a cell's metrics records: means over the last ``last`` updates."""
    tail = records[-last:]
    row = {"updates": records[-1]["update"] if records else 0}
    for key, _, _ in COLUMNS:
        if key == "zero_variance_share":
            values = [r["zero_variance_groups"] / r["groups"] for r in tail if r.get("groups")]
        else:
            values = [r[key] for r in tail if r.get(key) is not None]
        row[key] = sum(values) / len(values) if values else None
    return row


def markdown(rows: list[dict], keys: list[str]) -> str:
    header = ["cell", *keys, "updates", *[h for _, h, _ in COLUMNS], "eval accuracy", "time"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        cells = [str(row["cell"]), *[str(row["grid"][k]) for k in keys], str(row["updates"])]
        cells += ["–" if row[key] is None else f"{row[key]:.{d}f}" for key, _, d in COLUMNS]
        cells += ["–" if row.get("eval_accuracy") is None else f"{row['eval_accuracy']:.3f}", f"{row['seconds']:.0f} s"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_sweep(spec: dict, train_fn=None) -> list[dict]:
    """Run every cell with ``train_fn(cfg)`` (default: ``atmanrl.rl.trainer.train``), write the table and the JSON.

    Tests pass a ``train_fn`` that trains a tiny policy on a tiny task."""
    if train_fn is None:
        from atmanrl.rl.trainer import train as train_fn
    cells = cell_configs(spec)
    out = Path(spec["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    keys = list(spec["grid"])
    rows = []
    for k, (cell, cfg) in enumerate(cells):
        print(f"[sweep] cell {k + 1}/{len(cells)}: {cell}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        result = train_fn(cfg)
        row = {"cell": k, "grid": cell, "out_dir": str(cfg.out_dir), **summarize(result.metrics, spec["last"]),
               "seconds": time.perf_counter() - t0}
        evals = Path(cfg.out_dir) / "eval.jsonl"
        if evals.is_file():
            lines = [json.loads(line) for line in evals.read_text().splitlines() if line.strip()]
            row["eval_accuracy"] = lines[-1]["eval_accuracy"] if lines else None
        rows.append(row)
        table = markdown(rows, keys)  # rewritten after every cell: a stopped sweep keeps what it finished
        (out / "sweep.md").write_text(table + "\n", encoding="utf-8")
        (out / "sweep.json").write_text(json.dumps({"spec": spec, "rows": rows}, indent=1) + "\n", encoding="utf-8")
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec", help="the sweep YAML file")
    ap.add_argument("--dry-run", action="store_true", help="build and list every cell's settings, train nothing")
    args = ap.parse_args(argv)
    spec = read_spec(args.spec)
    if args.dry_run:
        for k, (cell, cfg) in enumerate(cell_configs(spec)):
            print(f"cell {k}: {cell} -> {cfg.out_dir}")
        return []
    rows = run_sweep(spec)
    print(markdown(rows, list(spec["grid"])))
    print(f"[sweep] wrote {Path(spec['out_dir']) / 'sweep.md'} and sweep.json", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
