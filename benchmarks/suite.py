"""All end-to-end GPU figures in one process (weights made once, ceilings measured once):

    PYTHONPATH=. python3 benchmarks/suite.py [--prefill 8192,32768,131072] [--decode 8192,131072]
                                             [--dca-prefill 131072,262144] [--attention cudnn]

Writes suite.json under $OUT and prints one table. Each part is also runnable alone (prefill.py, decode.py).
"""
from __future__ import annotations

import argparse
import time

from benchmarks import decode, prefill
from benchmarks.common import QWEN25_7B_1M, SMOKE, ceilings, random_params, write_json


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prefill", default="8192,32768,131072")
    ap.add_argument("--decode", default="8192,131072")
    ap.add_argument("--dca-prefill", default="131072,262144")
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--attention", default="cudnn")
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args(argv)
    ints = lambda s: [int(x) for x in s.split(",") if x]
    if a.smoke:
        prefill.QWEN25_7B_1M = decode.QWEN25_7B_1M = SMOKE
        a.attention = "reference"
    cfg = prefill.QWEN25_7B_1M
    t0 = time.perf_counter()
    warm = ceilings(small=a.smoke)
    print(warm, flush=True)
    params = random_params(cfg)
    out = {"ceilings": warm, "prefill": [], "decode": [], "dca_prefill": []}
    sections = [("prefill", lambda: prefill.run(ints(a.prefill), a.chunk, None, a.attention, "bfloat16", warm, params)),
                ("decode", lambda: decode.run(ints(a.decode), 1, False, a.attention, "bfloat16", warm, params=params)),
                ("dca_prefill", lambda: prefill.run(ints(a.dca_prefill), a.chunk, cfg.dca, a.attention, "bfloat16",
                                                    warm, params))]
    for name, fn in sections:
        try:
            out[name] = fn()
        except Exception as e:  # keep the other sections' figures; report the failure
            out[name] = [{"error": repr(e)[:500]}]
            print(name, "failed:", repr(e)[:500], flush=True)
        write_json("suite.json", out)
    print(f"suite done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
