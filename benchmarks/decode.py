"""Decode speed, Qwen2.5-7B-Instruct-1M shape, random bf16 weights, against the bytes a step must read.

    PYTHONPATH=. python3 benchmarks/decode.py --contexts 8192,131072 [--batch 1] [--dca --attention pallas]
    PYTHONPATH=. python3 benchmarks/decode.py --contexts 8192,131072,1048576 --batch 1 --batch8 8192 ...

Bytes per step = layer weights + lm_head (V x D) + the K/V cache of every sequence up to its context
(an e4m3 cache: 1 byte per element + a float32 scale per token and kv head);
TB/s = bytes / step time, reported as % of the copy bandwidth measured in the same run (common.ceilings:
the best of several copies, see there) and of the datasheet. The cache is not prefilled (its contents do
not change the cost): `engine.assume_prefilled` sets the positions as if it were. One engine, its cache
sized for the longest context, serves every context (attention reads only up to kv_len).

Two ways per context: `one_step` = one device call per token with the host reading each token before the
next call (the engine's old decode loop); `block` = calls of engine.decode_block steps, the next call
dispatched before the previous one's tokens are read (what Engine.stream does).
"""
from __future__ import annotations

import argparse
import gc
import time

from benchmarks.common import add_model_args, ceilings, model_from_args, layer_params, peak_memory_gib, random_params, write_json
from benchmarks.prefill import make_engine, ttft
from zenjax.engine import Engine
from zenjax.sampling import SamplingParams


def _time_one_step(engine: Engine, slots, steps: int) -> float:
    for _ in range(2):
        engine.decode(slots)                                    # compile + warm
    t = time.perf_counter()
    for _ in range(steps):
        engine.decode(slots)
    return (time.perf_counter() - t) / steps


def _time_blocks(engine: Engine, slots, calls: int) -> float:
    n = engine.decode_block
    engine.decode_steps(slots, n)                               # warm
    t = time.perf_counter()
    pending = engine.decode_launch(slots, n)
    for _ in range(calls - 1):
        ahead = engine.decode_launch(slots, n)
        got = engine.decode_collect(pending)
        assert all(len(got[s]) == n for s in slots), "a slot stopped early: the timing would be wrong"
        pending = ahead
    engine.decode_collect(pending)
    return (time.perf_counter() - t) / (calls * n)


def measure(engine: Engine, contexts, warm: dict, steps: int = 32, calls: int = 8,
            linear_bytes: int = 2) -> list[dict]:
    """Decode rows per context. linear_bytes: bytes per decoder-layer weight element a step reads (2 for
    bf16; 1 for fp8 weights, whose float32 per-channel scales add < 0.1% and are left out); embeddings
    and lm_head are counted at 2 bytes."""
    cfg, ec = engine.config, engine.engine_config
    slots = list(range(engine.max_batch))
    rows = []
    for ctx in contexts:
        try:
            per = {}
            for mode in ("one_step", "block"):
                need = (steps + 4) if mode == "one_step" else (calls + 1) * engine.decode_block + 4
                for s in slots:
                    engine.start(s, [1] * min(ctx, 8), SamplingParams(max_new_tokens=need + 1, seed=s,
                                                                      ignore_eos=True))
                    engine.assume_prefilled(s, ctx)
                per[mode] = (_time_one_step(engine, slots, steps) if mode == "one_step"
                             else _time_blocks(engine, slots, calls))
                for s in slots:
                    engine.release(s)
        except Exception as e:  # e.g. out of memory at 1M: keep the other rows
            print(f"context {ctx} failed: {e!r}"[:600], flush=True)
            rows.append(dict(context=ctx, batch=len(slots), error=repr(e)[:400]))
            for s in slots:
                engine.release(s)
            continue
        fp8 = "float8" in ec.cache_dtype           # e4m3 values + one float32 scale per (token, kv head)
        per_head = cfg.head_dim + 4 if fp8 else 2 * cfg.head_dim
        kv = 2 * cfg.num_layers * len(slots) * ctx * cfg.num_kv_heads * per_head
        by = linear_bytes * layer_params(cfg) + 2 * cfg.vocab_size * cfg.hidden_size + kv
        dt = per["block"]
        row = dict(context=ctx, batch=len(slots), cache_len=engine.cache_len, dca=cfg.dca is not None,
                   attention=ec.attention, cache_dtype=ec.cache_dtype, decode_block=engine.decode_block,
                   ms_per_step=round(dt * 1e3, 3), tokens_per_s=round(len(slots) / dt, 1),
                   ms_per_step_one_step=round(per["one_step"] * 1e3, 3), gb_per_step=round(by / 1e9, 2),
                   tbs=round(by / dt / 1e12, 3), floor_ms_at_copy=round(by / warm["copy_tbs"] / 1e9, 3),
                   pct_copy_bw=round(100 * by / dt / 1e12 / warm["copy_tbs"], 1),
                   pct_datasheet=(round(100 * by / dt / 1e12 / warm["datasheet_tbs"], 1)
                                  if warm.get("datasheet_tbs") else None),
                   peak_gib=round(peak_memory_gib(), 2))
        print(row, flush=True)
        rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--contexts", default="8192,131072")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--batch8", default="", help="contexts for a second engine of batch 8 (run first)")
    ap.add_argument("--fp8", default="", help="contexts for a last engine of batch 1 with an e4m3 cache")
    ap.add_argument("--ttft", default="", help="prompt lengths: time to first token on the batch-1 engine "
                    "(prefill_chunk 8192, so a short prompt shows its prefill bucket)")
    add_model_args(ap)
    a = ap.parse_args(argv)
    cfg, attention = model_from_args(a)
    warm = ceilings(small=a.smoke)
    print(warm, flush=True)
    params = random_params(cfg)
    out = {"ceilings": warm, "rows": []}
    ints = lambda s: [int(x) for x in s.split(",") if x]
    runs = (([(8, ints(a.batch8), a.cache_dtype)] if a.batch8 else []) + [(a.batch, ints(a.contexts), a.cache_dtype)]
            + ([(1, ints(a.fp8), "float8_e4m3fn")] if a.fp8 else []))
    for run, (batch, contexts, cache_dtype) in enumerate(runs):
        try:
            engine = make_engine(cfg, params, max(contexts) + 256, 8192, attention, cache_dtype, batch)
        except Exception as e:  # e.g. out of memory: keep the other engines' rows
            print(f"engine batch {batch} {cache_dtype} failed: {e!r}"[:600], flush=True)
            out["rows"].append(dict(batch=batch, cache_dtype=cache_dtype, error=repr(e)[:400]))
            continue
        out["rows"] += measure(engine, contexts, warm)
        write_json(f"decode{'_dca' if a.dca else ''}_b{a.batch}.json", out)
        if run == len(runs) - 1 - bool(a.fp8) and a.ttft:
            out["ttft"] = []
            for L in (L for L in ints(a.ttft) if L < engine.engine_config.max_model_len):
                ids = [1 + i % (cfg.vocab_size - 1) for i in range(L)]
                first = ttft(engine, ids)                       # compiles this length's bucket
                row = dict(tokens=L, bucket=next(b for b in engine.runner.buckets if b >= min(L, 8192)),
                           ttft_s=round(ttft(engine, ids), 4), first_call_s=round(first, 2))
                print(row, flush=True)
                out["ttft"].append(row)
            write_json(f"decode{'_dca' if a.dca else ''}_b{a.batch}.json", out)
        del engine
        gc.collect()


if __name__ == "__main__":
    main()
