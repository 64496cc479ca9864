"""Where a prefill piece's fixed cost goes (issue #12): wall time of one piece, alone and fused with a chat's
decode step, per bucket and at a short and a long context, and a profiler table of a few fused calls.

    PYTHONPATH=. python3 benchmarks/profile_piece.py [--sizes 256,512,1024,2048] [--long 131072]
    PYTHONPATH=. python3 benchmarks/profile_piece.py --tiny          # CPU check that it runs

The engine is serve_latency.py's (Qwen2.5-7B-1M shape, random bf16 weights, DCA, pallas attention,
max_model_len = long + 1024, 4 slots): slot 0 prefills, slot 1 decodes a 200-token chat. For each size b
and each context E (the piece's start: 2048, and long - (calls + 5) * b so the pieces stay in the cache),
the median of `--calls` calls of: the piece alone (engine.prefill_next), the piece fused with slot 1's
decode step (engine.prefill_and_decode), and slot 1's decode step alone. In the model
t(b, E) = c0 + b * (a_b + beta * E), c0 is the per-call cost that no matmul row pays for; the fused times
at the short context of the smallest and largest size give a line whose intercept estimates it
(`fit_short_fused`). The slot's position is set without running the earlier pieces (costs do not depend
on the cache's values).
Then `--trace` fused calls of `--trace-size` rows at the short context go through jax.profiler, and the
per-kernel table (profile_decode.kernel_table) says what the call spends beyond the matmuls.
"""
from __future__ import annotations

import argparse
import glob
import os
import statistics
import time

import jax

from benchmarks.common import trace_dir, write_json
from benchmarks.profile_decode import kernel_table
from benchmarks.serve_latency import build_engine
from zenjax.sampling import SamplingParams


def place(engine, slot: int, start: int, size: int, calls: int) -> None:
    """Slot `slot` holds a prompt of start + calls * size tokens, of which `start` count as prefilled."""
    engine.release(slot, keep=False)
    engine.start(slot, [1] * (start + calls * size), SamplingParams(max_new_tokens=1, ignore_eos=True))
    engine.sequence(slot).prefilled = start


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="256,512,1024,2048")
    ap.add_argument("--long", type=int, default=131072)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--trace", type=int, default=3)
    ap.add_argument("--trace-size", type=int, default=512)
    ap.add_argument("--attention", default="pallas")
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args(argv)
    a.chunk = 8192
    if a.tiny:
        a.long, a.sizes = 8192, "256,512"
    engine = build_engine(a)                              # serve_latency's engine
    sizes = [int(s) for s in a.sizes.split(",")]
    chat = 1
    engine.start(chat, [1] * 200, SamplingParams(max_new_tokens=10**6, ignore_eos=True))
    while engine.prefill_next(chat) is None:
        pass
    rows, short = [], []
    for b in sizes:
        for i, start in enumerate((2048, a.long - (a.calls + 5) * b)):
            start = max(0, start) // b * b
            n = a.calls + 1                               # + 1 warm (compile) call, not counted
            place(engine, 0, start, b, n)
            alone = [timed(lambda: engine.prefill_next(0, b)) for _ in range(n)][1:]
            place(engine, 0, start, b, n)
            fused = [timed(lambda: engine.prefill_and_decode(0, [chat], b)) for _ in range(n)][1:]
            engine.release(0, keep=False)
            step = [timed(lambda: engine.decode_steps([chat], 1)) for _ in range(n)][1:]
            row = dict(size=b, start=start, alone_ms=round(statistics.median(alone) * 1e3, 2),
                       fused_ms=round(statistics.median(fused) * 1e3, 2),
                       decode_ms=round(statistics.median(step) * 1e3, 2))
            print(row, flush=True)
            rows.append(row)
            if i == 0:
                short.append((b, row["fused_ms"]))
    out = {"long": a.long, "cache_len": engine.cache_len, "rows": rows,
           "trace_counts": dict(engine.trace_counts)}     # one per step and size: no call recompiled
    print("trace_counts", out["trace_counts"], flush=True)
    # c0 per size from its two contexts is not identifiable (one line per size); across sizes at the
    # short context, t = c0 + b * a fits c0 (a: per-row cost, assumed equal across these sizes: an upper
    # bound on c0's share when small pieces are less efficient per row)
    if len(short) >= 2:
        (b0, t0), (b1, t1) = min(short), max(short)
        per_row = (t1 - t0) / (b1 - b0)
        out["fit_short_fused"] = dict(per_row_us=round(per_row * 1e3, 2), c0_ms=round(t0 - b0 * per_row, 2))
        print("short-context fused fit:", out["fit_short_fused"], flush=True)
    if a.trace:
        b = a.trace_size if a.trace_size in sizes else sizes[0]
        place(engine, 0, 2048 // b * b, b, a.trace + 1)
        engine.prefill_and_decode(0, [chat], b)
        logdir = trace_dir("profile_piece")
        t0 = time.perf_counter()
        with jax.profiler.trace(logdir, create_perfetto_trace=True):
            for _ in range(a.trace):
                engine.prefill_and_decode(0, [chat], b)
        out["trace_size"], out["wall_ms_per_call_traced"] = b, round((time.perf_counter() - t0) / a.trace * 1e3, 2)
        found = sorted(glob.glob(os.path.join(logdir, "**", "perfetto_trace.json*"), recursive=True))
        if found:
            out.update(kernel_table(found[-1], a.trace))
            for part in ("kernels", "xla_ops"):
                print(part, {k: v for k, v in out[part].items() if k != "rows"})
                for r in out[part]["rows"][:25]:
                    print(f"{r['us_per_step']:>9.1f} us {r['per_step']:>6.1f}x  {r['name']}")
    write_json("profile_piece.json", out, echo=False)


if __name__ == "__main__":
    main()
