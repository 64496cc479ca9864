"""Where a decode step's time goes: the GPU kernels of a few decode calls, from a JAX profiler trace.

    PYTHONPATH=. python3 benchmarks/profile_decode.py [--context 8192] [--calls 4] [--dca --attention pallas]

Builds the engine of benchmarks/decode.py (Qwen2.5-7B-1M shape, random weights, batch 1), warms it, traces
`calls` decode calls of engine.decode_block steps with jax.profiler (create_perfetto_trace=True writes a
Chrome-trace JSON next to the XPlane), and reads that JSON here: per GPU kernel name its count and total
time per decode step, the sum of kernel time per step against the step's wall time (the difference is
launch gaps and idle GPU), sorted so the top rows say what to fuse or speed up. The trace files go under
$OUT/profile_decode/ for a closer look in Perfetto.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import time

import jax

from benchmarks.common import add_model_args, model_from_args, random_params, trace_dir, write_json
from benchmarks.prefill import make_engine
from zenjax.sampling import SamplingParams


def _table(events, keep, steps):
    per = collections.defaultdict(lambda: [0, 0.0])
    span = [float("inf"), 0.0]
    for e in events:
        if e.get("ph") != "X" or not keep(e):
            continue
        name = re.sub(r"\d+", "#", e["name"])[:90]            # fusion.123 -> fusion.#: one row per kind
        per[name][0] += 1
        per[name][1] += float(e.get("dur", 0))
        span = [min(span[0], float(e["ts"])), max(span[1], float(e["ts"]) + float(e.get("dur", 0)))]
    rows = sorted(({"name": k, "per_step": round(c / steps, 2), "us_per_step": round(t / steps, 1)}
                   for k, (c, t) in per.items()), key=lambda r: -r["us_per_step"])
    return {"count_per_step": round(sum(c for c, _ in per.values()) / steps, 1),
            "busy_us_per_step": round(sum(t for _, t in per.values()) / steps, 1),
            "span_us_per_step": round((span[1] - span[0]) / steps, 1) if per else None, "rows": rows[:40]}


def kernel_table(trace_path: str, steps: int) -> dict:
    """Chrome-trace JSON -> per GPU stream kernel name and per XLA op (the device's "XLA Ops" line, when
    the trace has one): count and microseconds per decode step, and the busy total per step."""
    with gzip.open(trace_path) if trace_path.endswith(".gz") else open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    meta = [e for e in events if e.get("ph") == "M"]
    pname = {e["pid"]: e["args"]["name"] for e in meta if e.get("name") == "process_name"}
    tname = {(e["pid"], e["tid"]): e["args"]["name"] for e in meta if e.get("name") == "thread_name"}
    gpu = {p for p, n in pname.items() if re.search(r"/device:GPU:\d", n)}
    on = lambda e, pat: e["pid"] in gpu and re.search(pat, tname.get((e["pid"], e["tid"]), ""))
    return {"gpu_processes": [pname[p] for p in gpu],
            "gpu_threads": sorted({n for (p, _), n in tname.items() if p in gpu}),
            "kernels": _table(events, lambda e: on(e, r"^Stream"), steps),
            "xla_ops": _table(events, lambda e: on(e, r"XLA Ops"), steps)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--calls", type=int, default=4)
    add_model_args(ap)
    a = ap.parse_args(argv)
    cfg, attention = model_from_args(a)
    engine = make_engine(cfg, random_params(cfg), a.context + 256, 8192, attention, a.cache_dtype, 1)
    n = engine.decode_block
    engine.start(0, [1] * 8, SamplingParams(max_new_tokens=(a.calls + 3) * n + 4, seed=0, ignore_eos=True))
    engine.assume_prefilled(0, a.context)
    engine.decode_steps([0], n)                                   # compile + warm
    engine.decode_steps([0], n)
    logdir = trace_dir("profile_decode")
    t0 = time.perf_counter()
    with jax.profiler.trace(logdir, create_perfetto_trace=True):
        for _ in range(a.calls):
            engine.decode_steps([0], n)
    wall = (time.perf_counter() - t0) / (a.calls * n)
    found = sorted(glob.glob(os.path.join(logdir, "**", "perfetto_trace.json*"), recursive=True))
    out = {"context": a.context, "steps": a.calls * n, "wall_ms_per_step_traced": round(wall * 1e3, 3), "traces": found}
    if found:
        out.update(kernel_table(found[-1], a.calls * n))
    write_json("profile_decode.json", out)
    for part in ("kernels", "xla_ops"):
        if part in out:
            print(part, {k: v for k, v in out[part].items() if k != "rows"})
            for r in out[part]["rows"][:25]:
                print(f"{r['us_per_step']:>9.1f} us {r['per_step']:>6.1f}x  {r['name']}")
    print({k: v for k, v in out.items() if k not in ("kernels", "xla_ops")})


if __name__ == "__main__":
    main()
