"""The toy world: arithmetic chains whose answer depends on a known subset of the chain-of-thought tokens.

A problem is a chain of 2-3 steps on whole numbers, ``x = 7 , y = x * 3 , z = y - 4 . What is z ?``. Its gold CoT
writes every step with its operands filled in, ``y = 7 * 3 = 21 . z = 21 - 4 = 17 .``, then ``##### 17``. Three
CoT *styles* reach the same answer:

- ``dense``: the steps only;
- ``filler``: the steps with 1-3 English, stop-word-heavy sentences ("let me think about this .") put in at random
  sentence boundaries;
- ``distractor``: the steps with 1-2 equations on variables the question never asks about (``q = 4 + 5 = 9 .``),
  whose values are never used.

What is notable here:
- **Grammar labels** (``label_cot``): every CoT token is ``step`` (a sentence that computes a question variable),
  ``filler``, ``distractor`` or ``other`` (anything else the model writes). They are what the generator planted,
  and what the Table-1-style shares (filler %, distractor %) and the needed-step coverage count.
- **Grammar is not truth.** Which tokens the *model* reads its answer from is measured, not assumed: altering a
  CoT number under teacher forcing and watching the greedy answer (``atmanrl.toy.truth.answer_carrying``).
- **Word-level vocabulary**, one token per number 0..99, built with ``tokenizers`` and saved as
  ``tokenizer.json`` + ``tokenizer_config.json``, so a toy model directory loads with ``atmanrl.model.load`` like
  any other. Text is words separated by single spaces; ``decode(encode(text)) == text``.
- **Held-out split by content**: a problem belongs to the test split when a hash of its question says so, so the
  training and held-out problems never share a question whatever their seeds.
- ``ToyTask`` follows the trainer's ``Task`` protocol: the prompt is ``<s>`` + the question, a completion is
  CoT + ``#####`` + answer + ``</s>``, and ``score`` builds the ``SaliencyInput`` as ``GSM8KTask`` does
  (prompt + the model's own CoT + ``#####`` + the GOLD answer).

Why the task is this hard (the "make outcomes vary" choice, stated rather than tuned silently): operands are
sampled so that every value stays in 0..99 and multiplications (by 2-5) reach two-digit products. A word-level model
must then memorise a table of sums and products instead of copying digits, which a model of a few hundred
thousand parameters only partly does in a few minutes of training -- so sampled accuracy lands below 100 % and
GRPO groups carry outcome variance. The measured accuracy is in ``docs/toyworld.md``.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from tokenizers import AddedToken, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from atmanrl.model.tokenizer import Tokenizer
from atmanrl.saliency import SaliencyInput
from atmanrl.tasks.base import Score
from atmanrl.tasks.gsm8k import DELIMITER

MAX_VALUE = 99
STEP_VARS = ("y", "z", "w")  # the question's variables after x, in order
DISTRACTOR_VARS = ("p", "q", "r")
OPS = ("+", "-", "*")
FILLERS = (
    "let me think about this .",
    "i will do this step by step .",
    "this is not very hard .",
    "now i know what to do .",
    "that is all there is to it .",
    "we can do it one step at a time .",
)
STYLES = ("dense", "filler", "distractor")
LABELS = ("step", "filler", "distractor", "other")
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"


# ---------------------------------------------------------------------------------------------------------------
# Problems and CoTs
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    var: str  # the variable this step defines
    src: str  # the variable it reads
    op: str
    operand: int
    a: int  # the value of ``src``
    result: int

    def words(self) -> list[str]:
        return [self.var, "=", str(self.a), self.op, str(self.operand), "=", str(self.result), "."]


@dataclass(frozen=True)
class Problem:
    """One chain. ``question`` and ``gold`` as GSM8K's ``Problem`` has them, so the evaluation code reads both."""

    start: int
    steps: tuple[Step, ...]
    question: str = field(init=False)
    gold: str = field(init=False)

    def __post_init__(self):
        defs = [f"x = {self.start}"] + [f"{s.var} = {s.src} {s.op} {s.operand}" for s in self.steps]
        object.__setattr__(self, "question", " , ".join(defs) + f" . What is {self.steps[-1].var} ?")
        object.__setattr__(self, "gold", str(self.steps[-1].result))

    @property
    def asked(self) -> str:
        return self.steps[-1].var


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _random_step(rng: random.Random, a: int) -> tuple[str, int]:
    """An operator and operand that keep the result in 0..MAX_VALUE."""
    choices = [("+", b) for b in range(1, 10) if a + b <= MAX_VALUE]
    choices += [("-", b) for b in range(1, 10) if a - b >= 0]
    choices += [("*", b) for b in range(2, 6) if a * b <= MAX_VALUE]
    # equal weight per operator (there are fewer multiplications that stay in range)
    op = rng.choice(sorted({op for op, _ in choices}))
    return op, rng.choice([b for o, b in choices if o == op])


def random_problem(rng: random.Random) -> Problem:
    start = rng.randint(2, 30)
    steps, a, src = [], start, "x"
    for var in STEP_VARS[: rng.choice((2, 3))]:
        op, b = _random_step(rng, a)
        result = _apply(a, op, b)
        steps.append(Step(var, src, op, b, a, result))
        a, src = result, var
    return Problem(start, tuple(steps))


def is_held_out(problem: Problem) -> bool:
    """The test split: one question in five, chosen by a hash of its text (independent of any seed)."""
    return hashlib.sha256(problem.question.encode()).digest()[0] % 5 == 0


def toy_problems(n: int, seed: int, split: str = "train") -> list[Problem]:
    """``n`` distinct seeded problems of ``split`` ("train" or "test"; the two never share a question)."""
    if split not in ("train", "test"):
        raise ValueError(f"toy world split must be 'train' or 'test', got {split!r}")
    rng, seen, out = random.Random(f"toyworld/{split}/{seed}"), set(), []
    for _ in range(200 * n + 1000):
        if len(out) == n:
            return out
        p = random_problem(rng)
        if is_held_out(p) == (split == "test") and p.question not in seen:
            seen.add(p.question)
            out.append(p)
    raise ValueError(f"could not draw {n} distinct {split} problems of the toy world; ask for fewer")


def distractor_words(rng: random.Random, var: str) -> list[str]:
    a = rng.randint(0, 30)
    op, b = _random_step(rng, a)
    return [var, "=", str(a), op, str(b), "=", str(_apply(a, op, b)), "."]


def gold_cot(problem: Problem, style: str, rng: random.Random) -> tuple[list[str], list[str]]:
    """A correct CoT of ``style`` as words, with the grammar label of every word (see ``label_cot``)."""
    if style not in STYLES:
        raise ValueError(f"CoT style must be one of {STYLES}, got {style!r}")
    sentences = [(s.words(), "step") for s in problem.steps]
    if style == "filler":
        extra = [(rng.choice(FILLERS).split(), "filler") for _ in range(rng.randint(1, 3))]
    elif style == "distractor":
        names = rng.sample(DISTRACTOR_VARS, rng.randint(1, 2))
        extra = [(distractor_words(rng, v), "distractor") for v in names]
    else:
        extra = []
    for sentence in extra:  # at a random sentence boundary (before, between or after the steps)
        sentences.insert(rng.randint(0, len(sentences)), sentence)
    words = [w for s, _ in sentences for w in s]
    labels = [lab for s, lab in sentences for _ in s]
    return words, labels


def completion_text(cot_words: list[str], answer: str) -> str:
    return " ".join([*cot_words, DELIMITER, answer, EOS])


# ---------------------------------------------------------------------------------------------------------------
# Reading a CoT: grammar labels, the answer it implies, needed-step coverage
# ---------------------------------------------------------------------------------------------------------------


def _sentences(words: list[str]) -> list[tuple[int, int]]:
    """Half-open word spans of the sentences (each ends with "."; an unfinished tail is a sentence too)."""
    spans, start = [], 0
    for i, w in enumerate(words):
        if w == ".":
            spans.append((start, i + 1))
            start = i + 1
    if start < len(words):
        spans.append((start, len(words)))
    return spans


def _equation(words: list[str]) -> tuple[str, int] | None:
    """``v = a op b = r .`` -> (v, r); None when the sentence is not such an equation."""
    if len(words) != 8 or words[1] != "=" or words[3] not in OPS or words[5] != "=" or words[7] != ".":
        return None
    if not all(w.isdigit() for w in (words[2], words[4], words[6])):
        return None
    return words[0], int(words[6])


def label_cot(problem: Problem, words: list[str]) -> list[str]:
    """The grammar label of every CoT word: ``step`` (an equation defining one of the question's variables),
    ``distractor`` (an equation defining a variable the question does not have), ``filler`` (one of the filler
    sentences) or ``other``."""
    labels = []
    question_vars = {s.var for s in problem.steps}
    for a, b in _sentences(words):
        sentence = words[a:b]
        eq = _equation(sentence)
        if " ".join(sentence) in FILLERS:
            lab = "filler"
        elif eq is not None and eq[0] in question_vars:
            lab = "step"
        elif eq is not None and eq[0] in DISTRACTOR_VARS:
            lab = "distractor"
        else:
            lab = "other"
        labels += [lab] * (b - a)
    return labels


def implied_answer(problem: Problem, words: list[str]) -> int | None:
    """The answer a reader takes from the CoT: the written result of the last equation defining the asked
    variable (None if there is none). Filler and distractor sentences cannot change it; the asked step's result
    does -- the planted dependency the generator guarantees (tests/test_toyworld.py)."""
    value = None
    for a, b in _sentences(words):
        eq = _equation(words[a:b])
        if eq is not None and eq[0] == problem.asked:
            value = eq[1]
    return value


def step_coverage(problem: Problem, words: list[str]) -> float:
    """Share of the problem's steps that the CoT writes correctly (``v = a op b = r .`` with the true numbers)."""
    written = {" ".join(words[a:b]) for a, b in _sentences(words)}
    return sum(" ".join(s.words()) in written for s in problem.steps) / len(problem.steps)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer and task
# ---------------------------------------------------------------------------------------------------------------


def vocabulary() -> list[str]:
    words = [PAD, BOS, EOS, UNK, DELIMITER, "x", *STEP_VARS, *DISTRACTOR_VARS, *OPS, "=", ".", ",", "?", "What", "is"]
    words += [str(i) for i in range(MAX_VALUE + 1)]
    for sentence in FILLERS:
        words += [w for w in sentence.split() if w not in words]
    return list(dict.fromkeys(words))


def build_tokenizer():
    """The word-level tokenizer of the toy world (``atmanrl.model.Tokenizer``): whitespace split, one id per word;
    without a decoder, ``tokenizers`` joins decoded words with single spaces."""
    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (PAD, BOS, EOS, UNK)])
    return Tokenizer(tok, bos=BOS, eos=EOS, pad=PAD, template=None, source="<toyworld>")


class ToyTask:
    """The toy world for the trainer (``atmanrl.tasks.Task``): prompt, judgement, saliency input."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.stop_ids = list(tokenizer.stop_ids)
        self.pad_id = tokenizer.pad_id
        self.delim_id = tokenizer.token_id(DELIMITER)

    def prompt(self, problem: Problem) -> list[int]:
        return [self.tokenizer.bos_id, *self.tokenizer.encode(problem.question)]

    def split(self, completion: list[int]) -> tuple[list[int], list[int] | None]:
        """(CoT ids, answer ids or None when no ``#####`` was written); stop tokens belong to neither."""
        ids = [t for t in completion if t not in self.stop_ids]
        if self.delim_id not in ids:
            return ids, None
        d = ids.index(self.delim_id)
        return ids[:d], ids[d + 1:]

    def words(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.tokenizer.id_to_token(i) for i in ids]

    def score(self, problem: Problem, prompt: list[int], completion: list[int]) -> Score:
        cot, answer = self.split(completion)
        cot_text = " ".join(self.words(cot))
        if answer is None:  # no "#####": no answer and no CoT/answer boundary (atmanrl.tasks.base)
            return Score(correct=False, has_answer=False, cot_tokens=len(cot), cot=cot_text)
        correct = self.words(answer) == [problem.gold]
        gold = self.tokenizer.encode(problem.gold)
        return Score(correct=correct, has_answer=True, cot_tokens=len(cot),
                     saliency_input=SaliencyInput.from_parts(prompt, cot, [self.delim_id], gold), cot=cot_text,
                     answer=" ".join(self.words(answer)))
