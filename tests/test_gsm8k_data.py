"""GSM8K reading, strict answer matching, token spans and the embedded synthetic problems."""

import json
import re
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from references import llama32_tokenizer_json

from atmanrl.tasks.gsm8k import (
    DELIMITER,
    INSTRUCTION,
    build_prompt,
    extract_number,
    is_correct,
    read_gsm8k,
    saliency_sequence,
    split_completion,
    split_tokens,
)
from atmanrl.tasks.synthetic import synthetic_problems

LLAMA3_TOKENIZER = llama32_tokenizer_json()  # the real Llama-3.2 tokenizer (tests/references.py), or None

# ---------------------------------------------------------------------------------------------------------------
# Reading GSM8K
# ---------------------------------------------------------------------------------------------------------------


def test_every_gold_answer_of_gsm8k_test_is_recovered(gsm8k_test_path):
    problems = read_gsm8k(gsm8k_test_path)
    rows = [json.loads(line) for line in gsm8k_test_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(problems) == len(rows) == 1319
    for p, row in zip(problems, rows):
        written = row["answer"].split("####")[-1].strip()  # e.g. "18" or "1,450,000"
        assert re.fullmatch(r"-?\d{1,3}(,\d{3})*|-?\d+", written), written
        assert p.gold == written.replace(",", "")
        # The worked solution in our delimiter format is read back as correct ...
        cot, answer = split_completion(row["answer"].replace("####", DELIMITER))
        assert is_correct(answer, p.gold), (answer, p.gold)
        # ... and so is the number as written in the file, thousands separators included.
        assert is_correct(f"{written} dollars.", p.gold)


def test_malformed_jsonl_names_file_and_line(tmp_path):
    good = json.dumps({"question": "1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2"})
    cases = {
        '{"question": "q", "answer": ',  # not JSON
        json.dumps({"question": "q"}),  # missing key
        json.dumps({"question": "q", "answer": "no final line"}),  # no ####
        json.dumps({"question": "q", "answer": "#### 3 or 4"}),  # not one number
    }
    for bad in cases:
        path = tmp_path / "bad.jsonl"
        path.write_text(f"{good}\n\n{bad}\n{good}\n", encoding="utf-8")
        with pytest.raises(ValueError, match=re.escape(f"{path}:3:")):
            read_gsm8k(path)
    path.write_text(f"{good}\n\n{good}\n", encoding="utf-8")
    assert [p.gold for p in read_gsm8k(path)] == ["2", "2"]
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_gsm8k(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------------------------------------------------------
# Answers as text
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, value", [
    ("$1,234.50", "1234.5"), ("1234.5", "1234.5"), ("18.", "18"), ("18 dollars", "18"), (" 18\n", "18"),
    ("The answer is 18.", "18"), ("-5", "-5"), ("50%", "50"), ("0.75", "0.75"), (".5", "0.5"), ("$18.00", "18"),
    ("18 = 18.0", "18"), ("# 18", "18"), ("1,000,000", "1000000"), ("18th", "18"),
])
def test_extract_number_reads(text, value):
    assert extract_number(text) == Decimal(value)


@pytest.mark.parametrize("text", [
    "", "   ", None, "eighteen", "18 or 19", "18-20", "5 - 3", "1,23", "1.5.3", "18, 19, 20", "1 8",
    "18 dollars and 50 cents", "12,34,567", "3/4", "2 * 9 = 18",
])
def test_extract_number_refuses(text):
    assert extract_number(text) is None


@pytest.mark.parametrize("text, value", [
    ("1e5", "100000"), ("1.5e3", "1500"), ("-1e-3", "-0.001"), ("7.5E+2 apples", "750"), ("$2e3", "2000"),
    ("1e5 = 100000", "100000"),
])
def test_scientific_notation_is_read_as_its_value(text, value):
    """Issue 10: "1e5" was read as 1 and "1.5e3" as 1.5."""
    assert extract_number(text) == Decimal(value)


@pytest.mark.parametrize("text", ["0x10", "0X1F", "3x4", "5k", "12abc", "2eggs", "1e999999", "1e5 or 2"])
def test_numbers_with_glued_letters_are_refused_not_misread(text):
    """Issue 10: "0x10" was read as 0 (the digits before the letters); now it is unreadable, never another number."""
    assert extract_number(text) is None


def test_gold_in_scientific_notation_reads_right_and_hex_is_refused_with_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "big\n#### 1e5"}) + "\n", encoding="utf-8")
    assert read_gsm8k(path)[0].gold == "100000"
    path.write_text(json.dumps({"question": "q", "answer": "ok\n#### 2"}) + "\n"
                    + json.dumps({"question": "q", "answer": "hex\n#### 0x10"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"data\.jsonl:2: the text after '####' is not one number: '0x10'"):
        read_gsm8k(path)


def test_a_directory_instead_of_the_data_file_says_so(tmp_path):
    with pytest.raises(IsADirectoryError, match=r"is a directory; give the GSM8K jsonl file inside it"):
        read_gsm8k(tmp_path)


def test_non_utf8_data_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = json.dumps({"question": "q", "answer": "#### 2"}).encode()
    bad = json.dumps({"question": "Gr\u00fc\u00dfe", "answer": "#### 2"}, ensure_ascii=False).encode("latin-1")
    path.write_bytes(good + b"\n" + bad + b"\n")
    with pytest.raises(ValueError, match=r"latin1\.jsonl:2: byte \d+ of the line \(0xfc\) is not UTF-8 text.*"
                                         r"convert the file"):
        read_gsm8k(path)


def test_is_correct_is_strict():
    assert is_correct(" 18", "18") and is_correct("$18.00", "18") and is_correct("1,234", "1234")
    assert not is_correct(None, "18") and not is_correct("", "18") and not is_correct("18 19", "18")
    assert not is_correct("17 18 19", "18") and not is_correct("181", "18") and not is_correct("1.8", "18")
    with pytest.raises(ValueError, match="not one number"):
        is_correct("18", "eighteen")


def test_split_completion_at_first_delimiter():
    assert split_completion("a ##### 5 ##### 6") == ("a ", " 5 ##### 6")
    assert split_completion("no delimiter") == ("no delimiter", None)
    assert split_completion("#####") == ("", "")


def formatted(value: Decimal, style: int) -> str:
    """One of the ways a model writes a number."""
    plain = format(value, "f")
    if style == 0:
        return plain
    if style == 1:  # thousands separators
        sign, digits = ("-", plain[1:]) if plain.startswith("-") else ("", plain)
        whole, _, frac = digits.partition(".")
        return sign + f"{int(whole):,}" + (f".{frac}" if frac else "")
    if style == 2:
        return f"{plain}."  # end of a sentence
    if style == 3:
        return f"The answer is {plain} dollars"
    return f"{plain} = {plain}"  # the same number twice


numbers = st.one_of(
    st.integers(-10**9, 10**12).map(Decimal),
    st.decimals(min_value=0, max_value=10**6, places=2, allow_nan=False, allow_infinity=False),
)


@settings(max_examples=300, deadline=None)
@given(value=numbers, style=st.integers(0, 4))
def test_number_reader_reads_back_what_was_written(value, style):
    if style == 1 and value < 0:
        value = -value
    text = formatted(value, style)
    assert extract_number(text) == value
    assert is_correct(text, format(value, "f"))


@settings(max_examples=200, deadline=None)
@given(a=numbers, b=numbers, glue=st.sampled_from([" or ", ", ", " and ", " then ", "\n"]))
def test_two_different_numbers_never_count(a, b, glue):
    text = f"{format(a, 'f')}{glue}{format(b, 'f')}"
    if a == b:
        assert extract_number(text) == a
    else:
        assert extract_number(text) is None
        assert not is_correct(text, format(a, "f")) and not is_correct(text, format(b, "f"))


@settings(max_examples=300, deadline=None)
@given(value=numbers, exponent=st.integers(-6, 6), e=st.sampled_from(["e", "E"]),
       glue=st.sampled_from(["x", "X", "k", "abc", "b1", "_"]))
def test_a_number_is_read_as_itself_or_refused_never_as_another(value, exponent, e, glue):
    """Scientific notation reads as its value; digits with letters glued on are refused (issue 10)."""
    plain = format(value, "f")
    assert extract_number(f"{plain}{e}{exponent}") == value.scaleb(exponent)
    assert extract_number(f"{plain}{glue}{abs(exponent)}") is None
    assert extract_number(f"0x{abs(int(value))}") is None


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.characters(blacklist_categories=["Nd"]), max_size=40))
def test_text_without_digits_has_no_number(text):
    assert extract_number(text) is None


# ---------------------------------------------------------------------------------------------------------------
# Prompt and token positions (real tokenizers: SmolLM2's and Llama 3's byte-level BPE)
# ---------------------------------------------------------------------------------------------------------------


COMPLETIONS = [
    "First, 2+3 = 5.\n##### 5",
    "So x is 5.#####5",
    "answer:\n\n#####  18 dollars.",
    "She pays $1,234.50 in total.\n\n##### 1234.5\n",
    "Café costs 3 €, so... ###### 7",
    "no delimiter here at all",
    "##### 42",
]


@pytest.fixture(scope="module")
def tokenizers_under_test(smollm2):
    toks = [smollm2[1]]
    if LLAMA3_TOKENIZER is not None:
        from tokenizers import Tokenizer

        toks.append(Tokenizer.from_file(str(LLAMA3_TOKENIZER)))  # a raw `tokenizers.Tokenizer` works too
    return toks


def _decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("text", COMPLETIONS)
def test_split_tokens_positions(tokenizers_under_test, text):
    for tok in tokenizers_under_test:
        stop = [tok.stop_ids[0]] if hasattr(tok, "stop_ids") else []
        ids = tok.encode(text) if hasattr(tok, "stop_ids") else tok.encode(text, add_special_tokens=False).ids
        ids = ids + stop
        spans = split_tokens(tok, ids)
        cot_text, answer = split_completion(text)
        if answer is None:
            assert spans.delim is None and spans.answer is None
            assert spans.cot == (0, len(ids) - len(stop))
            continue
        # CoT: tokens entirely before "#####"; delimiter: the tokens overlapping it; answer: the rest, stop excluded.
        assert cot_text.startswith(_decode(tok, ids[: spans.cot[1]]))
        assert spans.cot[1] == spans.delim[0] and spans.delim[1] == spans.answer[0]
        delim_text = _decode(tok, ids[spans.delim[0]: spans.delim[1]])
        assert DELIMITER in _decode(tok, ids[: spans.delim[1]]) and DELIMITER not in _decode(tok, ids[: spans.delim[1] - 1])
        assert "#" in delim_text
        assert spans.answer[1] == len(ids) - len(stop)
        assert _decode(tok, ids[: spans.cot[1]]) + delim_text + _decode(tok, ids[spans.answer[0]:]) == text


@pytest.mark.parametrize("text", COMPLETIONS)
def test_saliency_sequence_layout(smollm2, text):
    tok = smollm2[1]
    prompt = build_prompt(tok, "What is 2 + 3?")
    completion = tok.encode(text) + tok.stop_ids[:1]
    tokens, prompt_len, cot, answer = saliency_sequence(tok, prompt, completion, "1234")
    spans = split_tokens(tok, completion)
    assert tokens[:prompt_len] == prompt and cot == (prompt_len, prompt_len + spans.cot[1])
    assert tokens[cot[0]: cot[1]] == completion[: spans.cot[1]]  # the model's own CoT tokens
    assert tok.decode(tokens[answer[0]: answer[1]]).strip() == "1234" and answer[1] == len(tokens)
    tail = tok.decode(tokens[cot[1]:])
    assert tail.endswith(f"{DELIMITER} 1234") and (DELIMITER in text) == (not tail.startswith("\n"))


def test_build_prompt_holds_instruction_and_question(smollm2):
    tok = smollm2[1]
    text = tok.decode(build_prompt(tok, "How many legs do 3 cats have?"))
    assert INSTRUCTION in text and "How many legs do 3 cats have?" in text
    assert text.rstrip().endswith("assistant")  # the assistant's turn is open


# ---------------------------------------------------------------------------------------------------------------
# Synthetic problems
# ---------------------------------------------------------------------------------------------------------------

ANNOTATION = re.compile(r"<<(\d+)([-+*/])(\d+)=(\d+)>>(\d+)")


def test_synthetic_gold_answers_follow_from_their_worked_solutions():
    problems = synthetic_problems(300, seed=0)
    steps_seen = set()
    for p in problems:
        lines = p.answer_text.split("\n")
        assert lines[-1] == f"#### {p.gold}"
        results = []
        for line in lines[:-1]:
            (a, op, b, c, shown), = ANNOTATION.findall(line)  # one calculator annotation per step
            a, b, c = int(a), int(b), int(c)
            expected = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
            assert c == expected and c > 0 and shown == str(c)
            assert op != "/" or a % b == 0
            if results:  # each step works on the previous step's result
                assert results[-1] in (a, b), line
            given = b if results and results[-1] == a else a  # the operand the question states
            assert str(given) in p.question or {2: "doubles", 3: "triples"}.get(given, "?") in p.question
            results.append(c)
        assert results[-1] == int(p.gold)
        steps_seen.add(len(lines) - 1)
        assert is_correct(split_completion(p.answer_text.replace("####", DELIMITER))[1], p.gold)
    assert steps_seen == {1, 2, 3}


def test_synthetic_problems_repeat_with_their_seed():
    assert synthetic_problems(20, seed=3) == synthetic_problems(20, seed=3)
    assert synthetic_problems(20, seed=3) != synthetic_problems(20, seed=4)


def test_draw_problems_is_a_seeded_sample_without_replacement():
    from atmanrl.tasks.gsm8k import draw_problems

    pool = synthetic_problems(40, seed=3)
    a, b = draw_problems(pool, 25, seed=7), draw_problems(pool, 25, seed=7)
    assert a == b  # one seed, one set: the eval script and the trainer's held-out eval agree
    assert len({p.question for p in a}) == 25 and all(p in pool for p in a)
    assert draw_problems(pool, 25, seed=8) != a
    with pytest.raises(ValueError, match="cannot draw 41 problems from 40"):
        draw_problems(pool, 41, seed=0)
