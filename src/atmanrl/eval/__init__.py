"""Evaluation: the paper's Table 1 (pass@k, accuracy, CoT length, spaCy composition of the CoT), the faithfulness
tests, intervention truth, the held-out evaluation during training."""

from .composition import Composition, composition, load_spacy
from .passk import mean_accuracy, pass_at_k, pass_at_k_unbiased
from .table1 import evaluate, summarize, table1_markdown

__all__ = ["Composition", "composition", "evaluate", "load_spacy", "mean_accuracy", "pass_at_k",
           "pass_at_k_unbiased", "summarize", "table1_markdown"]
