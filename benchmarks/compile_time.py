"""Where the 7B prefill step's compile time goes: per-layer cost of each attention impl, on the GPU.

    PYTHONPATH=. python3 benchmarks/compile_time.py --layers 1,4 --impls cudnn-dca,cudnn,pallas-dca

Written because session 1 blamed ~3 minutes of compile on the 28-layer unrolled prefill step, which
decides whether a 1M-token prompt (~400 s of prefill) fits in one 600 s device call. Answer (H100,
2026-11-23): no per-layer cost (5.9 s at 1 layer, 5.4 s at 3, cuDNN DCA), the full 28-layer step ~11 s;
the 3 minutes were the benchmarks' old one-jit random-weight generator. For each impl and layer count this builds an engine with the
Qwen2.5-7B shape truncated to L layers (random weights), times the first 8K-token prefill (compile + run)
and a second one (run), and reports compile = first - second. The slope over L is the per-layer cost:
    per_layer = (compile(L2) - compile(L1)) / (L2 - L1);  28-layer estimate = compile(L1) + (28-L1) * slope
XLA flags (e.g. --xla_gpu_autotune_level=0) are process-wide: run the script once per flag set.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import os

from benchmarks.common import QWEN25_7B_1M, random_params, write_json
from benchmarks.prefill import make_engine, ttft


def measure(impl: str, layers: int, max_len: int, chunk: int) -> dict:
    attention, dca = impl.split("-")[0], impl.endswith("-dca")
    cfg = dataclasses.replace(QWEN25_7B_1M, num_layers=layers, dca=QWEN25_7B_1M.dca if dca else None)
    params = random_params(cfg)
    eng = make_engine(cfg, params, max_len, chunk, attention, "bfloat16")
    ids = list(range(1, chunk + 1))
    first = ttft(eng, ids)
    second = ttft(eng, ids)
    row = dict(impl=impl, layers=layers, first_s=round(first, 2), run_s=round(second, 3),
               compile_s=round(first - second, 2))
    print(row, flush=True)
    del eng, params
    gc.collect()
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", default="1,4")
    ap.add_argument("--impls", default="cudnn-dca,cudnn,pallas-dca")
    ap.add_argument("--max-len", type=int, default=32768)
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--tag", default="default")
    a = ap.parse_args(argv)
    Ls = [int(x) for x in a.layers.split(",")]
    rows = []
    for impl in a.impls.split(","):
        for L in Ls:
            try:
                rows.append(measure(impl, L, a.max_len, a.chunk))
            except Exception as e:           # one impl failing must not hide the others
                rows.append(dict(impl=impl, layers=L, error=repr(e)[:600]))
                print(rows[-1], flush=True)
        done = [r for r in rows if r["impl"] == impl and "compile_s" in r]
        if len(done) >= 2:
            (r1, r2) = done[0], done[-1]
            slope = (r2["compile_s"] - r1["compile_s"]) / (r2["layers"] - r1["layers"])
            est = r1["compile_s"] + (28 - r1["layers"]) * slope
            rows.append(dict(impl=impl, per_layer_s=round(slope, 2), est_28_layers_s=round(est, 1)))
            print(rows[-1], flush=True)
    write_json(f"compile_time_{a.tag}.json", {"xla_flags": os.environ.get("XLA_FLAGS", ""), "rows": rows})


if __name__ == "__main__":
    main()
