"""The ablation sweep driver (experiments/sweep.py): the grid expands as written, every cell trains with its own
settings through atmanrl.rl.trainer.train (a tiny policy, seconds), and one table comes out."""

import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from tiny import TinyTask, tiny_policy

from atmanrl.rl.trainer import train

pytestmark = pytest.mark.usefixtures("single_process_one_thread")  # conftest.py

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("sweep", EXPERIMENTS / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_spec(tmp_path, grid, **extra):
    spec = {"overrides": ["rollout.group_size=4", "rollout.max_new_tokens=2", "train.problems_per_update=2",
                          "train.num_minibatches=2", "train.micro_batch_size=8", "train.lr=0.01",
                          "train.max_updates=2", "checkpoint.every=0", "checkpoint.export=false"],
            "out_dir": str(tmp_path / "sweep"), "grid": grid, **extra}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_grid_expands_in_the_order_written(sweep):
    cells = sweep.expand_grid({"saliency.init": [-0.4, -1.0], "saliency.steps": [2, 3, 4], "saliency.weight": [0.5]})
    assert len(cells) == 6
    assert cells[0] == {"saliency.init": -0.4, "saliency.steps": 2, "saliency.weight": 0.5}
    assert [c["saliency.steps"] for c in cells] == [2, 3, 4, 2, 3, 4]  # the last key varies fastest
    assert [c["saliency.init"] for c in cells] == [-0.4] * 3 + [-1.0] * 3


def test_sweep_trains_every_cell_with_its_settings_and_writes_one_table(sweep, tmp_path):
    grid = {"saliency.init": [-0.4, -2.0], "saliency.steps": [1, 2], "saliency.weight": [0.5]}
    spec = sweep.read_spec(write_spec(tmp_path, grid, last=2))
    seen = []

    def train_tiny(cfg):
        seen.append((cfg.saliency.init, cfg.saliency.steps, cfg.saliency.weight, cfg.out_dir))
        return train(cfg, policy=tiny_policy(), task=TinyTask(saliency=True), problems=list(range(4)))

    rows = sweep.run_sweep(spec, train_tiny)
    out = tmp_path / "sweep"
    assert seen == [(-0.4, 1, 0.5, str(out / "cell_0")), (-0.4, 2, 0.5, str(out / "cell_1")),
                    (-2.0, 1, 0.5, str(out / "cell_2")), (-2.0, 2, 0.5, str(out / "cell_3"))]
    assert [r["grid"] for r in rows] == sweep.expand_grid(grid) and all(r["updates"] == 2 for r in rows)
    for r in rows:  # the row's numbers are the mean of its own run's last two metrics records
        records = [json.loads(line) for line in Path(r["out_dir"], "metrics.jsonl").read_text().splitlines()]
        assert r["accuracy"] == pytest.approx(sum(x["accuracy"] for x in records[-2:]) / 2)
        assert r["reward_saliency"] != 0.0, "the saliency reward ran (weight 0.5)"
    table = (out / "sweep.md").read_text().splitlines()
    assert table[0].startswith("| cell | saliency.init | saliency.steps | saliency.weight | updates | accuracy |")
    assert len(table) == 2 + 4 and table[4].startswith("| 2 | -2.0 | 1 | 0.5 | 2 |")
    assert json.loads((out / "sweep.json").read_text())["rows"][3]["grid"]["saliency.steps"] == 2


@pytest.mark.parametrize("grid, message", [
    ({"saliency.nope": [1]}, "sweep cell 0"),
    ({"saliency.steps": []}, "non-empty list"),
    ({"out_dir": ["a"]}, "out_dir cannot be swept"),
])
def test_bad_grids_stop_before_any_run(sweep, tmp_path, grid, message):
    from atmanrl.config import UserError

    path = write_spec(tmp_path, grid)
    with pytest.raises(UserError, match=message):
        sweep.run_sweep(sweep.read_spec(path), lambda cfg: pytest.fail("trained although the grid is bad"))


def test_the_shipped_a1_sweep_builds_every_cell(sweep, capsys):
    sweep.main([str(EXPERIMENTS / "configs" / "sweep_a1.yaml"), "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 8 and lines[0].startswith("cell 0: {'saliency.init': -0.4, 'saliency.steps': 10")


def _train_tiny(cfg):
    return train(cfg, policy=tiny_policy(), task=TinyTask(), problems=list(range(4)))


def test_a_rerun_that_resumes_reports_the_cells_logs_not_empty_rows(sweep, tmp_path):
    """Issue 16, case 4: rerunning a sweep with a resuming config trained 0 updates per cell and rewrote sweep.md
    and sweep.json from this call's (empty) records: | 0 | 2 | 0 | - | - |."""
    spec = sweep.read_spec(write_spec(tmp_path, {"train.seed": [0, 1]}, last=2))
    first = sweep.run_sweep(spec, _train_tiny)
    again = sweep.run_sweep(spec, _train_tiny)  # checkpoint.resume is true: each cell is already done
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in again]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in first]
    assert all(r["updates"] == 2 and r["accuracy"] is not None for r in again)
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["rows"][1]["updates"] == 2


def test_a_rerun_the_cells_would_refuse_stops_before_any_training(sweep, tmp_path):
    from atmanrl.config import UserError

    spec = sweep.read_spec(write_spec(tmp_path, {"train.seed": [0, 1]}))
    spec["overrides"].append("checkpoint.resume=false")
    sweep.run_sweep(spec, _train_tiny)
    before = (tmp_path / "sweep" / "sweep.md").read_text()
    with pytest.raises(UserError, match=r"sweep cell 0 \{'train.seed': 0\}: out_dir=.*cell_0 holds an earlier run"):
        sweep.run_sweep(spec, lambda cfg: pytest.fail("trained although a cell would be refused"))
    assert (tmp_path / "sweep" / "sweep.md").read_text() == before
