"""Problems and answers: GSM8K files (``gsm8k``) and the embedded GSM8K-style generator (``synthetic``)."""

from .gsm8k import (
    DELIMITER,
    INSTRUCTION,
    Problem,
    TokenSpans,
    build_prompt,
    draw_problems,
    extract_number,
    is_correct,
    read_gsm8k,
    saliency_sequence,
    split_completion,
    split_tokens,
)
from .synthetic import make_problems

__all__ = ["DELIMITER", "INSTRUCTION", "Problem", "TokenSpans", "build_prompt", "draw_problems", "extract_number", "is_correct",
           "make_problems", "read_gsm8k", "saliency_sequence", "split_completion", "split_tokens"]
