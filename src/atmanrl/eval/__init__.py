"""The paper's Table 1 evaluation: pass@k, accuracy, CoT length and spaCy composition of the CoT."""

from .composition import Composition, composition, load_spacy
from .gsm8k_eval import evaluate
from .passk import mean_accuracy, pass_at_k, pass_at_k_unbiased
from .table1 import summarize, table1_markdown

__all__ = ["Composition", "composition", "evaluate", "load_spacy", "mean_accuracy", "pass_at_k",
           "pass_at_k_unbiased", "summarize", "table1_markdown"]
