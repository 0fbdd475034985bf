"""The toy world: generator labels, tokenizer, intervention labelling, AUROC, and the reproduction pipeline's smoke.

The planted truth has to be right before anything is scored against it: the generator's labels are checked
against the answer a CoT implies, the intervention labelling against a hand-built model whose answer is known to
copy one token, and AUROC against a case counted by hand.
"""

import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch

from atmanrl.tasks import toyworld as tw
from atmanrl.toy import truth

REPO = Path(__file__).resolve().parents[1]


def _styled_cots(n=60, seed=0):
    rng = random.Random(seed)
    for p in tw.toy_problems(n, seed):
        for style in tw.STYLES:
            words, labels = tw.gold_cot(p, style, rng)
            yield p, style, words, labels


def test_gold_cots_are_correct_and_labels_match_the_grammar():
    for p, style, words, labels in _styled_cots():
        assert tw.implied_answer(p, words) == int(p.gold)
        assert tw.step_coverage(p, words) == 1.0
        assert tw.label_cot(p, words) == labels
        assert labels.count("step") == 8 * len(p.steps)
        assert ("filler" in labels) == (style == "filler")
        assert ("distractor" in labels) == (style == "distractor")
        assert all(0 <= int(w) <= tw.MAX_VALUE for w in words if w.isdigit())


def test_filler_and_distractor_tokens_never_change_the_answer_a_step_result_does():
    # Interventions as the truth labelling makes them: a number becomes another number, a word another word; the
    # sentence-ending "." stays (removing it would merge two sentences into one that is no equation at all).
    numbers = [str(v) for v in range(tw.MAX_VALUE + 1)]
    filler_words = sorted({w for f in tw.FILLERS for w in f.split()} - {"."})
    rng = random.Random(1)
    for p, _, words, labels in _styled_cots():
        gold = int(p.gold)
        for i, lab in enumerate(labels):
            if lab in ("filler", "distractor") and words[i] != ".":
                pool = numbers if words[i].isdigit() else filler_words
                for new in rng.sample(pool, 4):
                    altered = words[:i] + [new] + words[i + 1:]
                    assert tw.implied_answer(p, altered) == gold, (words, i, new)
        result = max(i for i, lab in enumerate(labels) if lab == "step") - 1  # the asked step's written result
        assert words[result] == p.gold
        for delta in (1, 2, 3):
            value = (gold + delta) % (tw.MAX_VALUE + 1)
            assert tw.implied_answer(p, words[:result] + [str(value)] + words[result + 1:]) == value


def test_problems_are_seeded_distinct_and_the_splits_disjoint():
    train, test = tw.toy_problems(300, 0), tw.toy_problems(100, 0, "test")
    assert [p.question for p in train] == [p.question for p in tw.toy_problems(300, 0)]
    assert len({p.question for p in train}) == 300
    assert not {p.question for p in train} & {p.question for p in tw.toy_problems(100, 5, "test")}
    assert all(tw.is_held_out(p) for p in test) and not any(tw.is_held_out(p) for p in train)
    with pytest.raises(ValueError, match="split"):
        tw.toy_problems(1, 0, "valid")


def test_tokenizer_round_trip_and_a_saved_model_directory_loads(tmp_path):
    from atmanrl.model import load, save_hf
    from atmanrl.model.llama import Llama
    from atmanrl.toy.sft import SFTSettings, model_config

    tok = tw.build_tokenizer()
    for p, _, words, _ in _styled_cots(20):
        text = tw.completion_text(words, p.gold)
        ids = tok.encode(text)
        assert len(ids) == len(text.split())  # one token per word
        assert tok.token_id(tw.UNK) not in ids
        assert tok.decode(ids) == text
        assert tok.decode(tok.encode(p.question)) == p.question
    assert tok.stop_ids == [tok.token_id(tw.EOS)] and tok.pad_id == tok.token_id(tw.PAD)

    model = Llama(model_config(SFTSettings(hidden_size=16, layers=1, heads=2, intermediate_size=16),
                               tok.vocab_size)).init_weights(generator=torch.Generator().manual_seed(0))
    save_hf(model, tmp_path)
    tok.save(tmp_path)
    loaded, tok2 = load(tmp_path)
    text = "y = 7 * 3 = 21 . let me think about this . ##### 21 </s>"
    assert tok2.encode(text) == tok.encode(text) and tok2.decode(tok2.encode(text)) == text
    assert tok2.stop_ids == tok.stop_ids and tok2.pad_id == tok.pad_id and tok2.bos_id == tok.bos_id
    x = torch.tensor([tok.encode(text)])
    torch.testing.assert_close(loaded(x), model(x))


def test_task_scores_and_builds_the_saliency_input_like_gsm8k():
    tok = tw.build_tokenizer()
    task = tw.ToyTask(tok)
    p = tw.toy_problems(1, 3)[0]
    prompt = task.prompt(p)
    words, _ = tw.gold_cot(p, "filler", random.Random(0))
    completion = tok.encode(tw.completion_text(words, p.gold))
    score = task.score(p, prompt, completion)
    assert score.correct and score.has_answer and score.cot_tokens == len(words)
    x = score.saliency_input
    assert list(x.tokens) == prompt + tok.encode(" ".join(words)) + [task.delim_id] + tok.encode(p.gold)
    assert x.cot == (len(prompt), len(prompt) + len(words)) and x.n_answer == 1
    wrong = tok.encode(tw.completion_text(words, str((int(p.gold) + 1) % 100)))
    assert not task.score(p, prompt, wrong).correct
    cut = task.score(p, prompt, tok.encode(" ".join(words)))  # no "#####": no answer, no mask
    assert not cut.has_answer and cut.saliency_input is None and cut.cot_tokens == len(words)


class CopyModel(torch.nn.Module):
    """A hand-built "model" whose next-token prediction at every position is the token at position ``k``."""

    def __init__(self, vocab: int, k: int):
        super().__init__()
        self.vocab, self.k = vocab, k

    def forward(self, tokens, attn_bias=None, *, logits_at=None, **_):
        logits = torch.nn.functional.one_hot(tokens[:, self.k], self.vocab).float()[:, None, :]
        n = tokens.shape[1] if logits_at is None else logits_at.shape[-1]
        return logits.expand(-1, n, -1)


def test_intervention_labels_exactly_the_token_the_answer_copies():
    tok = tw.build_tokenizer()
    task = tw.ToyTask(tok)
    p = tw.toy_problems(1, 0)[0]
    words, _ = tw.gold_cot(p, "distractor", random.Random(2))
    prompt, cot = task.prompt(p), tok.encode(" ".join(words))
    alter = truth.number_alterations(tok)
    numbers = [i for i, w in enumerate(words) if w.isdigit()]
    for j in (numbers[0], numbers[-1], numbers[len(numbers) // 2]):
        model = CopyModel(tok.vocab_size, len(prompt) + j)
        carrying, share, answer = truth.answer_carrying(model, prompt, cot, task.delim_id, alter)
        assert answer == cot[j]
        assert carrying == [i == j for i in range(len(cot))]
        assert share[j] == 1.0 and sum(share) == 1.0
    # the answer copies a word (not alterable): no CoT token carries it
    word = next(i for i, w in enumerate(words) if not w.isdigit())
    carrying, _, _ = truth.answer_carrying(CopyModel(tok.vocab_size, len(prompt) + word), prompt, cot,
                                           task.delim_id, alter)
    assert not any(carrying)
    assert alter(tok.token_id("0")) == [tok.token_id(str(v)) for v in (1, 2, 3)]
    assert alter(tok.token_id("=")) == []


def test_auroc_on_a_hand_counted_case():
    # positives 0.9 and 0.3 against negatives 0.8 and 0.1: wins 0.9>0.8, 0.9>0.1, 0.3>0.1; loss 0.3<0.8 -> 3/4
    assert truth.auroc([0.9, 0.8, 0.3, 0.1], [True, False, True, False]) == 0.75
    assert truth.auroc([0.5, 0.5, 0.2], [True, False, False]) == 0.75  # a tie counts one half
    assert truth.auroc([3, 2, 1], [True, False, False]) == 1.0
    assert truth.auroc([1, 2, 3], [True, False, False]) == 0.0
    assert math.isnan(truth.auroc([1, 2], [False, False]))


def test_toy_arm_configs_differ_only_in_the_saliency_reward():
    from atmanrl.config import load_config, to_dict

    configs = REPO / "experiments" / "configs"
    arms = {arm: to_dict(load_config(configs / f"toy_{arm}.yaml")) for arm in ("baseline", "atmanrl", "eq3")}
    assert arms["baseline"]["saliency"]["weight"] == 0 and arms["atmanrl"]["saliency"]["weight"] == 1
    assert arms["eq3"]["saliency"]["reward"] == "eq3" and arms["atmanrl"]["saliency"]["reward"] == "reenable"
    for cfg in arms.values():
        cfg["saliency"] = cfg["out_dir"] = None
    assert arms["baseline"] == arms["atmanrl"] == arms["eq3"]
    for arm in ("atmanrl", "eq3"):  # the weight-10 arms differ from their weight-1 arm only in the weight
        w1, w10 = (to_dict(load_config(configs / f"toy_{name}.yaml")) for name in (arm, f"{arm}_w10"))
        assert w10["saliency"].pop("weight") == 10 and w1["saliency"].pop("weight") == 1
        assert {**w1, "out_dir": None} == {**w10, "out_dir": None}
    default = load_config(configs / "cpu_default.yaml")  # the README's main job: the toy AtManRL arm
    assert default.data.task == "toyworld" and default.model.name_or_path == "toyworld-sft"
    assert default.saliency.weight == 1.0
    assert load_config(configs / "cpu_smollm2.yaml").data.task == "gsm8k"  # the former default, kept


def test_reproduction_pipeline_smoke(tmp_path):
    """Mechanics only (a model of a few thousand parameters, two updates per run): files written, every arm ran,
    numbers finite."""
    sys.path.insert(0, str(REPO / "experiments"))
    try:
        import reproduce_toy
    finally:
        sys.path.pop(0)
    out = tmp_path / "toy"
    assert reproduce_toy.main(["--smoke", "--out", str(out), "--seeds", "2", "--updates", "2", "--heldout", "4",
                               "--k", "2", "--truth-problems", "6", "--truth-cots", "3", "--gap-problems", "2"]) == 0
    for name in ("report.md", "results.json", "figure2.png", "side_by_side.html"):
        assert (out / name).is_file(), name
    assert "side_by_side.html" in (out / "report.md").read_text()
    results = json.loads((out / "results.json").read_text())
    assert set(results["arms"]) == set(reproduce_toy.ARMS)
    for run in results["runs"].values():
        assert run["updates"] == 2
        assert (Path(run["dir"]) / "metrics.jsonl").read_text().count("\n") == 2
        assert all(math.isfinite(v) for v in run["heldout"].values())
    assert all(math.isfinite(v) for g in results["truth"]["reward_gap"].values() for v in g.values())
    assert results["truth"]["per_seed"]["0"]["cots"] == 3
    # the option is selected on CoT set 0 and reported on set 1, beside the best mask-optimising candidate
    truth, sel = results["truth"], results["truth"]["selection"]
    assert truth["reported_on_seeds"] == [1]
    assert {f"{sel['setting']}/{sel['readout']}", "/".join(sel["best_mask_setting"])} <= set(truth["reported"])
    assert {n for n, _, _ in sel["ranking"]} >= set(reproduce_toy.REOPEN)
    report = (out / "report.md").read_text()
    assert "## Saliency against planted truth" in report and "| atmanrl |" in report


def test_readouts_on_a_hand_made_mask():
    from types import SimpleNamespace

    from atmanrl.saliency import SaliencyInput

    # prompt 2 tokens, CoT 3 tokens, delimiter, answer: mask rows are the queries from the CoT start (5 rows)
    x = SaliencyInput.from_parts([1, 2], [5, 6, 7], [4], [9])
    h_hat = torch.tensor([[0.5, 0.0, 0.0], [0.9, 0.2, 0.0], [1.0, 1.0, 0.7], [0.8, 1.0, 0.4], [1.0, 1.0, 1.0]])
    res = SimpleNamespace(mask=h_hat, saliency=torch.tensor([0.1, 0.2, 0.3]))
    assert truth.readout(res, x, "all_rows") is res.saliency  # Eq. 3: what saliency() computed
    row = x.answer[0] - 1 - x.cot[0]  # the "#####" query, row 3
    assert row == 3
    torch.testing.assert_close(truth.readout(res, x, "answer_row"), torch.tensor([0.2, 0.0, 0.6]))
    torch.testing.assert_close(truth.readout(res, x, "max_row"), torch.tensor([0.5, 0.8, 0.6]))
    evidence = torch.tensor([[1.0, 0.0, 0.0], [2.0, -1.0, 0.0], [0.0, 0.5, 3.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    torch.testing.assert_close(truth.readout(res, x, "gradient", evidence), torch.tensor([4.0, 0.5, 4.0]))
    with pytest.raises(ValueError, match="read-out"):
        truth.readout(res, x, "rows")
