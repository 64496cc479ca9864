"""Cost bounds for pacing the scheduler: how long a prefill piece or a decode call may take, from the
times of recent ones, so the scheduler can keep the gap between decode calls within --max-itl-ms.

The bound is an upper bound under one assumption about the cost t(size, context) of a step: it never
decreases when size or context grows, and grows at most linearly in each, i.e. for lam >= 1
    t(lam * size, context) <= lam * t(size, context)   and   t(size, lam * context) <= lam * t(size, context).
Every cost of the form c0 + size * (a + b * context) with c0, a, b >= 0 satisfies it: c0 covers the
per-call cost (reading the weights once, dispatch), a the per-token matmuls, b attention over the
keys (a prefill piece of B rows ending at position E reads E keys per row; a decode call of n steps over
slots holding C tokens in all reads about C keys per step). Then ONE measured sample (B_s, E_s, t_s)
bounds every other step:
    t(B, E) <= t(max(B, B_s), max(E, E_s)) <= t_s * max(1, B / B_s) * max(1, E / E_s)
and the bound kept is the smallest over a window of recent samples (so a slow outlier is forgotten and
a sample at nearly the same size and context gives an almost exact figure). A larger bucket never
measured is bounded by scaling a smaller one linearly: pessimistic by its fixed cost c0 (at the 7B shape
c0 ~ 3 ms of weight reads, so a 2048-token piece bounded from a 256-token one is overestimated by ~20 ms,
enough to keep the scheduler on small pieces for good). So once the window holds samples at two sizes
and two contexts, the three coefficients are also fitted (non-negative least squares) and the estimate
is min(bound, FIT_MARGIN x fit): exact for a cost of that form, the margin covering timing noise.

Worked example: a 256-token piece ending at 100,000 took 12 ms. A 2048-token piece ending at 102,048 is
bounded by 12 * 8 * 1.0205 = 98 ms; a 256-token piece ending at 110,000 by 12 * 1.1 = 13.2 ms.
"""
from __future__ import annotations

import collections
import itertools

import numpy as np

FIT_MARGIN = 1.05     # the fitted estimate is raised 5%: host timing noise of a step, not model error


def fit_nonnegative(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares X c ~ y with c >= 0, by trying every subset of the (few) columns: the best-fitting
    subset whose unconstrained solution is non-negative (the NNLS optimum is one of them)."""
    best, best_err = np.zeros(X.shape[1]), float(np.sum(y * y))
    for k in range(1, X.shape[1] + 1):
        for cols in itertools.combinations(range(X.shape[1]), k):
            c, *_ = np.linalg.lstsq(X[:, cols], y, rcond=None)
            if np.all(c >= 0):
                err = float(np.sum((X[:, cols] @ c - y) ** 2))
                if err < best_err:
                    best, best_err = np.zeros(X.shape[1]), err
                    best[list(cols)] = c
    return best


class CostBound:
    """Estimate (upper bound, tightened by a fit) of a step's seconds from a window of measured
    (size, context, seconds) samples; see the module docstring."""

    def __init__(self, window: int = 32):
        self._samples: collections.deque[tuple[int, int, float]] = collections.deque(maxlen=window)
        self._coef: np.ndarray | None = None          # (c0, a, b) when the window identifies them

    def add(self, size: int, context: int, seconds: float) -> None:
        self._samples.append((max(1, int(size)), max(1, int(context)), max(0.0, float(seconds))))
        sizes = {s for s, _, _ in self._samples}
        contexts = {c for _, c, _ in self._samples}
        self._coef = None
        if len(sizes) >= 2 and len(contexts) >= 2:
            data = np.asarray(self._samples, np.float64)
            s, c, t = data[:, 0], data[:, 1], data[:, 2]
            self._coef = fit_nonnegative(np.stack([np.ones_like(s), s, s * c], axis=1), t)

    def bound(self, size: int, context: int) -> float | None:
        """Seconds a step of this size and context takes (module docstring); None: no sample yet."""
        if not self._samples:
            return None
        size, context = max(1, int(size)), max(1, int(context))
        upper = min(t * max(1.0, size / s) * max(1.0, context / c) for s, c, t in self._samples)
        if self._coef is None:
            return upper
        c0, a, b = self._coef
        return min(upper, FIT_MARGIN * (c0 + size * (a + b * context)))

    def __len__(self) -> int:
        return len(self._samples)
