"""The task registry (atmanrl/tasks/registry.py): names, problems, the held-out draw, and a new task as one entry."""

from types import SimpleNamespace

import pytest
from tiny import TinyTask, tiny_config, tiny_policy

from atmanrl.config import ConfigError, DataConfig, EvalConfig
from atmanrl.tasks import registry as tasks
from atmanrl.tasks.gsm8k import GSM8KTask, draw_problems, read_gsm8k
from atmanrl.tasks.synthetic import synthetic_problems

pytestmark = pytest.mark.usefixtures("single_process_one_thread")  # conftest.py


def test_gsm8k_is_the_default_task():
    tokenizer = SimpleNamespace(stop_ids=(7, 9), pad_id=0)
    assert DataConfig().task == "gsm8k"
    task = tasks.make_task("gsm8k", tokenizer)
    assert isinstance(task, GSM8KTask) and task.stop_ids == [7, 9] and task.pad_id == 0


def test_unknown_task_names_the_key_and_the_valid_ones():
    with pytest.raises(ConfigError, match=r"data\.task: unknown task 'gsm9k'; valid tasks are: gsm8k"):
        tasks.make_task("gsm9k", None)
    with pytest.raises(ConfigError, match="data.task"):
        tasks.load_problems(DataConfig(task="toy"))


def test_synthetic_problems_without_a_path():
    problems = tasks.load_problems(DataConfig(synthetic_problems=12, seed=3))
    assert [p.question for p in problems] == [p.question for p in synthetic_problems(12, 3)]
    assert len(tasks.load_problems(DataConfig(synthetic_problems=12, seed=3, max_problems=5))) == 5
    held_out = tasks.load_eval_problems(DataConfig(), EvalConfig(problems=6, seed=1234))
    assert [p.question for p in held_out] == [p.question for p in synthetic_problems(6, 1234)]


def test_gsm8k_file_and_the_held_out_draw(gsm8k_test_path):
    """The trainer's eval block draws the same problems as data.gsm8k.draw_problems (the eval script's draw)."""
    data = DataConfig(path=str(gsm8k_test_path), max_problems=10)
    assert [p.question for p in tasks.load_problems(data)] == [p.question for p in read_gsm8k(gsm8k_test_path)[:10]]
    held_out = tasks.load_eval_problems(data, EvalConfig(path=str(gsm8k_test_path), problems=20, seed=5))
    expected = draw_problems(read_gsm8k(gsm8k_test_path), 20, 5)
    assert [p.question for p in held_out] == [p.question for p in expected]


def test_a_new_task_is_one_entry(tmp_path, monkeypatch):
    """Registering a task is one TASKS entry: data.task then picks its problems (and its Task) in train()."""
    seen = []

    def problems(path, n, seed, held_out):
        seen.append((path, n, seed, held_out))
        return list(range(n))

    monkeypatch.setitem(tasks.TASKS, "tiny", tasks.TaskEntry(make=lambda tokenizer: TinyTask(), problems=problems))
    assert isinstance(tasks.make_task("tiny", None), TinyTask)
    from atmanrl.rl.trainer import train

    cfg = tiny_config(tmp_path, "data.task=tiny", "data.synthetic_problems=8", "data.seed=4", "train.max_updates=1")
    result = train(cfg, policy=tiny_policy(), task=TinyTask())
    assert seen == [(None, 8, 4, False)]
    assert result.updates == 1 and result.metrics[0]["groups"] == 4


def test_unknown_task_fails_before_training(tmp_path):
    from atmanrl.rl.trainer import train

    with pytest.raises(ConfigError, match="valid tasks are"):
        train(tiny_config(tmp_path, "data.task=nope"), policy=tiny_policy(), task=TinyTask(), problems=list(range(8)))
