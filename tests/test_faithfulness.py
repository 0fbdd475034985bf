"""Faithfulness tests (atmanrl.eval.faithfulness) on hand-made policies whose dependence on the CoT is known.

A word-level tokenizer (numbers 0-40, a few words, "#####", "...") and hand-made greedy policies swapped in for
``generate``: one answers 7 whatever it reads, one copies the last number before the delimiter. Then one
end-to-end run of all four tests through the real generator and saliency module on a tiny random Llama.
"""

import json
import random
import re

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from atmanrl.eval import faithfulness as F
from atmanrl.eval import truth
from atmanrl.model.generate import Completion
from atmanrl.model.tokenizer import Tokenizer
from atmanrl.tasks import Score, sampling

WORDS = ["<pad>", "<eos>", "<user>", "#####", "...", "x", "y", "z", "w", "=", "+", ".", "what", "is", "?", "so"]
WORDS += [str(n) for n in range(41)]


def word_tokenizer() -> Tokenizer:
    raw = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return Tokenizer(raw, eos="<eos>", pad="<pad>", template=None)


TOK = word_tokenizer()
# "x = 3 . y = 5 . z = 8 . w = 13": cuts at 1/4, 1/2, 3/4 of its 15 tokens end after 3, 5 and 8.
COT = TOK.encode("x = 3 . y = 5 . z = 8 . w = 13")
PROMPT = TOK.encode("<user> what is w ?")


def hand_made(answer_of):
    """A ``generate`` replacement: greedy continuation ``answer_of(prompt text)``, then the stop token."""

    def fake_generate(model, prompts, *, max_new_tokens, greedy=False, stop_ids=(), pad_id=0, **kw):
        assert greedy, "faithfulness answers greedily"
        out = []
        for p in prompts:
            tokens = TOK.encode(answer_of(TOK.decode(p)))[:max_new_tokens] + [TOK.eos_id]
            out.append(Completion(tokens, [0.0] * len(tokens), True))
        return out

    return fake_generate


def ignores_cot(text):
    return "7"


def copies_last_number(text):
    """The last number before the final delimiter (the question has none): "0" when there is none."""
    numbers = re.findall(r"\d+", text.rsplit("#####", 1)[0])
    return numbers[-1] if numbers else "0"


def test_early_answering_area_is_0_when_the_answer_ignores_the_cot(monkeypatch):
    monkeypatch.setattr(F, "generate", hand_made(ignores_cot))
    r = F.early_answering(None, TOK, [F.FaithInput(PROMPT, COT, "13")] * 3)
    assert r.answers[0] == ["7"] * 5 and r.curve == [1.0] * 5
    assert r.area == [0.0] * 3 and r.mean_area == 0.0 and r.samples == 3


def test_early_answering_area_is_1_when_the_answer_copies_the_cots_last_number(monkeypatch):
    monkeypatch.setattr(F, "generate", hand_made(copies_last_number))
    r = F.early_answering(None, TOK, [F.FaithInput(PROMPT, COT, "13")])
    assert r.answers[0] == ["0", "3", "5", "8", "13"]  # f = 0, 1/4, 1/2, 3/4, 1
    assert r.same[0] == [False, False, False, False, True]
    assert r.curve == [0.0, 0.0, 0.0, 0.0, 1.0] and r.mean_area == 1.0


def test_area_over_the_curve_is_the_step_function_area():
    assert F.area_over_curve([0, 0.25, 0.5, 0.75, 1], [0, 1, 1, 1, 1]) == 0.25  # needs only the first quarter
    assert F.area_over_curve([0, 0.5, 1], [0.5, 0.0, 1]) == 0.25 + 0.5
    with pytest.raises(ValueError, match="rise strictly from 0 to 1"):
        F.early_answering(None, TOK, [F.FaithInput(PROMPT, COT)], fractions=[0.5, 1])


def numbers(ids):
    return re.findall(r"\d+(?:\.\d+)?", TOK.decode(ids))


@pytest.mark.parametrize("seed", range(20))
def test_a_mistake_changes_exactly_one_number_in_the_first_half(seed):
    m = F.insert_mistake(TOK, COT, seed)
    before = numbers(COT)[: len(numbers(m.prefix))]
    after = numbers(m.prefix)
    assert len(after) == m.index + 1, "the CoT is cut right after the changed number"
    diffs = [k for k, (a, b) in enumerate(zip(before, after)) if a != b]
    assert diffs == [m.index] and after[m.index] == m.new and before[m.index] == m.old
    assert abs(int(m.new) - int(m.old)) <= 3 and int(m.new) >= 0
    assert m.index < 2, "numbers starting in the first half of 'x = 3 . y = 5 . z = 8 . w = 13' are 3 and 5"
    assert numbers(m.control) == numbers(COT)[: m.index + 1], "the control cut keeps the number"
    again = F.insert_mistake(TOK, COT, seed)
    assert (again.index, again.new, again.prefix) == (m.index, m.new, m.prefix), "seeded: the same mistake"


def test_mistakes_are_seeded_and_vary_with_the_seed():
    drawn = {(m.index, m.new) for m in (F.insert_mistake(TOK, COT, s) for s in range(20))}
    assert len(drawn) > 3
    assert F.insert_mistake(TOK, TOK.encode("x = y + z ."), 0) is None  # no number: no mistake


def test_adding_mistakes_detects_an_answer_that_reads_the_cot(monkeypatch):
    # The policy continues a CoT cut after "x = N" with ". w = N+10 #####" and answers the last number it read.
    def policy(text):
        if text.endswith("#####"):
            return copies_last_number(text)
        last = int(re.findall(r"\d+", text)[-1])
        return f". w = {last + 10} #####"

    monkeypatch.setattr(F, "generate", hand_made(policy))
    cot = TOK.encode("x = 3 . w = 13")
    r = F.adding_mistakes(None, TOK, [F.FaithInput(PROMPT, cot, "13")], seed=1)
    new = int(r.mistakes[0]["new"])
    assert r.reference == ["13"] and r.answers == [str(new + 10)] and r.changed == [True]
    assert r.control_answers == ["13"] and r.control_changed == [False] and r.rate == 1.0
    assert r.continuation[0].strip() == f". w = {new + 10}"


def test_filler_replacement_accuracy_against_real_and_no_cot(monkeypatch):
    monkeypatch.setattr(F, "generate", hand_made(copies_last_number))
    r = F.filler_replacement(None, TOK, [F.FaithInput(PROMPT, COT, "13"), F.FaithInput(PROMPT, COT, "12")])
    assert r.cot_accuracy == 0.5 and r.accuracy == 0.0 and r.no_cot_accuracy == 0.0
    assert r.answers == ["0", "0"] and r.samples == 2
    assert F.filler_cot(COT, TOK.encode("...")) == [TOK.token_id("...")] * len(COT)


def test_task_inputs_take_the_cot_before_the_delimiter(monkeypatch):
    """Any trainer Task (prompt / stop_ids / pad_id) gives the inputs: here a word-level one like the toy world's."""

    class Task:
        stop_ids, pad_id = [TOK.eos_id], 0

        def prompt(self, problem):
            return TOK.encode(f"<user> what is {problem.var} ?")

        def score(self, problem, prompt, completion):
            return Score(correct=False, has_answer=False, cot_tokens=len(completion))

    class Model:
        def eval(self):
            return self

    class Problem:
        def __init__(self, var, gold):
            self.var, self.gold = var, gold

    monkeypatch.setattr(sampling, "generate", lambda model, prompts, **kw: [
        Completion(TOK.encode(text) + [TOK.eos_id], [], True)
        for text in ["x = 3 . w = 13 ##### 13", "x = 4 .", "##### 2"]][: len(prompts)])
    layout = F.gsm8k_layout(TOK)
    got = F.task_inputs(Model(), TOK, Task(), [Problem("w", "13"), Problem("x", "4"), Problem("y", "2")], layout,
                        max_new_tokens=8)
    assert [TOK.decode(x.cot) for x in got] == ["x = 3 . w = 13", "x = 4 ."], "an empty CoT is skipped"
    assert [x.gold for x in got] == ["13", "4"] and got[0].prompt == TOK.encode("<user> what is w ?")
    with pytest.raises(ValueError, match="choose a filler from its vocabulary"):
        F.gsm8k_layout(TOK, filler="…")


def test_inputs_from_evaluation_samples_take_one_cot_per_problem():
    samples = [
        {"problem": 0, "cot": "x = 3 . ", "answer": None, "gold": "3"},
        {"problem": 0, "cot": "x = 4 . ", "answer": " 4", "gold": "3"},  # wrote the delimiter: preferred
        {"problem": 1, "cot": "  ", "answer": None, "gold": "5"},  # empty CoT: skipped
        {"problem": 2, "cot": "w = 13", "answer": None, "gold": "13"},
    ]
    got = F.inputs_from_samples(TOK, samples, lambda s: PROMPT)
    assert [(TOK.decode(x.cot), x.gold) for x in got] == [("x = 4 .", "3"), ("w = 13", "13")]
    assert all(x.prompt == PROMPT for x in got)


def test_auroc_by_hand():
    assert truth.auroc([0.9, 0.1, 0.2], [True, False, False]) == 1.0
    assert truth.auroc([0.1, 0.9, 0.2], [True, False, False]) == 0.0
    assert truth.auroc([0.5, 0.5, 0.1, 0.7], [True, False, False, True]) == (1 + 0.5 + 1 + 1) / 4
    assert truth.auroc([0.5, 0.1], [True, True]) is None


def tiny_llama():
    from atmanrl.model.llama import Llama, LlamaConfig

    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rope_scaling=None, max_position_embeddings=128,
                      tie_word_embeddings=True)
    return Llama(cfg).init_weights(std=0.3, generator=torch.Generator().manual_seed(0)).eval()


def test_all_four_tests_run_end_to_end_on_a_tiny_llama():
    """The real generator and saliency module: shapes, statuses, and a JSON-serialisable record."""
    from atmanrl.saliency import SaliencyConfig

    torch.set_num_threads(1)
    rng = random.Random(0)
    inputs = [F.FaithInput(PROMPT, TOK.encode(f"x = {rng.randint(0, 20)} . w = {rng.randint(0, 20)}"), "13")
              for _ in range(3)]
    # A random model writes no number reliably: its answer is its first word (a task-specific layout).
    layout = F.AnswerLayout.of(TOK, delimiter="#####", read_answer=lambda text: (text.split() or [None])[0])
    r = F.faithfulness(tiny_llama(), TOK, inputs, layout=layout, max_new_tokens=6,
                       saliency_config=SaliencyConfig.compressed(4))
    assert len(r.early.answers) == 3 and all(len(a) == 5 for a in r.early.answers)
    assert r.early.samples == 3 and r.agreement.numbers == [2, 2, 2]
    assert r.agreement.status == ["ok"] * 3
    assert [len(s) for s in r.agreement.saliency] == [len(x.cot) for x in inputs]
    for flipped, x in zip(r.agreement.flipped, inputs):
        assert set(flipped) <= {2, 6}, "only the number tokens can flip the answer"
    assert set(r.summary) >= {key for key, _, _ in F.SUMMARY_COLUMNS}
    json.dumps(r.to_dict())
    table = F.faithfulness_markdown([("a", r.summary), ("b", r.summary)], baseline="a")
    assert table.splitlines()[3].startswith("| b | ") and "f = 0.25" in table
