"""End-to-end TTFT with sparse prefill on vs off, Qwen2.5-7B-Instruct-1M shape, random bf16 weights, DCA,
Pallas attention, batch 1 (issue #10 "end to end").

    PYTHONPATH=. python3 benchmarks/sparse_e2e.py --runs off:131072,vs:131072,a_shape:131072,a_shape:1048576 \
        --chunk 65536 [--smoke]

A run is MODE:LENGTH; one engine per mode (built when its first run comes, freed before the next mode),
its cache sized for the longest length of any run, prefill_chunk = --chunk (Qwen's recipe uses 128K-token
chunks; each piece costs one estimation per layer, so fewer, larger pieces amortize it). Modes:
  off      dense DCA prefill (the Mosaic GPU DCA kernel).
  vs       Qwen's 7B per-head budget file (benchmarks/data/), vertical-slash, indices estimated online per
           piece and layer. On RANDOM weights attention is near-uniform, so the estimator's top diagonals
           scatter over the whole key range and the block mask covers most tiles: this row measures the
           machinery (estimator + kernel), not the sparsity a trained model shows.
  a_shape  the same per-head budgets as A-shape heads (spec 3.1: the first n_v keys + the n_s nearest
           diagonals, no estimation): the mask a head with purely local + sink attention selects, the
           pattern most of a trained model's heads show (MInference's search turns A-shape winners into
           vertical-slash entries). With random weights this is the only way to see the kernel's
           speed at Qwen's budgets end to end; it says nothing about quality (benchmarks/sparse_quality.py).
Prompt lengths should make every piece use the --chunk bucket (e.g. multiples of the chunk; DCA boundaries
at multiples of s = 253952 give shorter pieces that still round up to it), so one compile serves a mode;
each mode's step is compiled by a warm-up prompt just over the threshold first (timed as warmup_s).
Peak memory is the process peak so far (a later mode's figure includes earlier modes' peaks): put the
sparse modes first, then `off`; a dense peak above the sparse one shows as a larger figure.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
from pathlib import Path

import jax
import numpy as np

from benchmarks.common import SMOKE, QWEN25_7B_1M, peak_memory_gib, random_params, write_json
from benchmarks.prefill import ttft
from zenjax.config import engine_config, sparse_config_from_json
from zenjax.engine import Engine

BUDGETS = Path(__file__).parent / "data" / "Qwen2.5-7B-Instruct-1M.sparse_attention_config.json"
MODES = ("off", "vs", "a_shape")


def parse_runs(text: str) -> list[tuple[str, int]]:
    runs = []
    for item in text.split(","):
        mode, _, length = item.partition(":")
        if mode not in MODES or not length.isdigit():
            raise SystemExit(f"--runs: {item!r} must be MODE:LENGTH with MODE in {MODES}")
        runs.append((mode, int(length)))
    return runs


def sparse_for(mode: str, cfg, smoke: bool):
    if mode == "off":
        return None
    entries = json.loads(BUDGETS.read_text())
    if smoke:                                  # the smoke model's 2 layers, small budgets
        entries = [{str(h): ["vertical_and_slash", 30, 100, 1.0] for h in range(cfg.num_heads)}] * cfg.num_layers
    if mode == "a_shape":
        entries = [{h: ["a_shape", e[1], e[2], e[3]] for h, e in layer.items()} for layer in entries]
    sc = sparse_config_from_json(entries, cfg, source=f"{BUDGETS.name} as {mode}")
    return dataclasses.replace(sc, threshold=min(sc.threshold, 1024)) if smoke else sc


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", default="off:131072,vs:131072,a_shape:131072,a_shape:1048576")
    ap.add_argument("--chunk", type=int, default=65536)
    ap.add_argument("--smoke", action="store_true", help="tiny model on any backend: checks the script runs")
    a = ap.parse_args(argv)
    runs = parse_runs(a.runs)
    cfg = SMOKE if a.smoke else QWEN25_7B_1M
    attention = "reference" if a.smoke else "pallas"
    params = random_params(cfg)
    max_len = max(L for _, L in runs) + 256
    info = {"device": jax.devices()[0].device_kind, "chunk": a.chunk, "max_model_len": max_len}
    rows, engine, current = [], None, None
    order = list(dict.fromkeys(m for m, _ in runs))                 # modes in their first-mentioned order
    for mode, L in sorted(runs, key=lambda r: order.index(r[0])):
        if mode != current:
            engine = None
            gc.collect()
            sc = sparse_for(mode, cfg, a.smoke)
            ec = engine_config(max_model_len=max_len, prefill_chunk=a.chunk, max_batch=1, attention=attention,
                               dtype="bfloat16", cache_dtype="bfloat16", platform="any")
            engine = Engine(cfg, params, ec, sparse=sc)
            warm_len = min((sc.threshold if sc else 32768) + 1000, max_len - 1)
            warmup = ttft(engine, [1] * warm_len)
            current = mode
            print(f"[{mode}] warm-up prompt of {warm_len} tokens (compiles the {a.chunk}-row step): {warmup:.1f} s",
                  flush=True)
        before = dict(engine.stats())
        ids = list(np.random.RandomState(L).randint(0, cfg.vocab_size, L))
        t = ttft(engine, ids)
        st = {k: engine.stats()[k] - before.get(k, 0) for k in ("sparse_prefill_tokens", "dense_prefill_tokens")}
        row = dict(mode=mode, tokens=L, ttft_s=round(t, 3), peak_gib=round(peak_memory_gib(), 2),
                   warmup_s=round(warmup, 1), **st)
        print(row, flush=True)
        rows.append(row)
        write_json("sparse_e2e.json", dict(info, rows=rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
