"""GSM8K: reading problems, the prompt, reading answers back (as text and as token positions), and the ``Task``.

What is notable here:
- **The delimiter.** The paper prompts for a chain of thought followed by ``#####`` and the final answer; the CoT
  is everything the model wrote before the first ``#####``, the answer everything after it (``split_completion``).
  GSM8K's own gold solutions end with ``####`` (four); only the reader of the data files uses that one.
- **Strict answers** (``extract_number`` / ``is_correct``). Numbers are compared as numbers (``Decimal``), so
  ``$1,234.50``, ``1234.5``, ``18.`` and ``18 dollars`` all read right. An answer counts only if it holds exactly
  one distinct number: an empty answer, ``18 or 19``, ``18-20``, a malformed number such as ``1,23`` or a list of
  guesses is never correct, so a policy cannot game the outcome reward by writing many numbers.
- **Token positions** (``split_tokens``). The saliency mask needs the exact completion positions of the CoT. A
  byte-level BPE may merge ``#####`` with neighbouring characters (``".\\n#####"``), so positions come from each
  token's bytes: the delimiter span is every token overlapping the ``#####`` characters, the CoT every token
  entirely before it, the answer every token after it up to the trailing special tokens (end of turn).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from pathlib import Path

from atmanrl.saliency import SaliencyInput
from atmanrl.tasks.base import Score

DELIMITER = "#####"

# No worked example in the instruction: small models copy an example's number as their answer.
INSTRUCTION = (
    "Solve the following math problem. Reason step by step, then write ##### followed by the final answer as a "
    "single number."
)


@dataclass
class Problem:
    question: str
    answer_text: str  # the worked solution, GSM8K format: steps with <<a*b=c>> annotations, then "#### N"
    gold: str  # the final number as plain digits (GSM8K's thousands separators removed), e.g. "1450000"


# ---------------------------------------------------------------------------------------------------------------
# Reading GSM8K
# ---------------------------------------------------------------------------------------------------------------


def gold_from_solution(answer_text: str) -> str:
    """The number after GSM8K's ``####``, as plain digits. Raises ValueError when there is none."""
    if "####" not in answer_text:
        raise ValueError("the solution has no '#### <number>' line")
    number = extract_number(answer_text.rsplit("####", 1)[1])
    if number is None:
        raise ValueError(f"the text after '####' is not one number: {answer_text.rsplit('####', 1)[1].strip()!r}")
    return format_number(number)


def read_gsm8k(path: str | Path) -> list[Problem]:
    """Read a GSM8K jsonl file: one ``{"question": ..., "answer": ...}`` object per line (blank lines ignored)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give the GSM8K jsonl file inside it (e.g. {path}/test.jsonl)")
    if not path.is_file():
        raise FileNotFoundError(f"GSM8K file not found: {path} (expected a jsonl file such as test.jsonl)")
    problems = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: byte {e.start + 1} of the line (0x{raw[e.start]:02x}) is not UTF-8 "
                                 "text; GSM8K files are UTF-8: convert the file (e.g. iconv -t UTF-8)") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object") from None
            if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not isinstance(
                row.get("answer"), str
            ):
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise ValueError(f"{where}: expected an object with string keys 'question' and 'answer', got {keys}")
            try:
                gold = gold_from_solution(row["answer"])
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            problems.append(Problem(row["question"], row["answer"], gold))
    return problems


def draw_problems(problems: list[Problem], n: int, seed: int) -> list[Problem]:
    """``n`` problems drawn without replacement with a fixed seed (the paper: 500 GSM8K test problems). The
    evaluation script and the trainer's held-out evaluation both draw with this, so one seed means one set."""
    if n > len(problems):
        raise ValueError(f"cannot draw {n} problems from {len(problems)}; ask for at most {len(problems)}")
    return [problems[i] for i in random.Random(seed).sample(range(len(problems)), n)]


def build_prompt(tokenizer, question: str) -> list[int]:
    """Chat-template token ids of the instruction and the question, ending with the assistant's turn header."""
    return tokenizer.chat([{"role": "user", "content": f"{INSTRUCTION}\n\n{question}"}], add_generation_prompt=True)


# ---------------------------------------------------------------------------------------------------------------
# Answers as text
# ---------------------------------------------------------------------------------------------------------------

# A numeric run: optional sign (not right after a word character, so "5-3" is two numbers), optional "$", then
# digits with any commas/periods inside, an optional exponent ("1e5", "1.5E-3") and any letters glued to it.
# Whether the run is a well-formed number is decided afterwards, so that a malformed "1,23" makes the answer
# unreadable instead of being read as "1" and "23" or as 1; glued letters ("0x10", "3x4", "5k") make it unreadable
# too, instead of being read as the digits before them.
_RUN = re.compile(r"(?<![\w.])(?P<sign>[-+\u2212])?\$?(?P<run>[\d.,]*\d[\d.,]*)(?:[eE](?P<exp>[-+]?\d+)\b)?"
                  r"(?P<glued>[^\W\d]\w*)?")
_ORDINAL = ("st", "nd", "rd", "th")  # "18th" is 18
_MAX_EXPONENT = 30  # "1e5" is 100000; "1e999999999" would be a billion digits: refused, like any unreadable number
_WELL_FORMED = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+")


def split_completion(text: str) -> tuple[str, str | None]:
    """(CoT, answer) at the first ``#####``; answer is None when there is no delimiter."""
    cot, sep, answer = text.partition(DELIMITER)
    return (cot, answer) if sep else (text, None)


def extract_number(text: str | None) -> Decimal | None:
    """The one number in ``text`` (``Decimal``), or None if it holds no number, several different ones, or a
    malformed one. Repeats of the same value are fine (``18 = 18.0``); ``$``, thousands separators, a trailing
    sentence period, units after a space and leading ``#`` characters are ignored. Scientific notation is read
    (``1e5`` = 100000, ``1.5e3`` = 1500); a number with letters glued to it (``0x10``, ``3x4``, ``5k``) is
    malformed, never read as the digits before the letters (ordinals such as ``18th`` excepted)."""
    if text is None:
        return None
    values = set()
    for m in _RUN.finditer(text):
        run = m["run"] if m["exp"] else m["run"].rstrip(".,")  # "18." and "18," end a sentence or a clause
        glued = m["glued"] and m["glued"].lower() not in _ORDINAL
        if not _WELL_FORMED.fullmatch(run) or glued or (m["exp"] and abs(int(m["exp"])) > _MAX_EXPONENT):
            return None
        value = Decimal(run.replace(",", "") + (f"e{m['exp']}" if m["exp"] else ""))
        values.add(-value if m["sign"] in ("-", "\u2212") else value)
    return values.pop() if len(values) == 1 else None


def format_number(value: Decimal) -> str:
    """Plain decimal digits without exponent or trailing zeros: Decimal('1234.50') -> '1234.5'."""
    text = format(value.normalize(), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def is_correct(answer_text: str | None, gold: str) -> bool:
    """True iff the answer holds exactly one number and it equals ``gold`` as a number."""
    answer, expected = extract_number(answer_text), extract_number(gold)
    if expected is None:
        raise ValueError(f"gold answer {gold!r} is not one number")
    return answer is not None and answer == expected


# ---------------------------------------------------------------------------------------------------------------
# Answers as token positions
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TokenSpans:
    """Half-open ``(start, end)`` positions in the completion's token list."""

    cot: tuple[int, int]  # tokens entirely before "#####" (all text tokens when there is no delimiter)
    delim: tuple[int, int] | None  # tokens overlapping the "#####" characters; None when absent
    answer: tuple[int, int] | None  # tokens after the delimiter, before trailing special tokens; None when absent


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of the GPT-2 byte-level alphabet: printable bytes stand for themselves, the others are shifted to
    code points 256+ (so every byte has a visible, non-space character)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars, shift = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + shift)] = b
            shift += 1
    return chars


def token_bytes(tokenizer, ids: list[int]) -> list[bytes]:
    """The bytes each token contributes to the decoded text (special tokens contribute none, as in decode).

    Exact for byte-level BPE tokenizers (Llama 3, SmolLM2); for any other tokenizer it falls back to decoding
    growing prefixes, which is exact for ASCII text.
    """
    raw = getattr(tokenizer, "tokenizer", tokenizer)  # our wrapper or a raw `tokenizers.Tokenizer`
    special = {i for i, t in raw.get_added_tokens_decoder().items() if t.special}
    table = _byte_decoder()
    out = []
    for i in ids:
        if i in special:
            out.append(b"")
            continue
        piece = raw.id_to_token(i)
        if piece is None or any(c not in table for c in piece):
            break
        out.append(bytes(table[c] for c in piece))
    else:
        return out
    out, prev = [], b""  # not byte-level: cumulative decode
    for k in range(1, len(ids) + 1):
        text = raw.decode(ids[:k]).encode("utf-8")
        out.append(text[len(prev):])
        prev = text
    return out


def split_tokens(tokenizer, completion_ids: list[int]) -> TokenSpans:
    """Which completion positions are CoT, delimiter and answer (see ``TokenSpans``)."""
    pieces = token_bytes(tokenizer, completion_ids)
    ends, total = [], 0
    for p in pieces:
        total += len(p)
        ends.append(total)
    n_text = len(pieces)
    while n_text and not pieces[n_text - 1]:  # trailing special tokens (end of turn) belong to no span
        n_text -= 1
    at = b"".join(pieces).find(DELIMITER.encode())
    if at < 0:
        return TokenSpans(cot=(0, n_text), delim=None, answer=None)
    # The first token reaching past byte `at` holds the first "#"; the first reaching `at + 5`, the last one.
    d_start = next(k for k, e in enumerate(ends) if e > at)
    d_end = next(k for k, e in enumerate(ends) if e >= at + len(DELIMITER)) + 1
    return TokenSpans(cot=(0, d_start), delim=(d_start, d_end), answer=(d_end, max(d_end, n_text)))


def saliency_sequence(
    tokenizer, prompt_ids: list[int], completion_ids: list[int], gold: str
) -> tuple[list[int], int, tuple[int, int], tuple[int, int]]:
    """The teacher-forced sequence the saliency mask is fitted on: ``prompt + CoT + "#####" + gold``.

    The CoT tokens are the model's own (``split_tokens``); the rest is re-encoded from text: the characters of the
    delimiter tokens up to the end of ``#####`` (they may carry the CoT's last characters, e.g. ``".\\n"``), then
    ``" " + gold``. Without a delimiter the whole completion is the CoT and ``"\\n#####"`` is appended.
    Returns ``(tokens, prompt_len, cot, answer)`` with ``cot``/``answer`` half-open positions in ``tokens``; the
    answer span covers the tokens overlapping the gold number's characters (Eq. 2's answer tokens).
    """
    spans = split_tokens(tokenizer, completion_ids)
    if spans.delim is None:
        cot_ids, head = list(completion_ids[: spans.cot[1]]), "\n" + DELIMITER
    else:
        cot_ids = list(completion_ids[: spans.cot[1]])
        delim_text = b"".join(token_bytes(tokenizer, completion_ids[spans.delim[0]: spans.delim[1]]))
        head = delim_text[: delim_text.find(DELIMITER.encode()) + len(DELIMITER)].decode("utf-8", errors="replace")
    tail = f"{head} {gold}"
    raw = getattr(tokenizer, "tokenizer", tokenizer)
    enc = raw.encode(tail, add_special_tokens=False)
    gold_start = len(tail) - len(gold)
    first = next(k for k, (s, e) in enumerate(enc.offsets) if e > gold_start)
    tokens = list(prompt_ids) + cot_ids + list(enc.ids)
    base = len(prompt_ids) + len(cot_ids)
    return tokens, len(prompt_ids), (len(prompt_ids), base), (base + first, len(tokens))


# ---------------------------------------------------------------------------------------------------------------
# The task: prompt tokens in, a Score out
# ---------------------------------------------------------------------------------------------------------------


class GSM8KTask:
    """GSM8K (or the synthetic GSM8K-style problems): chat prompt with the ``#####`` instruction, number matching.

    The trainer and the evaluations see this class only through the ``Task`` protocol (``atmanrl.tasks.base``) and
    pick it by name (``data.task: gsm8k``, the default). The GSM8K files and the embedded synthetic problems are
    both ``Problem`` objects with a question and a gold number. ``score`` judges the text after the first ``#####``
    and, when there is a delimiter, builds the saliency input (``saliency_sequence``).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.stop_ids = list(tokenizer.stop_ids)
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0

    def prompt(self, problem: Problem) -> list[int]:
        return build_prompt(self.tokenizer, problem.question)

    def score(self, problem: Problem, prompt: list[int], completion: list[int]) -> Score:
        spans = split_tokens(self.tokenizer, completion)  # trailing end-of-turn tokens belong to no span
        cot, answer = split_completion(self.tokenizer.decode(completion, skip_special_tokens=True))
        if spans.delim is None:  # no "#####": no answer, no CoT/answer boundary
            return Score(correct=False, has_answer=False, cot_tokens=spans.cot[1], cot=cot)
        tokens, prompt_len, cot_span, gold = saliency_sequence(self.tokenizer, prompt, completion, problem.gold)
        return Score(correct=is_correct(answer, problem.gold), has_answer=True, cot_tokens=spans.cot[1],
                     saliency_input=SaliencyInput(tokens, prompt_len, cot_span, gold), cot=cot, answer=answer)
