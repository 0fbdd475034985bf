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

Every cell's configuration is built and checked before the first run: an unknown key or a bad value, a sweep
file that is not UTF-8 YAML or has a field of the wrong kind (``overrides`` is a list of ``key.sub=value`` strings;
one string is one override), and a cell directory that the run would refuse (an earlier run that is neither
resumed nor overwritten) stop the sweep at once with one sentence naming the file or the cell, and exit code 2.
Each cell is one call of ``atmanrl.rl.trainer.train``; its row holds the grid values and, averaged over the last
``last`` updates of its ``metrics.jsonl`` (the cell directory's whole log, so a rerun that resumes a finished cell
reports its updates, not an empty row), accuracy, outcome and saliency reward, CoT and completion length,
zero-variance groups, plus the held-out accuracy of its last evaluation when ``eval.every > 0``, and the wall time
of this call. The table goes to ``out_dir/sweep.md`` and stdout, every number to ``out_dir/sweep.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import yaml

from atmanrl.config import UserError, load_config, text_arg
from atmanrl.rl import rundir

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
    """The sweep file, checked: a mapping with a non-empty ``grid`` of ``key: [values]`` and fields of the right
    kind; every mistake is a ``UserError`` naming the file and the field."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise UserError(f"cannot read the sweep file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}, byte {e.start}: not UTF-8 text; save the sweep file as UTF-8") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("grid"), dict) or not spec["grid"]:
        raise UserError(f"{path}: a sweep file needs a 'grid' mapping of key: [values] (see experiments/sweep.py)")
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise UserError(f"{path}: unknown top-level keys {sorted(unknown)}; the sweep file knows {sorted(SPEC_KEYS)}")
    for key, values in spec["grid"].items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{path}: grid key {key!r} must have a non-empty list of values, got {values!r}")
        if key == "out_dir":
            raise UserError(f"{path}: out_dir cannot be swept; each cell trains in out_dir/cell_k")
    last = spec.get("last", 1)
    if not isinstance(last, int) or isinstance(last, bool) or last < 1:
        raise UserError(f"{path}: 'last' must be a positive integer (updates averaged per cell), got {last!r}")
    overrides = spec.get("overrides") or []
    overrides = [overrides] if isinstance(overrides, str) else overrides  # one string: one override
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise UserError(f"{path}: 'overrides' must be a list of key.sub=value strings (e.g. [train.max_updates=4]), "
                        f"got {spec.get('overrides')!r}")
    for key in ("config", "out_dir"):
        if key in spec and (not isinstance(spec[key], str) or not spec[key].strip()):
            raise UserError(f"{path}: '{key}' must be a path, got {spec[key]!r}")
    return {**spec, "overrides": overrides, "out_dir": spec.get("out_dir", f"runs/{path.stem}"), "last": last}


def expand_grid(grid: dict) -> list[dict]:
    """Every combination of the grid's values, as ``{key: value}`` dicts, the last key varying fastest."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def cell_configs(spec: dict) -> list[tuple[dict, object]]:
    """(grid values, RunConfig) per cell, all built -- and their directories checked -- before anything runs."""
    out = []
    for k, cell in enumerate(expand_grid(spec["grid"])):
        overrides = list(spec["overrides"]) + [f"{key}={json.dumps(value)}" for key, value in cell.items()]
        overrides.append(f"out_dir={json.dumps(str(Path(spec['out_dir']) / f'cell_{k}'))}")  # quoted: kept as written
        try:
            cfg = load_config(spec.get("config"), overrides)
            rundir.check(cfg)
        except UserError as e:
            raise UserError(f"sweep cell {k} {cell}: {e}") from None
        out.append((cell, cfg))
    return out


def summarize(records: list[dict], last: int) -> dict:
    """The table's numbers from a cell's metrics records: means over the last ``last`` updates."""
    tail = records[-last:]
    row = {"updates": records[-1].get("update", 0) if records else 0}
    for key, _, _ in COLUMNS:
        if key == "zero_variance_share":
            values = [r["zero_variance_groups"] / r["groups"] for r in tail if r.get("groups")]
        else:
            values = [r[key] for r in tail if isinstance(r.get(key), (int, float))]
        row[key] = sum(values) / len(values) if values else None
    return row


def cell_row(k: int, cell: dict, cfg, seconds: float, last: int) -> dict:
    """A cell's row from its directory's logs (all its updates, also those of an earlier call it resumed)."""
    run = Path(cfg.out_dir)
    metrics = run / "metrics.jsonl"
    row = {"cell": k, "grid": cell, "out_dir": str(cfg.out_dir),
           **summarize(rundir.read_records(metrics) if metrics.is_file() else [], last), "seconds": seconds}
    evals = rundir.read_records(run / "eval.jsonl") if (run / "eval.jsonl").is_file() else []
    if evals:
        row["eval_accuracy"] = evals[-1].get("eval_accuracy")
    return row


def markdown(rows: list[dict], keys: list[str]) -> str:
    header = ["cell", *keys, "updates", *[h for _, h, _ in COLUMNS], "eval accuracy", "time"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        cells = [str(row["cell"]), *[str(row["grid"][k]) for k in keys], str(row["updates"])]
        cells += ["–" if row[key] is None else f"{row[key]:.{d}f}" for key, _, d in COLUMNS]
        accuracy = row.get("eval_accuracy")
        cells += ["–" if accuracy is None else f"{accuracy:.3f}", f"{row['seconds']:.0f} s"]
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
        try:
            train_fn(cfg)
        except UserError as e:
            raise UserError(f"sweep cell {k} {cell}: {e} (the cells before it are in {out / 'sweep.md'})") from None
        rows.append(cell_row(k, cell, cfg, time.perf_counter() - t0, spec["last"]))
        table = markdown(rows, keys)  # rewritten after every cell: a stopped sweep keeps what it finished
        (out / "sweep.md").write_text(table + "\n", encoding="utf-8")
        (out / "sweep.json").write_text(json.dumps({"spec": spec, "rows": rows}, indent=1) + "\n", encoding="utf-8")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec", type=text_arg("spec"), help="the sweep YAML file")
    ap.add_argument("--dry-run", action="store_true", help="build and list every cell's settings, train nothing")
    args = ap.parse_args(argv)
    try:
        spec = read_spec(args.spec)
        if args.dry_run:
            for k, (cell, cfg) in enumerate(cell_configs(spec)):
                print(f"cell {k}: {cell} -> {cfg.out_dir}")
            return 0
        rows = run_sweep(spec)
    except UserError as e:
        print(f"sweep.py: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"sweep.py: error: cannot use {e.filename or 'a file'} ({e.strerror}); free space or fix its "
              "permissions, then run the sweep again", file=sys.stderr)
        return 2
    print(markdown(rows, list(spec["grid"])))
    print(f"[sweep] wrote {Path(spec['out_dir']) / 'sweep.md'} and sweep.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
