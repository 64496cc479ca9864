"""Cost bounds for pacing the scheduler: how long a prefill piece or a decode call may take, from the
times of recent ones, so the scheduler can keep the gap between decode calls within --max-itl-ms.

The bound is an upper bound under one assumption about the cost t(size, context) of a step: it never
decreases when size or context grows, and grows at most linearly in each, i.e. for lam >= 1
    t(lam * size, context) <= lam * t(size, context)   and   t(size, lam * context) <= lam * t(size, context).
Every cost c0 + size * (a_size + b * context) with c0, b >= 0 and size * a_size non-decreasing, a_size
non-increasing in size satisfies it: c0 covers the per-call cost (reading the weights once, dispatch),
a_size the per-token matmuls (on a GPU a 256-row matmul is far less efficient per row than an 8192-row
one, so a_size falls with size), b attention over the keys (a prefill piece of B rows ending at position
E reads E keys per row; a decode call of n steps over slots holding C tokens in all reads about C keys
per step). Then ONE measured sample (B_s, E_s, t_s) bounds every other step:
    t(B, E) <= t(max(B, B_s), max(E, E_s)) <= t_s * max(1, B / B_s) * max(1, E / E_s)
and the bound kept is the smallest over a window of recent samples (so a slow outlier is forgotten and
a sample at nearly the same size and context gives an almost exact figure).

Per-size fits. Scaling in context is very pessimistic where the matmuls dominate (a piece at twice the
context is bounded by twice its time), so for every size with samples at >= 2 distinct contexts in the
window the cost at that size is also fitted as t = c0_s + b_s * context (non-negative least squares:
exact for the form above at fixed size, where c0_s = c0 + s * a_s and b_s = s * b), and a fitted size s
gives the estimate FIT_MARGIN x fit_s(E) x max(1, B / s) for any size B (its own, exactly; a smaller one
by monotonicity; a larger one by linear scaling). The estimate is the smallest of the sample bound and
those: an upper bound within FIT_MARGIN of the truth for a measured size.

Sizes without their own fit (no sample in the window, or samples at one context only, e.g. a chat's
10-token prompt, whose sample at context 10 scales to nothing useful at 4000): the above bounds them
from the sizes that were measured, pessimistically from smaller ones (by the larger size's better
efficiency and by c0) and not at all from larger ones, so a smaller bucket would never run while a
stream decodes and the end of every gap would be wasted. So they also get FIT_MARGIN x a global fit
c0 + size * (a + b * context) over all samples (when these span >= 2 sizes and >= 2 contexts), raised to
at least FIT_MARGIN x what linear growth proves of them: t(B, E) >= (B / s) * t(s, E) for a fitted larger
size s. Only sizes below a fitted one get the guess: a larger unmeasured size keeps the upper bound scaled
up from the smaller ones (on the H100 at 128K the guess let 2048-token pieces into a 100 ms budget and
the chat saw a 246 ms gap; scaled up, a larger size runs only once it provably fits). This guess is not an upper bound: the global fit averages the sizes' per-token costs and so
underestimates a less efficient small size (the floor limits by how much), which is why it is used only
until pieces of that size were measured at two contexts and give their own fit. The previous CostBound
used the global fit for every size, so it misjudged measured sizes of unequal efficiency too.

Overruns. The fits and the guess are exact only for costs of the assumed form; on the H100 at 128K
context, pieces sized by them overran a 100 ms budget (chat gaps of 167-246 ms: lines fitted through
pieces at short contexts extrapolate low, and the guess for a size never run is a guess). So every
measured step is also compared with what was estimated for it, and while the window holds a step that
took r > 1 times its estimate, every fitted estimate is raised by r too (never the sample bound): one
overrun makes the next estimates pessimistic by as much as it was wrong, and 32 steps later, once the
fits have its samples, that margin is forgotten.

Worked example: a 256-token piece ending at 100,000 took 12 ms. A 2048-token piece ending at 102,048 is
bounded by 12 * 8 * 1.0205 = 98 ms; a 256-token piece ending at 110,000 by 12 * 1.1 = 13.2 ms. Once a
second 256-token piece, ending at 120,000, took 13 ms, the fit for 256 is 7 ms + 5e-5 ms * E, so one
ending at 140,000 is estimated at 1.05 * 14 = 14.7 ms (the sample bound says 13 * 140 / 120 = 15.2) and
the 2048-token piece ending at 140,000 at 8 * 14.7 = 118 ms until a 2048-token piece is measured.
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
    """Estimate (upper bound, tightened by per-size fits) of a step's seconds from a window of measured
    (size, context, seconds) samples; see the module docstring."""

    def __init__(self, window: int = 32):
        self._samples: collections.deque[tuple[int, int, float]] = collections.deque(maxlen=window)
        self._fits: dict[int, tuple[float, float]] = {}     # size -> (c0_s, b_s), where identified
        self._coef: np.ndarray | None = None                 # global (c0, a, b), for unmeasured sizes
        self._overrun: collections.deque[float] = collections.deque(maxlen=window)   # seconds / estimate

    def add(self, size: int, context: int, seconds: float) -> None:
        sample = (max(1, int(size)), max(1, int(context)), max(0.0, float(seconds)))
        estimate = self.bound(size, context)
        if estimate:
            self._overrun.append(sample[2] / estimate)
        full = len(self._samples) == self._samples.maxlen
        changed = {sample[0]} | ({self._samples[0][0]} if full else set())   # the added and the evicted size
        self._samples.append(sample)
        for s in changed:
            self._refit(s)
        data = np.asarray(self._samples, np.float64)
        s, c, t = data[:, 0], data[:, 1], data[:, 2]
        self._coef = None
        if len(np.unique(s)) >= 2 and len(np.unique(c)) >= 2:
            self._coef = fit_nonnegative(np.stack([np.ones_like(s), s, s * c], axis=1), t)

    def _refit(self, size: int) -> None:
        own = np.asarray([(c, t) for s, c, t in self._samples if s == size], np.float64).reshape(-1, 2)
        self._fits.pop(size, None)
        if len(np.unique(own[:, 0])) >= 2:
            c0, b = fit_nonnegative(np.stack([np.ones(len(own)), own[:, 0]], axis=1), own[:, 1])
            self._fits[size] = (float(c0), float(b))

    def bound(self, size: int, context: int) -> float | None:
        """Seconds a step of this size and context takes (module docstring); None: no sample yet."""
        if not self._samples:
            return None
        size, context = max(1, int(size)), max(1, int(context))
        sampled = min(t * max(1.0, size / s) * max(1.0, context / c) for s, c, t in self._samples)
        margin = FIT_MARGIN * max(1.0, max(self._overrun, default=1.0))
        fitted = sampled
        for s, (c0, b) in self._fits.items():
            fitted = min(fitted, margin * (c0 + b * context) * max(1.0, size / s))
        larger = [(s, f) for s, f in self._fits.items() if s > size]
        if self._coef is not None and size not in self._fits and larger:
            c0, a, b = self._coef
            floor = max(margin * (c0s + bs * context) * size / s for s, (c0s, bs) in larger)
            fitted = min(fitted, max(margin * (c0 + size * (a + b * context)), floor))
        return min(sampled, fitted)

    def fitted_sizes(self) -> tuple[int, ...]:
        """Sizes with a fit (samples at >= 2 contexts in the window), for tests and logs."""
        return tuple(sorted(self._fits))

    def __len__(self) -> int:
        return len(self._samples)
