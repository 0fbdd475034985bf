"""Train a policy with GRPO + the AtMan saliency reward (or the outcome-only baseline) on GSM8K.

    torchrun experiments/run_gsm8k.py                         # the CPU default: the toy world (cpu_default.yaml)
    python experiments/run_gsm8k.py                           # the same, as one plain process
    torchrun --nproc_per_node 8 experiments/run_gsm8k.py --config experiments/configs/paper_llama32_3b_atmanrl.yaml \
        model.name_or_path=/path/to/Llama-3.2-3B-Instruct data.path=/path/to/gsm8k/train.jsonl

Any ``key.sub=value`` after the options overrides the config (``saliency.weight=0`` is the baseline arm;
``data.task=NAME`` trains on another task registered in atmanrl/tasks/registry.py). Writes
``out_dir/{atmanrl-run.json, config.json, metrics.jsonl, eval.jsonl, checkpoints/step_N, policy/, figure2.png}``.
A toy-world run (``data.task: toyworld``, the CPU default) ends with a before/after block in Table 1's layout on
held-out problems. ``out_dir`` stays locked from the start of training until the figure is drawn and the policy
evaluated, so no other run can take the directory in between.

A user error (a config key or value, a data or model file, the run directory, a full disk) ends with one sentence
that names the file, key or limit, and exit code 2.
"""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

from atmanrl import dist
from atmanrl.config import ConfigError, UserError, load_config
from atmanrl.rl import rundir
from atmanrl.rl.figure2 import plot_runs
from atmanrl.rl.trainer import train

HERE = Path(__file__).resolve().parent


def os_error(e: OSError) -> str:
    """One sentence for a file-system error (a full disk, a read-only directory) met while the run writes."""
    where = f" {e.filename}" if e.filename else ""
    hint = ("free space on that disk, then resume with checkpoint.resume=true (the newest checkpoint is intact)"
            if e.errno == errno.ENOSPC else "fix the file or its permissions, or choose another out_dir")
    return f"cannot use{where} ({e.strerror or e}); {hint}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(HERE / "configs" / "cpu_default.yaml"), help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.lr=1e-6")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        parser.error(str(e))

    try:
        with rundir.hold(cfg.out_dir):
            result = train(cfg)
            report(cfg, result)
    except UserError as e:
        return fail(str(e))
    except OSError as e:
        return fail(os_error(e))
    dist.shutdown()
    return 0


def fail(message: str) -> int:
    print(f"run_gsm8k.py: error: {message}", file=sys.stderr)
    dist.shutdown()
    return 2


def report(cfg, result) -> None:
    """Rank 0, with out_dir still held: the time per update, Figure 2, and the toy world's before/after block."""
    d = dist.info()
    if not (d.is_main and result.metrics):
        return
    n = len(result.metrics)
    mean = {k: sum(r[k] for r in result.metrics) / n for k in ("time_rollout", "time_saliency", "time_update")}
    total = sum(mean.values())
    print(f"mean time per update over {n} updates: {total:.1f}s = rollout {mean['time_rollout']:.1f}s + "
          f"saliency {mean['time_saliency']:.1f}s + update {mean['time_update']:.1f}s", file=sys.stderr)
    try:
        png = plot_runs([result.out_dir], Path(result.out_dir) / "figure2.png")
        print(f"Figure 2 written to {png}", file=sys.stderr)
    except ImportError as e:
        print(f"Figure 2 not drawn: {e}", file=sys.stderr)
    policy = Path(result.out_dir) / "policy"
    if cfg.data.task == "toyworld" and policy.is_dir():  # the closing before/after block (Table 1 layout)
        from atmanrl.toy.evaluate import before_after

        print(f"\nBefore ({cfg.model.name_or_path}) and after ({policy}) this run:\n"
              f"{before_after(cfg.model.name_or_path, str(policy))}")


if __name__ == "__main__":
    sys.exit(main())
