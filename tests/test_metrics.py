"""The metrics record (atmanrl/rl/metrics.py) and the progress lines (atmanrl/progress.py).

The record is built from a dict of rank-local sums reduced in one all-reduce; two gloo processes holding half of
the rollouts each must produce the record of one process holding all of them.
"""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from atmanrl import dist
from atmanrl.progress import Progress, hms
from atmanrl.rl.grpo import LossStats
from atmanrl.rl.metrics import PER_ROLLOUT, reduce_dict, update_record
from atmanrl.rl.rollout import Rollout
from atmanrl.saliency import SaliencyResult
from atmanrl.tasks import Score

TIMES = {"time_rollout": 2.0, "time_saliency": 1.0, "time_update": 0.5}


def _rollout(correct, answered, finished, length, cot, outcome, saliency, saturated=None) -> Rollout:
    r = Rollout(0, [1, 2], [5] * length, [0.0] * length, finished, Score(correct, answered, cot))
    r.outcome, r.saliency_reward, r.total = outcome, saliency, outcome + saliency
    if saturated is not None:
        r.saliency_result = SaliencyResult("ok", saliency, saliency, 1 - saliency, torch.zeros(0), torch.zeros(0),
                                           saturated=saturated)
    return r


def _rank_inputs(rank: int):
    """Rank 0 holds groups 0-1, rank 1 groups 2-3 (4 rollouts per group, 16 rollouts)."""
    rollouts = []
    for k in range(8):
        i = rank * 8 + k
        correct, answered = i % 3 == 0, i % 4 != 3
        rollouts.append(_rollout(correct, answered, i % 5 != 0, 4 + i, 2 + i % 3 if answered else 4 + i,
                                 0.0 if correct else -1.0, 0.01 * i, saturated=(i % 2 == 0) if answered else None))
    zero_var = torch.tensor([rank == 0, False])
    stats = LossStats(units=10.0 + rank, clipped=1.0 + rank, ratio_sum=10.5 + rank, ratio_min=0.9 - 0.1 * rank,
                      ratio_max=1.1 + 0.2 * rank, kl_sum=0.0)
    times = {k: v * (1 + rank) for k, v in TIMES.items()}
    return rollouts, zero_var, stats, times


def _record_of_one_process() -> dict:
    r0, z0, s0, _ = _rank_inputs(0)
    r1, z1, s1, _ = _rank_inputs(1)
    return update_record(3, 0, r0 + r1, torch.cat([z0, z1]), [0.5, 0.25], s0.add(s1), [], dict(TIMES))


def test_record_by_hand():
    rollouts, zero_var, stats, times = _rank_inputs(0)
    record = update_record(7, 1, rollouts, zero_var, [1.0, 3.0], stats, [2.0, 4.0], times)
    n = len(rollouts)
    assert (record["update"], record["epoch"]) == (7, 1)
    assert record["accuracy"] == sum(r.score.correct for r in rollouts) / n == 3 / 8
    assert record["answered"] == 6 / 8 and record["truncated"] == 2 / 8
    assert record["completion_len"] == sum(range(4, 12)) / 8
    answered = [r for r in rollouts if r.score.has_answer]
    assert record["cot_len"] == sum(r.score.cot_tokens for r in answered) / len(answered)  # answered ones only
    assert record["reward_total"] == pytest.approx(record["reward_outcome"] + record["reward_saliency"])
    assert (record["zero_variance_groups"], record["groups"]) == (1, 2)
    assert record["loss"] == 2.0 and record["losses"] == [1.0, 3.0] and record["grad_norm"] == 3.0
    assert record["clip_fraction"] == 0.1 and record["ratio_mean"] == 1.05
    assert (record["ratio_min"], record["ratio_max"]) == (0.9, 1.1)
    assert record["saliency_saturated"] == 4  # answered rollouts 0, 2, 4, 6 (3 and 7 have no mask)
    assert record["time_rollout"] == 2.0 and record["tokens_per_s"] == sum(range(4, 12)) / 2.0
    assert "kl" not in record
    assert set(PER_ROLLOUT) <= set(record)


def test_no_gradient_means_null_ratio_statistics():
    rollouts, zero_var, _, times = _rank_inputs(0)
    record = update_record(1, 0, rollouts, zero_var, [0.0], LossStats(), [], times)
    assert record["ratio_mean"] is None and record["ratio_min"] is None and record["ratio_max"] is None
    assert record["clip_fraction"] == 0 and json.dumps(record)  # JSON-able (no inf)


def test_reduce_dict_single_process_is_the_identity():
    dist.shutdown()
    values = {"a": 1.5, "b": float("inf"), "c": 3}
    assert reduce_dict(values) == {"a": 1.5, "b": float("inf"), "c": 3.0}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init("cpu")
    sums = reduce_dict({"a": rank + 1.0, "b": 10.0 * (rank + 1)})
    lows = reduce_dict({"a": rank + 1.0}, "min")
    highs = reduce_dict({"a": rank + 1.0}, "max")
    rollouts, zero_var, stats, times = _rank_inputs(rank)
    record = update_record(3, 0, rollouts, zero_var, [0.5, 0.25], stats, [], times)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"sums": sums, "lows": lows, "highs": highs, "record": record}, f)
    dist.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_reduce_to_the_one_process_record(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for res in results:
        assert res["sums"] == {"a": 3.0, "b": 30.0}
        assert res["lows"] == {"a": 1.0} and res["highs"] == {"a": 2.0}
    assert results[0]["record"] == results[1]["record"]  # every rank holds the same record
    two = results[0]["record"]
    dist.shutdown()
    one = _record_of_one_process()
    for key in TIMES:  # the slowest rank sets the pace: rank 1's times are twice rank 0's
        assert two.pop(key) == 2 * one.pop(key)
    assert two.pop("tokens_per_s") == pytest.approx(one.pop("tokens_per_s") / 2)
    assert two.pop("losses") == one.pop("losses")
    assert two == pytest.approx(one, abs=1e-12)  # sums added in another order: equal up to rounding
    assert one["groups"] == 4 and one["zero_variance_groups"] == 1


def test_progress_is_quiet_for_short_phases_and_paced_for_long_ones():
    now, lines = [0.0], []
    clock = lambda: now[0]  # noqa: E731
    with Progress("rollout", 4, "groups", quiet_s=5, every_s=10, clock=clock, log=lines.append) as p:
        now[0] = 1.0
        p.advance()
        assert lines == []  # quiet: the phase is younger than 5 s
        now[0] = 6.0
        p.advance(tokens=600)
        assert lines == ["  rollout: 2/4 groups, 100 tok/s, 0m06s so far, ETA 0m06s"]
        now[0] = 8.0
        p.advance()
        assert len(lines) == 1  # at most one line per 10 s
        now[0] = 20.0
        p.advance()  # the last unit: the closing line says it, not advance
        assert len(lines) == 1
    assert lines[-1] == "  rollout: 4/4 groups, 30 tok/s, done in 0m20s"
    lines.clear()
    with Progress("saliency", 2, "sequences", quiet_s=5, clock=clock, log=lines.append) as p:
        p.advance(2)
    assert lines == []  # a phase shorter than quiet_s says nothing at all
    with Progress("saliency", 3, "sequences", quiet_s=5, clock=clock, log=lines.append) as p:
        for _ in range(21):
            p.advance(1 / 7)  # a batch of 1 sequence, 7 mask steps, three times (the float sum is 2.999...)
        now[0] = 30.0
    assert lines == ["  saliency: 3/3 sequences, done in 0m10s"]  # not "2.9999.../3 ... ETA"
    assert hms(3725) == "1h02m05s" and hms(float("nan")) == "?"


def test_progress_finish_makes_an_upper_bound_the_total():
    """A phase whose total is an upper bound (decode steps, when every rollout stopped early) closes as done."""
    now, lines = [0.0], []
    with Progress("rollout", 1024, "decode steps (at most)", quiet_s=5, clock=lambda: now[0], log=lines.append) as p:
        for _ in range(40):
            p.advance(1, tokens=64)
        now[0] = 8.0
        p.finish()
    assert lines == ["  rollout: 40/40 decode steps (at most), 320 tok/s, done in 0m08s"]
