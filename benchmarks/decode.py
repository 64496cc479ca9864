"""Decode speed, Qwen2.5-7B-Instruct-1M shape, random bf16 weights, against the bytes a step must read.

    PYTHONPATH=. python3 benchmarks/decode.py --contexts 8192,131072 [--batch 1]

Bytes per step = layer weights + lm_head (V x D) + the K/V cache of every sequence up to its context;
GB/s = bytes / step time, compared with the device copy bandwidth measured in the same run. The cache is
not prefilled (its contents do not change the cost); positions are set as if it were. One engine, its
cache sized for the longest context, serves every context (attention reads only up to kv_len).
"""
from __future__ import annotations

import argparse
import time

from benchmarks.common import add_model_args, ceilings, model_from_args, layer_params, peak_memory_gib, random_params, write_json
from benchmarks.prefill import make_engine
from zenjax.engine import Engine
from zenjax.sampling import SamplingParams


def measure(engine: Engine, contexts, warm: dict, steps: int = 32) -> list[dict]:
    cfg, ec = engine.config, engine.engine_config
    slots = list(range(engine.max_batch))
    rows = []
    for ctx in contexts:
        for s in slots:      # pretend the prompt was prefilled: decode cost does not depend on cache values
            seq = engine.start(s, [1] * ctx, SamplingParams(max_new_tokens=steps + 8, seed=s))
            seq.prefilled, seq.last_token = ctx, 1
        for _ in range(3):
            engine.decode(slots)                                # compile + warm
        t = time.perf_counter()
        for _ in range(steps):
            engine.decode(slots)
        dt = (time.perf_counter() - t) / steps
        for s in slots:
            engine.release(s)
        itemsize = 1 if "float8" in ec.cache_dtype else 2
        kv = 2 * cfg.num_layers * len(slots) * ctx * cfg.num_kv_heads * cfg.head_dim * itemsize
        by = 2 * layer_params(cfg) + 2 * cfg.vocab_size * cfg.hidden_size + kv
        row = dict(context=ctx, batch=len(slots), cache_len=engine.cache_len, dca=cfg.dca is not None,
                   attention=ec.attention, cache_dtype=ec.cache_dtype, ms_per_step=round(dt * 1e3, 2),
                   tokens_per_s=round(len(slots) / dt, 1), gbs=round(by / dt / 1e9, 1),
                   pct_copy_bw=round(100 * by / dt / 1e12 / warm["copy_tbs"], 1), peak_gib=round(peak_memory_gib(), 2))
        print(row, flush=True)
        rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--contexts", default="8192,131072")
    ap.add_argument("--batch", type=int, default=1)
    add_model_args(ap)
    a = ap.parse_args(argv)
    cfg, attention = model_from_args(a)
    warm = ceilings(small=a.smoke)
    contexts = [int(x) for x in a.contexts.split(",")]
    engine = make_engine(cfg, random_params(cfg), max(contexts) + 64, 256, attention, a.cache_dtype, a.batch)
    rows = measure(engine, contexts, warm)
    write_json(f"decode{'_dca' if a.dca else ''}_b{a.batch}.json", {"ceilings": warm, "rows": rows})


if __name__ == "__main__":
    main()
