"""All end-to-end GPU figures in one process (weights made once, ceilings measured once, two engines):

    PYTHONPATH=. python3 benchmarks/suite.py [--prefill 8192,32768,131072] [--decode 8192,131072]
                                             [--dca-prefill 131072] [--attention cudnn] [--smoke]

Dense engine: cache sized for the longest prefill/decode length; prefill rows then decode rows.
DCA engine (Qwen2.5-1M's c=262144, w=8192): prefill rows. Writes suite.json under $OUT after each part.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import time

from benchmarks import common, decode, prefill
from benchmarks.common import ceilings, random_params, write_json


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prefill", default="8192,32768,131072")
    ap.add_argument("--decode", default="8192,131072")
    ap.add_argument("--dca-prefill", default="131072")
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--attention", default="cudnn")
    ap.add_argument("--cache-dtype", default="bfloat16")
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args(argv)
    ints = lambda s: [int(x) for x in s.split(",") if x]
    cfg = common.SMOKE if a.smoke else common.QWEN25_7B_1M
    attention = "reference" if a.smoke else a.attention
    t0 = time.perf_counter()
    warm = ceilings(small=a.smoke)
    print(warm, flush=True)
    params = random_params(cfg)
    out = {"ceilings": warm, "prefill": [], "decode": [], "dca_prefill": []}
    dense = dataclasses.replace(cfg, dca=None)

    def run_dense():
        lens = ints(a.prefill) + ints(a.decode)
        eng = prefill.make_engine(dense, params, max(lens) + 256, a.chunk, attention, a.cache_dtype)
        out["prefill"] = prefill.measure(eng, ints(a.prefill), warm) if a.prefill else []
        write_json("suite.json", out)
        out["decode"] = decode.measure(eng, ints(a.decode), warm) if a.decode else []

    def run_dca():
        eng = prefill.make_engine(cfg, params, max(ints(a.dca_prefill)) + 256, a.chunk, attention, a.cache_dtype)
        out["dca_prefill"] = prefill.measure(eng, ints(a.dca_prefill), warm)

    for name, fn in (("dense", run_dense), ("dca", run_dca)):
        if name == "dca" and not a.dca_prefill:
            continue
        try:
            fn()
        except Exception as e:  # keep the other part's figures; report the failure
            out[f"{name}_error"] = repr(e)[:800]
            print(name, "failed:", repr(e)[:800], flush=True)
        gc.collect()
        write_json("suite.json", out)
    print(f"suite done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
