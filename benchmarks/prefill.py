"""Time to first token of chunked prefill, Qwen2.5-7B-Instruct-1M shape, random bf16 weights, batch 1.

    PYTHONPATH=. python3 benchmarks/prefill.py --lengths 8192,32768,131072 [--dca] [--chunk 8192]

FLOPs counted as the plain-JAX baseline does (shared/bench/baseline_7b.py): 2 * layer_params * T
+ layers * 2 * T^2 * N * H (causal attention), against the matmul rate measured in the same run.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from benchmarks.common import QWEN25_7B_1M, SMOKE, ceilings, layer_params, peak_memory_gib, random_params, write_json
from zenjax.config import DCAConfig, engine_config
from zenjax.engine import Engine
from zenjax.sampling import SamplingParams


def ttft(engine: Engine, ids) -> float:
    t = time.perf_counter()
    engine.start(0, ids, SamplingParams(max_new_tokens=1, seed=0))
    token = None
    while token is None:
        token = engine.prefill_next(0)
    engine.release(0)
    return time.perf_counter() - t


def run(lengths, chunk: int, dca: DCAConfig | None, attention: str, cache_dtype: str, warm: dict,
        params=None) -> list[dict]:
    cfg = dataclasses.replace(QWEN25_7B_1M, dca=dca)
    params = params if params is not None else random_params(cfg)
    rows = []
    for L in lengths:
        ec = engine_config(max_model_len=L + 256, prefill_chunk=chunk, max_batch=1, attention=attention,
                           dtype="bfloat16", cache_dtype=cache_dtype, platform="any")
        engine = Engine(cfg, params, ec)
        ids = list(np.random.RandomState(L).randint(0, cfg.vocab_size, L))
        ttft(engine, ids[: min(L, chunk)])                    # compile (one chunk)
        t = ttft(engine, ids)
        flops = 2 * layer_params(cfg) * L + cfg.num_layers * 2 * L * L * cfg.num_heads * cfg.head_dim
        tf = flops / t / 1e12
        row = dict(tokens=L, chunk=chunk, dca=bool(dca), attention=attention, cache_dtype=cache_dtype,
                   ttft_s=round(t, 3), tflops=round(tf, 1), pct_matmul=round(100 * tf / warm["matmul_tflops"], 1),
                   peak_gib=round(peak_memory_gib(), 2))
        print(row, flush=True)
        rows.append(row)
        del engine
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lengths", default="8192,32768,131072")
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--dca", action="store_true", help="DCA on (Qwen2.5-1M config: c=262144, w=8192)")
    ap.add_argument("--attention", default="cudnn")
    ap.add_argument("--cache-dtype", default="bfloat16")
    ap.add_argument("--smoke", action="store_true", help="tiny model on any backend: checks the script runs")
    a = ap.parse_args(argv)
    global QWEN25_7B_1M
    if a.smoke:
        QWEN25_7B_1M, a.attention = SMOKE, "reference"
    warm = ceilings(small=a.smoke)
    print(warm, flush=True)
    rows = run([int(x) for x in a.lengths.split(",")], a.chunk, QWEN25_7B_1M.dca if a.dca else None,
               a.attention, a.cache_dtype, warm)
    write_json(f"prefill{'_dca' if a.dca else ''}.json", {"ceilings": warm, "rows": rows})


if __name__ == "__main__":
    main()
