"""pass@k and mean accuracy over per-problem lists of sample correctness.

The paper's pass@4 is the share of problems with at least one correct answer among its 4 samples (n = k samples
drawn per problem). ``pass_at_k_unbiased`` is the estimator of Chen et al. (2021) for drawing n >= k samples and
estimating pass@k from them; with n = k it equals the paper's definition problem by problem.
"""

from __future__ import annotations

from math import comb


def pass_at_k(correct: list[list[bool]], k: int | None = None) -> float:
    """Share of problems with at least one correct sample among their first ``k`` (all samples when None)."""
    if not correct:
        raise ValueError("pass@k of zero problems is undefined; evaluate at least one problem")
    return sum(any(c[:k] if k is not None else c) for c in correct) / len(correct)


def pass_at_k_unbiased(n: int, c: int, k: int) -> float:
    """Probability that k samples drawn without replacement from n (c correct) include a correct one:
    ``1 - C(n - c, k) / C(n, k)``."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - comb(n - c, k) / comb(n, k)


def mean_accuracy(correct: list[list[bool]]) -> float:
    """Share of correct samples over all samples of all problems."""
    flat = [x for c in correct for x in c]
    if not flat:
        raise ValueError("mean accuracy of zero samples is undefined")
    return sum(flat) / len(flat)
