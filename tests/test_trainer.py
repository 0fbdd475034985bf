"""The trainer loop on a tiny random Llama and a tiny task (``tests/tiny.py``): it learns, it records what it
promises, it exports."""

import json
import math

import pytest
import torch
from tiny import TinyTask, tiny_config, tiny_policy

from atmanrl import dist
from atmanrl.rl.trainer import train
from atmanrl.tasks import Score

pytestmark = pytest.mark.usefixtures("single_process_one_thread")  # conftest.py

def test_tiny_policy_learns_first_token_task(tmp_path):
    """Reward rises: mean accuracy of the first 3 updates (~1/16 by chance) vs the last 5 of 30 updates, lr 5e-3.

    A problem whose 8 rollouts are all wrong is a zero-variance group and gives no gradient, so single problems can
    stay unsolved for a while; hence the bound of 0.6, not 1. The lr is small enough that the result does not hang
    on the sampling seed: measured over train.seed 0-5, every seed learns (first 3 updates 0.03-0.15, last 5
    0.82-0.99). At lr 1e-2 / 2e-2 (20 updates) most seeds collapse onto one answer token for every problem
    (accuracy stuck at ~0.5, the share of problems that token solves; zero-variance groups, no gradient)."""
    cfg = tiny_config(tmp_path, "train.max_updates=30", "train.lr=0.005")
    result = train(cfg, policy=tiny_policy(), task=TinyTask(), problems=list(range(8)))
    acc = [r["accuracy"] for r in result.metrics]
    first, last = sum(acc[:3]) / 3, sum(acc[-5:]) / 5
    assert first < 0.2, acc
    assert last > 0.6, acc
    assert last - first > 0.5, acc
    # outcome reward is Eq. 4 of the accuracy: 0 correct, -1 otherwise
    for r in result.metrics:
        assert r["reward_outcome"] == pytest.approx(r["accuracy"] - 1)


def test_metrics_lines_and_first_pass_ratio(tmp_path):
    cfg = tiny_config(tmp_path, "train.max_updates=2", "train.num_minibatches=1", "train.ppo_epochs=1")
    train(cfg, policy=tiny_policy(), task=TinyTask(), problems=list(range(8)))
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in lines] == [1, 2]
    keys = {"reward_outcome", "reward_saliency", "reward_total", "accuracy", "cot_len", "completion_len",
            "clip_fraction", "ratio_mean", "ratio_min", "ratio_max", "zero_variance_groups", "time_rollout",
            "time_saliency", "time_update", "tokens_per_s"}
    assert keys <= set(lines[0])
    # One pass, one optimizer step: every ratio is computed before any step, so it is 1 up to the float rounding of
    # a cached decode step vs a plain forward (generate.py's parity), and nothing is clipped.
    # (An update whose groups are all zero-variance skips the forward: its ratio stats are null.)
    assert any(r["ratio_min"] is not None for r in lines)
    for r in lines:
        if r["ratio_min"] is not None:
            assert abs(r["ratio_min"] - 1) < 1e-4 and abs(r["ratio_max"] - 1) < 1e-4
        assert r["clip_fraction"] == 0


def test_saliency_arm_and_export(tmp_path):
    """Saliency weight 1 on the tiny task: the saliency reward enters the total reward; the policy is exported."""
    from atmanrl.model import load_hf

    cfg = tiny_config(tmp_path, "train.max_updates=1", "saliency.weight=1", "saliency.steps=3",
                      "rollout.max_new_tokens=4", "checkpoint.export=true")
    policy = tiny_policy()
    result = train(cfg, policy=policy, task=TinyTask(saliency=True), problems=list(range(8)))
    r = result.metrics[0]
    assert r["reward_total"] == pytest.approx(r["reward_outcome"] + r["reward_saliency"], abs=1e-9)
    assert r["reward_saliency"] != 0 and math.isfinite(r["reward_saliency"])
    assert r["time_saliency"] > 0
    exported = load_hf(tmp_path / "policy", dtype=torch.float32)
    for (name, a), b in zip(policy.state_dict().items(), exported.state_dict().values()):
        assert torch.equal(a, b), name


def test_saliency_rewards_one_call_neutral_per_group(monkeypatch):
    """One ``saliency`` call for all groups of the update; a rollout without an answer gets outcome -1 and ITS
    group's mean saliency reward (rl/rollout.py); the SaliencyResult is kept on the rollout."""
    import atmanrl.saliency
    from atmanrl.config import RunConfig
    from atmanrl.rl.rollout import Rollout
    from atmanrl.rl.trainer import saliency_rewards

    calls = []
    real = atmanrl.saliency.saliency

    def counting(model, inputs, config, **kwargs):
        calls.append(len(inputs))
        return real(model, inputs, config, **kwargs)

    monkeypatch.setattr(atmanrl.saliency, "saliency", counting)
    task = TinyTask(saliency=True)
    model = tiny_policy()
    rollouts = []
    for problem, completions in ((1, ([9, 5, 6], [8, 5, 7], [9, 9, 9])), (2, ([8, 6, 6], [8, 6, 5], [9, 4, 4]))):
        for c in completions:
            prompt = task.prompt(problem)
            rollouts.append(Rollout(problem, prompt, c, [0.0] * 3, False, task.score(problem, prompt, c)))
    rollouts[2].score = Score(correct=False, has_answer=False, cot_tokens=3)  # group 0: one truncated rollout
    cfg = RunConfig()
    cfg.saliency.steps = 3
    saliency_rewards(model, rollouts, cfg, G=3)
    assert calls == [5]  # the 5 answered rollouts of both groups in one call
    assert rollouts[2].saliency_result is None
    assert rollouts[2].saliency_reward == pytest.approx((rollouts[0].saliency_reward + rollouts[1].saliency_reward) / 2)
    assert rollouts[0].saliency_reward != rollouts[1].saliency_reward
    for r in rollouts[:2] + rollouts[3:]:
        assert r.saliency_result.ok and r.saliency_reward == r.saliency_result.reward and r.saliency_result.steps == 3


def test_config_errors_reach_the_trainer(tmp_path):
    cfg = tiny_config(tmp_path, "train.problems_per_update=3", "train.num_minibatches=5")
    with pytest.raises(ValueError, match="num_minibatches"):
        train(cfg, policy=tiny_policy(), task=TinyTask(), problems=list(range(8)))


def test_gsm8k_task_scores_real_tokens(smollm2):
    """GSM8KTask on SmolLM2's tokenizer: the answer after "#####" is judged, the saliency sequence is
    prompt + CoT + "#####" + gold; a completion without the delimiter is unanswered and gets no saliency input."""
    from atmanrl.tasks.gsm8k import GSM8KTask, Problem

    _, tokenizer = smollm2
    task = GSM8KTask(tokenizer)
    problem = Problem("Tom has 3 bags of 4 apples. How many apples?", "3*4=12\n#### 12", "12")
    prompt = task.prompt(problem)
    right = tokenizer.encode("3 bags of 4 apples is 3*4 = 12 apples.\n##### 12") + tokenizer.stop_ids[:1]
    wrong = tokenizer.encode("3 + 4 = 7.\n##### 7")
    cut = tokenizer.encode("Let me think about the apples in the bags")
    s_right, s_wrong, s_cut = (task.score(problem, prompt, c) for c in (right, wrong, cut))
    assert s_right.correct and s_right.has_answer and not s_wrong.correct and s_wrong.has_answer
    assert not s_cut.correct and not s_cut.has_answer and s_cut.saliency_input is None
    assert s_cut.cot_tokens == len(cut)
    x = s_wrong.saliency_input
    assert list(x.tokens[: x.prompt_len]) == prompt
    assert tokenizer.decode(list(x.tokens[x.cot[0]:x.cot[1]])).startswith("3 + 4 = 7")
    assert tokenizer.decode(list(x.tokens[x.answer[0]:x.answer[1]])).strip() == "12"  # the GOLD answer, not 7


def test_eval_lines_and_figure2(tmp_path):
    """eval.every writes held-out accuracy/length (update 0 and every N); Figure 2 draws both runs as one PNG."""
    pytest.importorskip("matplotlib")
    from atmanrl.rl.figure2 import plot_runs, series

    for arm, weight in (("baseline", 0), ("atmanrl", 1)):
        cfg = tiny_config(tmp_path / arm, "train.max_updates=2", "eval.every=1", f"saliency.weight={weight}",
                          "saliency.steps=2", "rollout.max_new_tokens=3")
        train(cfg, policy=tiny_policy(), task=TinyTask(saliency=True), problems=list(range(8)),
              eval_problems=list(range(8, 12)))
    source, x, acc, length = series(tmp_path / "atmanrl")
    assert source == "eval" and x == [0, 1, 2] and len(acc) == 3 and all(v == 3 for v in length)
    png = plot_runs([tmp_path / "baseline", tmp_path / "atmanrl"], tmp_path / "fig2.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("override", ["grpo.kl_beta=0.1", "grpo.ratio=sequence", "grpo.std_normalize=true"])
def test_loss_variants_run(tmp_path, override):
    """The optional KL term, the literal sequence-level ratio (Eq. 5) and std-normalised advantages train too."""
    cfg = tiny_config(tmp_path, "train.max_updates=3", override)
    result = train(cfg, policy=tiny_policy(), task=TinyTask(), problems=list(range(8)))
    assert all(math.isfinite(x) for r in result.metrics for x in r["losses"])
    if "kl_beta" in override:
        assert any(r.get("kl", 0) > 0 for r in result.metrics)  # the policy moved away from the reference


def test_built_run_schedule_and_rank_shares(tmp_path):
    """build_run's schedule, and each rank's contiguous share of an update's rollouts: concatenated over ranks it is
    the single-process batch for any world size, also with fewer problems than ranks (what makes 2 processes train
    like 1, tests/test_distributed.py)."""
    from atmanrl.rl.trainer import build_run

    cfg = tiny_config(tmp_path, "train.problems_per_update=4", "train.epochs=3")
    run = build_run(cfg, tiny_policy(), TinyTask(), list(range(10)))
    assert (run.per_epoch, run.total, run.start) == (2, 6, 0)  # 10 problems // 4 per update; the rest is dropped
    assert run.inference is run.policy  # no process group: nothing to shard, no copy
    assert run.my_rows == range(4 * 8)
    seen = []
    for update in range(run.total):
        epoch, batch = run.batch(update)
        assert epoch == update // 2 and len(batch) == 4
        seen.append(batch)
    for world in (2, 3, 4, 8):  # what run.my_rows is on each rank of a process group
        shares = [dist.share(32, rank, world) for rank in range(world)]
        assert [i for share in shares for i in share] == list(range(32))
        assert {len(share) for share in shares} <= {32 // world, 32 // world + 1}
    assert len(set(seen[0] + seen[1])) == 8  # an epoch draws each problem at most once
    assert seen[0] + seen[1] != seen[2] + seen[3]  # and each epoch has its own order


@pytest.mark.parametrize("kernel", ["auto", "sdpa"])
def test_model_attention_sets_the_policys_kernel(tmp_path, kernel):
    """model.attention reaches the policy the run trains and samples with (the way back to the SDPA reference should
    the fused kernel fail on some GPU); an unknown kernel is a config error naming the choices."""
    from atmanrl.config import ConfigError
    from atmanrl.rl.trainer import build_run

    run = build_run(tiny_config(tmp_path, f"model.attention={kernel}"), tiny_policy(), TinyTask(), list(range(8)))
    assert run.policy.attention == run.inference.attention == kernel
    with pytest.raises(ConfigError, match="model.attention"):
        tiny_config(tmp_path, "model.attention=fast")
