"""Progress lines inside a long phase of an update (rollout, saliency, policy update), on rank 0 only.

At the paper's scale one update takes minutes and the update line only comes at its end. A ``Progress`` stays
silent for the first ``quiet_s`` seconds of its phase -- short runs and tests print nothing -- then prints at most
one line every ``every_s`` seconds: how much is done, the rate in tokens/s when the phase counts tokens, and the
time left at the current pace. A phase that ran long also ends with one closing line.

    with Progress("saliency", total=len(todo), unit="sequences") as p:
        ...
        p.advance(0.25, tokens=...)   # fractions are fine: a quarter of the mask steps of one sequence
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from atmanrl import dist


def hms(seconds: float) -> str:
    """``73`` -> ``"1m13s"``, ``3725`` -> ``"1h02m05s"``; ``"?"`` when unknown."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """Counts the work of one phase and prints where it stands once the phase has run ``quiet_s`` seconds."""

    def __init__(self, label: str, total: float, unit: str, *, quiet_s: float = 5.0, every_s: float = 15.0,
                 clock: Callable[[], float] = time.perf_counter, log: Callable[[str], None] = dist.log):
        self.label, self.total, self.unit = label, total, unit
        self.quiet_s, self.every_s, self.clock, self.log = quiet_s, every_s, clock, log
        self.done, self.tokens = 0.0, 0
        self.start = clock()
        self.last_line = -math.inf

    def advance(self, n: float = 1, tokens: int = 0) -> None:
        """``n`` more units done (and ``tokens`` more tokens processed); prints if it is time to (the closing line
        is printed on leaving the ``with`` block)."""
        self.done = round(self.done + n, 9)  # fractions (1/steps of a sequence) add up to whole units
        self.tokens += tokens
        now = self.clock()
        if self.done < self.total and now - self.start >= self.quiet_s and now - self.last_line >= self.every_s:
            self.log(self.line(now))
            self.last_line = now

    def finish(self) -> None:
        """The phase ended with less work than ``total`` (an upper bound, e.g. decode steps when every sequence
        stopped early): what was done is the total, so the closing line says "done"."""
        self.total = self.done

    def line(self, now: float | None = None) -> str:
        elapsed = (self.clock() if now is None else now) - self.start
        text = f"  {self.label}: {self.done:.0f}/{self.total:.0f} {self.unit}"
        if self.tokens:
            text += f", {self.tokens / max(elapsed, 1e-9):.0f} tok/s"
        if self.done < self.total:
            eta = elapsed / self.done * (self.total - self.done) if self.done > 0 else math.inf
            return text + f", {hms(elapsed)} so far, ETA {hms(eta)}"
        return text + f", done in {hms(elapsed)}"

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        now = self.clock()
        if exc[0] is None and now - self.start >= self.quiet_s:  # a long phase says how it ended
            self.log(self.line(now))
