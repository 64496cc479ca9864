"""The inter-token budget (--max-itl-ms) and prefix-reuse slot choice of the scheduler, on a scripted
engine whose steps advance a fake clock by a scripted cost: no wall-clock dependence, every time below
is exact arithmetic on the script.

Scripted costs (ms), of the form pacing.CostBound assumes (c0 + size * (a + b * context)):
    prefill piece padded to bucket B, ending at position E:  2 + B * (0.05 + 1e-5 * E)
    decode call of n steps over slots caching C tokens:      1 + n * (0.5 + 1e-4 * C)
Buckets 16 / 64 / 256 (prefill_chunk 256). At E = 4000 a 256-token piece costs 25 ms, a 64-token one
7.8 ms: with a 20 ms budget the scheduler must switch from 256- to 64-token pieces as the context grows.
"""
from __future__ import annotations

import pytest

from zenjax.sampling import SamplingParams
from zenjax.serve.fake_engine import Clock
from zenjax.serve.fake_engine import CostEngine as _CostEngine
from zenjax.serve.metrics import Metrics
from zenjax.serve.pacing import FIT_MARGIN, CostBound
from zenjax.serve.scheduler import Finished, Request, Scheduler


def prefill_ms(bucket, end):
    return 2 + bucket * (0.05 + 1e-5 * end)


def decode_ms(n, cached):
    return 1 + n * (0.5 + 1e-4 * cached)


def fused_ms(bucket, end, cached):
    """A piece fused with one decode step: the piece plus the step's per-row work, not its fixed 1 ms (the
    weights are read once for both)."""
    return prefill_ms(bucket, end) + 0.5 + 1e-4 * cached


def CostEngine(clock, max_batch=2, fuse=False):
    """The scripted-cost engine (zenjax/serve/fake_engine.py) with this module's costs and buckets; fuse:
    it offers prefill_and_decode at fused_ms."""
    return _CostEngine(clock, lambda b, e: prefill_ms(b, e) / 1000, lambda n, c: decode_ms(n, c) / 1000,
                       buckets=(16, 64, 256), prefill_chunk=256, max_batch=max_batch,
                       fused_s=(lambda b, e, c: fused_ms(b, e, c) / 1000) if fuse else None)


def _req(name, n, max_new):
    return Request(name, list(range(1, n + 1)), SamplingParams(max_new_tokens=max_new))


def _run(sch, until, limit=10_000):
    for _ in range(limit):
        if until():
            return
        sch.step()
    raise AssertionError("did not finish")


def _token_times(eng, slot, prompt_len):
    """Clock times at which `slot` received tokens: its last prefill piece, then each decode call."""
    times = [e[5] for e in eng.log if e[0] == "prefill" and e[1] == slot and e[3] == prompt_len]
    times += [e[3] for e in eng.log if e[0] == "decode" and slot in e[1]]
    return times



def _paced(max_itl_ms, fuse=False):
    """A fake clock, the scripted-cost engine on it, and a scheduler with this inter-token budget."""
    clock = Clock()
    eng = CostEngine(clock, fuse=fuse)
    return clock, eng, Scheduler(eng, max_queue=4, max_itl_ms=max_itl_ms, clock=clock)

def test_cost_bound_is_an_upper_bound_of_costs_of_the_assumed_form():
    cb = CostBound()
    assert cb.bound(64, 100) is None
    cb.add(64, 1000, prefill_ms(64, 1000))
    for B, E in [(16, 10), (64, 1000), (64, 5000), (256, 1200), (256, 90_000)]:
        assert prefill_ms(B, E) <= cb.bound(B, E) + 1e-12, (B, E)
    assert cb.bound(64, 1000) == prefill_ms(64, 1000)          # the sample itself: exact
    # worked example of zenjax/serve/pacing.py
    cb = CostBound()
    cb.add(256, 100_000, 12.0)
    assert cb.bound(2048, 102_048) == pytest.approx(12 * 8 * 1.02048)


def test_fit_recovers_costs_of_the_assumed_form_and_stays_non_negative():
    import numpy as np
    from zenjax.serve.pacing import fit_nonnegative
    cb = CostBound()
    for B, E in [(16, 100), (64, 900), (256, 400), (16, 3000)]:
        cb.add(B, E, prefill_ms(B, E))
    # identified (two sizes, two contexts): for a size below the fitted one (16) the global fit's estimate
    # is FIT_MARGIN x the true cost where that is below the sample-scaled bound, e.g. far from any sample
    assert cb.bound(8, 50_000) == pytest.approx(FIT_MARGIN * prefill_ms(8, 50_000), rel=1e-9)
    # a size above every fitted one keeps the upper bound from its samples (no guess): never below truth
    assert prefill_ms(256, 50_000) <= cb.bound(256, 50_000) <= prefill_ms(256, 400) * 50_000 / 400
    X = np.array([[1.0, 1.0], [1.0, 2.0], [1.0, 3.0]])
    c = fit_nonnegative(X, np.array([3.0, 2.0, 1.0]))            # the unconstrained slope is -1
    assert np.all(c >= 0) and c[1] == 0 and c[0] == pytest.approx(2.0)


def test_worked_example_of_the_per_size_fit():
    # zenjax/serve/pacing.py: two 256-token pieces give the fit 7 ms + 5e-5 ms * E for that size
    cb = CostBound()
    cb.add(256, 100_000, 12.0)
    cb.add(256, 120_000, 13.0)
    assert cb.fitted_sizes() == (256,)
    assert cb.bound(256, 140_000) == pytest.approx(FIT_MARGIN * 14.0)
    assert cb.bound(2048, 140_000) == pytest.approx(8 * FIT_MARGIN * 14.0)


GRID_A = {16: 0.2, 64: 0.1, 256: 0.05}        # per-token matmul ms: small pieces less efficient


def grid_ms(bucket, end):
    """A cost of the assumed form with per-size efficiency: 2 + B * (a_B + 1e-5 * E), a_B falling with B."""
    return 2 + bucket * (GRID_A[bucket] + 1e-5 * end)


def test_per_size_fits_are_exact_within_the_margin_where_one_global_fit_underestimates():
    import numpy as np
    from zenjax.serve.pacing import fit_nonnegative
    cb = CostBound()
    samples = [(B, E) for E in (500, 2000, 3500) for B in GRID_A]
    for B, E in samples:
        cb.add(B, E, grid_ms(B, E))
    assert cb.fitted_sizes() == (16, 64, 256)
    # every measured size, at contexts far from its samples: the fit at that size is exact (the cost is
    # c0_B + b_B * E at fixed B), so the estimate is in [truth, FIT_MARGIN x truth] (1e-9: float rounding)
    for B in GRID_A:
        for E in (100, 4000, 20_000, 90_000):
            t = grid_ms(B, E)
            assert t * (1 - 1e-9) <= cb.bound(B, E) <= FIT_MARGIN * t * (1 + 1e-9), (B, E)
    # the global c0 + B * (a + b * E) fitted to the same samples underestimates a size by more than the
    # margin (what the old CostBound used: that 64-token piece would have overrun its budget)
    data = np.array([(B, E, grid_ms(B, E)) for B, E in samples])
    c0, a, b = fit_nonnegative(np.stack([np.ones(len(data)), data[:, 0], data[:, 0] * data[:, 1]], 1), data[:, 2])
    assert FIT_MARGIN * (c0 + 64 * (a + b * 100)) < grid_ms(64, 100)


def test_a_size_without_its_own_fit_is_never_guessed_below_what_linear_growth_proves():
    cb = CostBound()
    for B, E in [(256, 500), (256, 3000), (64, 1000), (64, 2500)]:
        cb.add(B, E, grid_ms(B, E))
    # 16 never measured: FIT_MARGIN x the global fit, raised to >= FIT_MARGIN x (16 / 64) x fit_64, the
    # least a 16-token piece can cost if t(64) <= 4 t(16) (the assumption), and never above the bound from
    # the larger sizes (monotone in size)
    for E in (100, 3000, 50_000):
        est = cb.bound(16, E)
        assert FIT_MARGIN * grid_ms(64, E) / 4 * (1 - 1e-9) <= est <= FIT_MARGIN * grid_ms(64, E) * (1 + 1e-9)
    cb.add(16, 1000, grid_ms(16, 1000))
    cb.add(16, 2000, grid_ms(16, 2000))       # measured at two contexts: its own fit, exact
    assert cb.bound(16, 50_000) == pytest.approx(FIT_MARGIN * grid_ms(16, 50_000), rel=1e-9)


@pytest.mark.parametrize("budget_ms", [20.0, 40.0])
def test_running_stream_gaps_stay_within_budget_while_a_long_prompt_prefills(budget_ms):
    clock, eng, sch = _paced(budget_ms)
    long, chat = _req("long", 4000, 2), _req("chat", 10, 200)
    sch.submit(long)
    sch.step()
    sch.step()
    sch.submit(chat)
    _run(sch, lambda: long.done)
    times = _token_times(eng, 1, 10)
    gaps = [b - a for a, b in zip(times, times[1:])]
    # (a) every gap of the chat's stream while the long prompt prefilled: within the budget (exact: the
    # script's costs have the form CostBound assumes, so its bounds are upper bounds)
    long_done = next(e[5] for e in eng.log if e[0] == "prefill" and e[3] == 4000)
    during = [g for g, t in zip(gaps, times[1:]) if t <= long_done]
    assert len(during) >= 5 and max(during) <= budget_ms / 1000 + 1e-12, (max(during), budget_ms)
    # ... and the gap that holds the long prompt's last piece: the decode block after it fits what the
    # piece left of the budget, not the whole budget
    after = next(g for g, t in zip(gaps, times[1:]) if t > long_done)
    assert after <= budget_ms / 1000 + 1e-12, (after, budget_ms)
    # ... and the sizing is real: pieces shrink to smaller buckets as the context grows
    buckets = [e[4] for e in eng.log if e[0] == "prefill" and e[1] == 0 and e[5] > times[0] and e[3] < 4000]
    assert 256 in buckets and 64 in buckets
    # (c) the long prompt progresses, using nearly all of each gap: prefill stops only when the smallest
    # piece's estimate (<= FIT_MARGIN x its cost, 3.44 ms at E <= 4000, once fitted) exceeds what is left
    # after reserving one decode step (<= 1 + 0.5 + 1e-4 * 210 ms); the first gap (fit not yet identified)
    # is left out
    pre = [sum(prefill_ms(e[4], e[3]) for e in eng.log if e[0] == "prefill" and e[1] == 0 and a < e[5] <= b)
           for a, b in zip(times, times[1:]) if b <= long_done]
    floor = budget_ms - decode_ms(1, 210) - FIT_MARGIN * prefill_ms(16, 4000)
    assert min(pre[1:]) >= floor - 1e-9, (min(pre[1:]), floor)
    assert isinstance([e for e in _drain(long) if isinstance(e, Finished)][0], Finished)


def _drain(req):
    out = []
    while not req.events.empty():
        out.append(req.events.get_nowait())
    return out


def test_without_running_streams_prefill_uses_the_largest_bucket():
    clock, eng, sch = _paced(20.0)
    long = _req("long", 1000, 1)
    sch.submit(long)
    _run(sch, lambda: long.done)
    pieces = [(e[2], e[3], e[4]) for e in eng.log if e[0] == "prefill"]
    assert pieces == [(0, 256, 256), (256, 512, 256), (512, 768, 256), (768, 1000, 256)]
    # one piece per iteration, as with the budget off: 4 iterations, no decode call (max_new_tokens 1)
    assert sch.steps == 4 and not [e for e in eng.log if e[0] == "decode"]


def test_long_prompt_never_starves_when_even_the_smallest_piece_exceeds_the_budget():
    clock, eng, sch = _paced(1.0)     # < any piece (>= 2.8 ms)
    chat, long = _req("chat", 5, 10_000), _req("long", 600, 1)
    sch.submit(chat)
    sch.step()                                   # chat decoding; its first decode call is measured
    sch.submit(long)
    _run(sch, lambda: long.done, limit=200)
    pieces = [e for e in eng.log if e[0] == "prefill" and e[1] == 1]
    assert pieces[-1][3] == 600
    # every iteration ran exactly one smallest piece, then one decode step
    kinds = [e[0] for e in eng.log if e[5 if e[0] == "prefill" else 3] > pieces[0][5] - 1e-12]
    assert kinds[: 2 * len(pieces) - 1:2] == ["prefill"] * len(pieces)
    assert all(p[4] == 16 for p in pieces)
    chat.cancel()
    sch.step()


def test_decode_block_length_fits_the_budget_when_nothing_prefills():
    clock, eng, sch = _paced(5.0)
    a = _req("a", 5, 200)
    sch.submit(a)
    for _ in range(6):
        sch.step()
    ns = [e[2] for e in eng.log if e[0] == "decode"]
    assert ns[0] == 1                            # nothing measured yet: one step
    # then the largest n whose bound fits 5 ms: 1 + n * (0.5 + 1e-4 * C) <= 5 -> n <= 7 at these C, and
    # the bound (scaled from the measured call) is never below the true cost, so no call exceeds 5 ms
    calls = [e for e in eng.log if e[0] == "decode"]
    durations = [b[3] - a[3] for a, b in zip(calls, calls[1:])]
    assert max(ns[1:]) > 1 and all(d <= 5e-3 + 1e-12 for d in durations)
    a.cancel()
    sch.step()


def test_budget_off_keeps_one_full_piece_per_iteration():
    clock, eng, sch = _paced(0)
    chat, long = _req("chat", 5, 50), _req("long", 1000, 1)
    sch.submit(chat)
    sch.step()
    sch.submit(long)
    _run(sch, lambda: long.done)
    assert [e[4] for e in eng.log if e[0] == "prefill" and e[1] == 1] == [256] * 4
    chat.cancel()
    sch.step()


def test_prefix_reuse_picks_the_slot_holding_the_prompt_and_reports_reused_tokens():
    clock = Clock()
    eng = CostEngine(clock, max_batch=3)
    metrics = Metrics()
    sch = Scheduler(eng, max_queue=4, reuse_min=8, clock=clock, metrics=metrics)
    doc = list(range(100, 140))                  # 40 tokens
    first = Request("q1", doc + [1, 2, 3], SamplingParams(max_new_tokens=2))
    other = Request("x", list(range(500, 530)), SamplingParams(max_new_tokens=2))
    sch.submit(first)
    sch.submit(other)
    _run(sch, lambda: first.done and other.done)
    assert (first.slot, other.slot) == (0, 1) and 0 in eng.held and 1 in eng.held
    second = Request("q2", doc + [7, 8], SamplingParams(max_new_tokens=1))
    stranger = Request("y", list(range(900, 950)), SamplingParams(max_new_tokens=1))
    sch.submit(stranger)                         # no common prefix: the free slot released longest ago
    sch.submit(second)
    sch.step()
    assert stranger.slot == 2 and second.slot == 0
    _run(sch, lambda: second.done and stranger.done)
    fin = [e for e in _drain(second) if isinstance(e, Finished)][0]
    assert fin.usage.reused_tokens == 40 and second.reused == 40      # the document only: q1's tail differs
    assert [e for e in _drain(stranger) if isinstance(e, Finished)][0].usage.reused_tokens == 0
    assert metrics.registry.get_sample_value("zenjax_reused_prompt_tokens_total") == 40      # Prometheus
    # every prefill step counted by its padded size (zenjax_prefill_pieces_total{bucket})
    logged = {}
    for e in eng.log:
        if e[0] == "prefill":
            logged[e[4]] = logged.get(e[4], 0) + 1
    assert metrics.piece_counts() == logged
    assert metrics.registry.get_sample_value("zenjax_prefill_pieces_total", {"bucket": "64"}) == logged[64]
    # the prefill started after the reused prefix
    assert [(e[2], e[3]) for e in eng.log if e[0] == "prefill" and e[1] == 0][-1] == (40, 42)


def test_an_overrun_raises_the_fitted_estimates_by_as_much_as_it_was_wrong():
    # a cost NOT of the assumed form (attention convex in the context), where lines fitted at short
    # contexts extrapolate low: a 64-token step at 8000 overruns its estimate by r (1.34 here); afterwards
    # the other sizes' fitted estimates are raised by r (exactly: here below their sample bounds), which
    # moves a 256-token piece's estimate from 67% to 90% of its cost
    def convex_ms(B, E):
        return 2 + B * (0.05 + 1e-9 * E * E)
    cb = CostBound()
    for B in (64, 256):
        for E in (1000, 1500, 2000):
            cb.add(B, E, convex_ms(B, E))
    r = convex_ms(64, 8000) / cb.bound(64, 8000)
    before = cb.bound(256, 8256)
    assert r > FIT_MARGIN and before < convex_ms(256, 8256) / r     # both fits were well below the cost
    cb.add(64, 8000, convex_ms(64, 8000))
    assert cb.bound(256, 8256) == pytest.approx(r * before, rel=1e-9)


def _long_beside_chat(budget_ms, fuse):
    """A 4000-token prompt submitted while a 10-token chat decodes; returns (engine, chat token times,
    the long prompt's time from submission to its first token)."""
    clock, eng, sch = _paced(budget_ms, fuse=fuse)
    chat, long = _req("chat", 10, 10_000), _req("long", 4000, 1)
    sch.submit(chat)
    sch.step()
    sch.step()
    t0 = clock.t
    sch.submit(long)
    _run(sch, lambda: long.done)
    t_long = clock.t - t0
    times = [e[5] for e in eng.log if e[0] == "prefill" and e[1] == 0 and e[3] == 10]
    times += [e[-1] for e in eng.log if e[0] == "decode" or (e[0] == "fused" and 0 in e[5])]
    chat.cancel()
    sch.step()
    return eng, sorted(times), t_long


@pytest.mark.parametrize("budget_ms", [20.0, 40.0])
def test_fused_steps_keep_the_budget_and_shorten_the_long_prompts_prefill(budget_ms):
    eng, times, t_fused = _long_beside_chat(budget_ms, fuse=True)
    fused = [e for e in eng.log if e[0] == "fused"]
    # while the long prompt prefills, every iteration is ONE fused call: no separate decode call, no
    # plain piece; the chat gets a token from each
    first, last = fused[0][6], fused[-1][6]
    assert fused[-1][3] == 4000 and all(e[1] == 1 and e[5] == (0,) for e in fused)
    assert not [e for e in eng.log if e[0] != "fused" and first <= e[-1] <= last]
    # every chat gap during the prefill is within the budget (exact: the script has the form CostBound
    # assumes, so its bounds are upper bounds) ...
    during = [b - a for a, b in zip(times, times[1:]) if first < b <= last]
    assert len(during) == len(fused) - 1 and max(during) <= budget_ms / 1000 + 1e-12
    # ... the pieces grow past the smallest bucket once measured (a fused 256-row piece costs 16-26 ms
    # here: it fits a 40 ms budget, not a 20 ms one), and no piece is larger than the largest that fits
    buckets = [e[4] for e in fused]
    assert 64 in buckets and (256 in buckets) == (budget_ms == 40.0)
    assert all(fused_ms(e[4], e[3], 10 + i) <= budget_ms + 1e-9 or e[4] == 16 for i, e in enumerate(fused))
    # the point of fusing: the chat's steps no longer pay a decode call's fixed cost and the pieces need
    # not leave room for one, so the long prompt's prefill takes less time than with separate calls
    _, _, t_separate = _long_beside_chat(budget_ms, fuse=False)
    assert t_fused < t_separate, (t_fused, t_separate)


def test_budget_off_fuses_one_full_piece_per_iteration():
    clock, eng, sch = _paced(0, fuse=True)
    chat, long = _req("chat", 5, 50), _req("long", 1000, 1)
    sch.submit(chat)
    sch.step()
    sch.submit(long)
    _run(sch, lambda: long.done)
    fused = [e for e in eng.log if e[0] == "fused"]
    assert [e[4] for e in fused] == [256] * 4 and all(e[5] == (0,) for e in fused)
    assert not [e for e in eng.log if e[0] == "prefill" and e[1] == 1]
    chat.cancel()
    sch.step()
