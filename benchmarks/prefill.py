"""Time to first token of chunked prefill, Qwen2.5-7B-Instruct-1M shape, random bf16 weights, batch 1.

    PYTHONPATH=. python3 benchmarks/prefill.py --lengths 8192,32768,131072 [--dca] [--chunk 8192]

One engine (cache sized for the longest prompt, so the step compiles once) serves every length.
FLOPs counted as the plain-JAX baseline does (shared/bench/baseline_7b.py): 2 * layer_params * T
+ layers * 2 * T^2 * N * H (causal attention), against the matmul rate measured in the same run.
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from benchmarks.common import add_model_args, ceilings, model_from_args, layer_params, peak_memory_gib, random_params, write_json
from zenjax.config import engine_config
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


def make_engine(cfg, params, max_len: int, chunk: int, attention: str, cache_dtype: str, batch: int = 1):
    ec = engine_config(max_model_len=max_len, prefill_chunk=chunk, max_batch=batch, attention=attention,
                       dtype="bfloat16", cache_dtype=cache_dtype, platform="any")
    return Engine(cfg, params, ec)


def measure(engine: Engine, lengths, warm: dict, on_row=None) -> list[dict]:
    """TTFT rows for each length; the warm-up (one prompt per prefill bucket: compiles every step size a
    length can use, e.g. a DCA boundary's short piece) is timed as warmup_s.
    on_row(rows) is called after each length, so a long run that is cut off keeps what it measured."""
    cfg, ec = engine.config, engine.engine_config
    warmup = sum(ttft(engine, [1] * min(b, ec.max_model_len - 1)) for b in engine.runner.buckets)
    print(f"warm-up (compile + one prompt per prefill bucket {engine.runner.buckets}): {warmup:.1f} s", flush=True)
    rows = []
    for L in lengths:
        ids = list(np.random.RandomState(L).randint(0, cfg.vocab_size, L))
        t = ttft(engine, ids)
        flops = 2 * layer_params(cfg) * L + cfg.num_layers * 2 * L * L * cfg.num_heads * cfg.head_dim
        tf = flops / t / 1e12
        row = dict(tokens=L, chunk=ec.prefill_chunk, cache_len=engine.cache_len, dca=cfg.dca is not None,
                   attention=ec.attention, cache_dtype=ec.cache_dtype, ttft_s=round(t, 3), tflops=round(tf, 1),
                   pct_matmul=round(100 * tf / warm["matmul_tflops"], 1), peak_gib=round(peak_memory_gib(), 2),
                   warmup_s=round(warmup, 1))
        print(row, flush=True)
        rows.append(row)
        if on_row is not None:
            on_row(rows)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lengths", default="8192,32768,131072")
    ap.add_argument("--chunk", type=int, default=8192)
    add_model_args(ap)
    a = ap.parse_args(argv)
    cfg, attention = model_from_args(a)
    warm = ceilings(small=a.smoke)
    lengths = [int(x) for x in a.lengths.split(",")]
    engine = make_engine(cfg, random_params(cfg), max(lengths) + 256, a.chunk, attention, a.cache_dtype)
    name = f"prefill{'_dca' if a.dca else ''}_{attention}_{a.cache_dtype}.json"
    info = {"device": jax.devices()[0].device_kind, "ceilings": warm}
    rows = measure(engine, lengths, warm, on_row=lambda rows: write_json(name, dict(info, rows=rows)))
    write_json(name, dict(info, rows=rows))


if __name__ == "__main__":
    main()
