"""Issue 17's study: the scale-free saliency reward and reopen_one inside the trainer, the intervals and checks of
experiments/reproduce_toy.py's study parts, and one part end to end on the smoke model."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from tiny import TinyTask, tiny_config, tiny_policy

from atmanrl.rl import trainer as trainer_module
from atmanrl.rl.grpo import group_standardised_saliency
from atmanrl.rl.trainer import train

pytestmark = pytest.mark.usefixtures("single_process_one_thread")  # conftest.py
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import reproduce_toy  # noqa: E402

sys.path.pop(0)


def captured_update(monkeypatch, cfg) -> list:
    """Train one update and return its rollouts as the policy update saw them (total reward, advantage)."""
    seen = []
    real = trainer_module.policy_update

    def spy(run, rollouts):
        seen.extend(rollouts)
        return real(run, rollouts)

    monkeypatch.setattr(trainer_module, "policy_update", spy)
    train(cfg, policy=tiny_policy(), task=TinyTask(saliency=True), problems=list(range(8)))
    return seen


@pytest.mark.parametrize("normalize", ["none", "group"])
def test_trainer_combines_rewards_as_configured(tmp_path, monkeypatch, normalize):
    """The paper's R_outcome + w * R_saliency by default (exactly); with saliency.normalize: group the saliency
    term standardised inside each group first, so its within-group std is the weight."""
    w, G = 0.5, 8
    cfg = tiny_config(tmp_path, "train.max_updates=1", f"saliency.weight={w}", "saliency.steps=3",
                      "rollout.max_new_tokens=4", f"saliency.normalize={normalize}")
    rollouts = captured_update(monkeypatch, cfg)
    sal = torch.tensor([r.saliency_reward for r in rollouts], dtype=torch.float64).view(-1, G)
    outcome = torch.tensor([r.outcome for r in rollouts], dtype=torch.float64).view(-1, G)
    total = torch.tensor([r.total for r in rollouts], dtype=torch.float64).view(-1, G)
    assert sal.std(dim=1).min() > 0  # every group has a saliency spread, so the two forms differ
    if normalize == "none":
        assert torch.equal(total, outcome + w * sal)
    else:
        torch.testing.assert_close(total, outcome + w * group_standardised_saliency(sal), rtol=0, atol=1e-12)
        spread = (total - outcome).std(dim=1, unbiased=False)
        torch.testing.assert_close(spread, torch.full((len(total),), w, dtype=torch.float64))
    adv = torch.tensor([r.advantage for r in rollouts], dtype=torch.float64).view(-1, G)
    torch.testing.assert_close(adv, total - total.mean(dim=1, keepdim=True), rtol=0, atol=1e-12)


def test_trainer_uses_reopen_one_when_configured(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, "train.max_updates=1", "saliency.weight=1", "saliency.method=reopen_one",
                      "saliency.init=-5", "rollout.max_new_tokens=4")
    rollouts = captured_update(monkeypatch, cfg)
    results = [r.saliency_result for r in rollouts if r.saliency_result is not None]
    assert results and all(r.steps == 0 and r.loss_curve == [] for r in results)  # no mask was optimised
    for r in rollouts:
        if r.saliency_result is not None:
            assert r.saliency_reward == r.saliency_result.reward == pytest.approx(
                r.saliency_result.saliency.double().clamp(0, 1).mean().item(), abs=1e-6)


def test_interval_by_hand():
    iv = reproduce_toy.interval([1.0, 2.0, 3.0, math.nan])  # NaN dropped: n 3, mean 2, std 1, t(2) = 4.303
    assert (iv["n"], iv["mean"], iv["std"]) == (3, 2.0, 1.0)
    assert (iv["lo"], iv["hi"]) == pytest.approx((2 - 4.303 / math.sqrt(3), 2 + 4.303 / math.sqrt(3)))
    assert reproduce_toy.t95(4) == 2.776 and reproduce_toy.t95(11) == 2.228  # between entries: the wider one
    one = reproduce_toy.interval([5.0])
    assert one["n"] == 1 and math.isnan(one["lo"])


def test_verdicts_need_the_whole_interval_on_one_side():
    v = reproduce_toy.verdict
    assert v({"lo": -3.0, "hi": -0.5}, 0.0, "below") == "holds"
    assert v({"lo": -3.0, "hi": 0.5}, 0.0, "below") == "undecided"
    assert v({"lo": 0.1, "hi": 0.5}, 0.0, "below") == "fails"
    assert v({"lo": -1.9, "hi": 4.0}, -2.0, "above") == "holds"
    assert v({"lo": -2.1, "hi": 4.0}, -2.0, "above") == "undecided"
    assert v({"lo": -5.0, "hi": -2.5}, -2.0, "above") == "fails"
    assert v({"lo": math.nan, "hi": math.nan}, 0.0, "below") == "undecided"


def test_study_parts_differ_from_their_baseline_only_as_named():
    """Every comparison arm of a part is its part's w0 plus the overrides its name says, on the same warm start
    and lr (the protocol's fairness, checked on the arm definitions)."""
    assert reproduce_toy.study_arms("cost", 3e-5) == reproduce_toy.study_arms("headline", 3e-5) == []  # no training
    for part in set(reproduce_toy.STUDY) - {"cost", "headline"}:
        arms = reproduce_toy.study_arms(part, 3e-5)
        names = [a.name for a in arms]
        assert len(set(names)) == len(names), part
        if part == "lr":
            assert {a.overrides for a in arms} == {(f"train.lr={x}",) for x in reproduce_toy.LR_GRID}
            continue
        base = arms[0]
        assert base.name == "w0" and base.baseline is None and "train.lr=3e-05" in base.overrides
        for a in arms[1:]:
            assert a.baseline == "w0" and a.sft == base.sft and "train.lr=3e-05" in a.overrides
            assert f"saliency.weight={a.weight}" in a.overrides
    assert [a.weight for a in reproduce_toy.study_arms("dose", 1e-4)] == list(reproduce_toy.WEIGHTS)
    assert all("saliency.normalize=group" in a.overrides for a in reproduce_toy.study_arms("scalefree", 1e-4)[1:])
    assert {a.sft.seed for a in reproduce_toy.study_arms("warmstart2", 1e-4)} == {1}


def test_study_part_smoke(tmp_path):
    """Mechanics only (the smoke model, one update): a part runs every arm x seed, writes its JSON and report with
    intervals, reuses cached runs, and the reopen part measures its cost."""
    out = tmp_path / "toy"
    argv = ["--smoke", "--out", str(out), "--study", "reopen", "--study-seeds", "0,1", "--updates", "1",
            "--heldout", "4", "--k", "2"]
    assert reproduce_toy.main(argv) == 0
    result = json.loads((out / "study" / "reopen.json").read_text())
    assert set(result["arms"]) == {"w0", "reopen_w1", "reopen_w10"}
    for name, arm in result["arms"].items():
        assert arm["n"] == 2 and all(iv["n"] == 2 for iv in arm["metrics"].values())
        assert ("vs_baseline" in arm) == (name != "w0")
    assert [c[1] in ("holds", "fails", "undecided") for c in result["arms"]["reopen_w1"]["checks"]] == [True] * 4
    assert result["cost"]["reopen_one"]["seconds"] > 0 and result["cost"]["sequences"] > 0
    assert "Mean [95 % interval]" in (out / "study" / "reopen.md").read_text()
    assert (out / "study" / "reopen.png").is_file()
    runs = sorted((out / "study" / "runs").glob("*.json"))
    assert len(runs) == 6
    stamp = [p.stat().st_mtime_ns for p in runs]
    assert reproduce_toy.main([a if a != "reopen" else "eq3" for a in argv] + ["--study-arms", "eq3_w10"]) == 0
    assert set(json.loads((out / "study" / "eq3.json").read_text())["arms"]) == {"w0", "eq3_w10"}  # + its baseline
    assert [p.stat().st_mtime_ns for p in runs] == stamp  # the shared w0 runs were reused, not recomputed


def test_explain_shows_reopen_one_beside_the_mask_and_atman(tmp_path, capsys):
    """experiments/explain.py on the smoke-sized toy model: the terminal lists re-open-one's ranking after ATMAN's
    and the page carries the three panels; a non-negative --reopen-init is refused with a sentence."""
    from atmanrl.toy.sft import SFTSettings, sft_model_dir

    sys.path.insert(0, str(REPO / "experiments"))
    import explain  # noqa: E402

    sys.path.pop(0)
    model_dir = sft_model_dir(reproduce_toy._smoke_sft(SFTSettings()), tmp_path / "sft")
    from atmanrl.model import load

    _, tok = load(model_dir)
    tok.chat = lambda messages: [tok.bos_id, *tok.encode(messages[0]["content"])]  # the toy world has no template
    argv = ["--model", str(model_dir), "--question", "x = 7 , y = x * 3 . What is y ?", "--completion",
            "y = 7 * 3 = 21 . ##### 21", "--answer", "21", "--steps", "2", "--device", "cpu",
            "--out", str(tmp_path / "e.html")]
    import atmanrl.model

    real_load = atmanrl.model.load
    atmanrl.model.load = lambda *a, **k: (real_load(*a, **k)[0], tok)
    try:
        explain.main(argv)
    finally:
        atmanrl.model.load = real_load
    out = capsys.readouterr().out
    assert out.index("original ATMAN") < out.index("re-open one")
    page = (tmp_path / "e.html").read_text()
    assert "Original ATMAN" in page and "Re-open one" in page
    with pytest.raises(SystemExit):
        explain.main(argv + ["--reopen-init", "0"])
    assert "--reopen-init: 0 must be < 0" in capsys.readouterr().err


def test_headline_pairs_seeds_inside_each_warm_start_and_pools_them(tmp_path):
    """The headline part reads the parts' JSON: differences to w0 are paired within a warm start (by seed), and the
    pooled row holds every (warm start, seed) pair; an arm that ran on one warm start only is left out."""
    study = tmp_path / "study"
    study.mkdir()

    def runs(values):  # arm -> [padding of seed 0, seed 1, ...]; the other metrics 0
        return {"runs": {arm: [{"seed": s, "heldout": {m: (v if m == "padding_pct" else 0.0)
                                                       for m in reproduce_toy.STUDY_METRICS}}
                               for s, v in enumerate(vals)] for arm, vals in values.items()}}

    (study / "dose.json").write_text(json.dumps(runs({"w0": [20.0, 22.0, 24.0], "w10": [17.0, 20.0, 21.0],
                                                      "w3": [19.0, 21.0, 23.0]})))
    (study / "warmstart2.json").write_text(json.dumps(runs({"w0": [30.0, 31.0], "w10": [26.0, 29.0]})))
    args = type("Args", (), {"out": tmp_path})()
    out = reproduce_toy.headline(args)["arms"]
    assert set(out) == {"w10"}  # w3 ran on warm start 0 only
    assert out["w10"]["ws0"]["padding_pct"]["mean"] == pytest.approx(-8 / 3)  # (-3, -2, -3)
    assert out["w10"]["ws1"]["padding_pct"]["mean"] == pytest.approx(-3.0)  # (-4, -2)
    pooled = out["w10"]["pooled"]["padding_pct"]
    assert pooled["n"] == 5 and pooled["mean"] == pytest.approx(-14 / 5)
