"""benchmarks/pacing_sim.py on a small scenario (a 32K prompt and a chat started with it, the plain H200
cost model, budget 100 ms): the real Scheduler on a fake clock, so every number is exact arithmetic on
the cost script (deterministic, ~0.1 s of CPU)."""
from __future__ import annotations

import benchmarks.pacing_sim as sim
from zenjax.serve.pacing import FIT_MARGIN

T, G = 32768, 0.100                     # prompt tokens, inter-token budget (s)


def _run(chat_at):
    return sim.simulate("plain", sim.NEW_BUCKETS, long=T, chat_at=chat_at, max_itl_ms=1000 * G)


def test_sim_keeps_the_chat_within_the_budget_and_the_long_prompt_close_to_alone():
    alone, along = _run(None), _run(0.0)
    assert along == _run(0.0)                                          # deterministic (fake clock)
    # ITL: every gap of the chat's stream (prefill pieces + one decode call) within the budget (1e-9 ms: the
    # sums are floats of exact script costs)
    assert along["itl_max_ms"] <= 1000 * G + 1e-9, along
    # the prefill work alongside is the work alone + c0 per extra piece: in the plain model matmul (T * a)
    # and causal attention (b * B * (E - B / 2) = b * sum of (p + 1/2) over the piece's rows p) do not
    # depend on how the prompt is cut, and every piece here is exactly its bucket (T and the buckets are
    # multiples of 256)
    n_alone, n_along = sum(alone["pieces"].values()), sum(along["pieces"].values())
    w_alone = alone["ttft_s"]                                          # alone: nothing but prefill pieces
    w_along = w_alone + (n_along - n_alone) * sim.C0
    # TTFT bound: after the chat's first decode call (at t_c, when the long prompt's first 8192 piece
    # w_0 and the chat's own piece have run), every gap but the last holds >= G * f of prefill: the
    # scheduler stops adding pieces only when the smallest piece's estimate (<= FIT_MARGIN x its cost,
    # <= t(256, T)) exceeds what is left after the decode estimate (<= FIT_MARGIN x d(1, T + 456)); so
    # the gaps number <= (w_along - w_0) / (G f) + 1 and TTFT <= t_c + (w_along - w_0) / f + G
    f = 1 - FIT_MARGIN * (sim.decode_cost(1, T + 456) + sim.plain_prefill(256, T)) / G
    w_0 = sim.plain_prefill(8192, 8192)
    t_c = w_0 + sim.plain_prefill(256, 200) + sim.decode_cost(1, 200)
    bound = t_c + (w_along - w_0) / f + G
    assert along["ttft_s"] <= bound, (along["ttft_s"], bound)
    assert bound / w_alone < 1.4                                       # the bound itself is not vacuous
    # the new buckets are all used: the largest piece that fits, not a fall from 2048 to 256
    assert {512, 1024, 2048} <= set(along["pieces"]), along["pieces"]


def test_sim_old_buckets_take_longer_than_new_ones():
    # the 128K figures are in benchmarks/pacing_sim.py; at 32K the old 256/2048/8192 set spends the end of
    # each gap on 256-token pieces (c0 each) where the new set takes one 512 or 1024 piece
    old = sim.simulate("plain", sim.OLD_BUCKETS, long=T, chat_at=0.0, max_itl_ms=1000 * G)
    new = _run(0.0)
    assert new["ttft_s"] < old["ttft_s"] and old["itl_max_ms"] <= 1000 * G + 1e-9


def test_sim_fused_decode_step_keeps_the_budget_and_shortens_the_ttft():
    # one fused call per iteration: the gap is that call, bounded within the budget like the separate
    # calls' sum; the long prompt's prefill no longer pays a decode call's weight read per chat token
    fused = sim.simulate("plain", sim.NEW_BUCKETS, long=T, chat_at=0.0, max_itl_ms=1000 * G, fused=True)
    separate = _run(0.0)
    assert fused["itl_max_ms"] <= 1000 * G + 1e-9, fused
    assert fused["ttft_s"] < separate["ttft_s"], (fused, separate)


def test_sim_fine_buckets_fill_the_gaps_better_than_powers_of_two():
    # at the H100's per-call cost (c0 = 13 ms, which reproduces its measured fused ratio at 128K) a 1536 or
    # 768 piece fills the end of a gap that powers of two leave to a 1024 or 512 piece: fewer pieces, each
    # paying c0, and the budget still holds
    was = sim.C0
    try:
        sim.C0 = 13e-3
        kw = dict(long=T, chat_at=0.0, max_itl_ms=1000 * G, fused=True)
        pow2, fine = sim.simulate("grid", sim.NEW_BUCKETS, **kw), sim.simulate("grid", sim.FINE_BUCKETS, **kw)
    finally:
        sim.C0 = was
    assert fine["itl_max_ms"] <= 1000 * G + 1e-9, fine
    assert sum(fine["pieces"].values()) < sum(pow2["pieces"].values()), (fine, pow2)
    assert fine["ttft_s"] < pow2["ttft_s"], (fine, pow2)
