"""Tensor / expert parallelism on real devices: the same random-weight model on 1 device and on a mesh
of T (x E) devices; prints the logit difference of a prefill (Mosaic GPU / Triton kernels inside
shard_map) and of greedy decode tokens against one device, then TTFT and decode ms/step per layout.

    python -m benchmarks.tp_check --model 7b --layers 4 --tp 1,2,4 --length 8192 --context 8192
    python -m benchmarks.tp_check --model moe --layers 4 --tp 1,2 --ep 1,2 --length 8192
    python -m benchmarks.tp_check --smoke          # tiny shapes, 8 simulated CPU devices: the script runs

bf16 weights and activations: the sharded logits differ from one device's by bf16 rounding of the
regrouped sums (expect max |diff| / max |logit| of order 1e-2; greedy tokens equal up to near ties).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

if "--smoke" in sys.argv:                     # before JAX starts: the device count is fixed then
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax                                      # noqa: E402
import numpy as np                              # noqa: E402

from benchmarks import decode, prefill         # noqa: E402
from benchmarks.common import QWEN25_7B_1M, SMOKE, ceilings, random_params, write_json  # noqa: E402
from benchmarks.moe_fp8 import QWEN15_MOE_A27B, SMOKE_MOE  # noqa: E402
from zenjax.config import engine_config         # noqa: E402
from zenjax.engine import Engine                # noqa: E402
from zenjax.sharding import ParallelismError, make_mesh, shard_params  # noqa: E402


def engine_on(cfg, params, tp: int, ep: int, a, attention: str) -> Engine:
    mesh = make_mesh(tp, cfg=cfg, ep=ep)
    ec = engine_config(max_model_len=max(a.length, a.context) + 256, prefill_chunk=a.chunk, max_batch=1,
                       attention=attention, dtype="bfloat16", cache_dtype="bfloat16", platform="any")
    return Engine(cfg, shard_params(cfg, params, mesh), ec, mesh=mesh, verbose=False)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("7b", "moe"), default="7b")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers (fewer than the real model's: fast)")
    ap.add_argument("--tp", default="1,2,4")
    ap.add_argument("--ep", default="1")
    ap.add_argument("--length", type=int, default=8192, help="prefill tokens (TTFT, logits check)")
    ap.add_argument("--context", type=int, default=8192, help="decode context")
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--attention", default="pallas")
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args(argv)
    if a.smoke:
        cfg = SMOKE_MOE if a.model == "moe" else dataclasses.replace(SMOKE, dca=None)
        attention, a.length, a.context, a.chunk = "pallas", 40, 40, 32
    else:
        cfg = dataclasses.replace(QWEN15_MOE_A27B if a.model == "moe" else dataclasses.replace(QWEN25_7B_1M, dca=None),
                                  num_layers=a.layers)
        attention = a.attention
    warm = ceilings(small=a.smoke)
    params = jax.tree.map(np.asarray, random_params(cfg))       # on the host: placed per layout below
    ids = list(np.random.RandomState(0).randint(0, cfg.vocab_size, a.length))
    out = dict(device=jax.devices()[0].device_kind, devices=len(jax.devices()), model=a.model, layers=cfg.num_layers,
               rows=[])
    base = None
    for ep in [int(x) for x in a.ep.split(",")]:
        for tp in [int(x) for x in a.tp.split(",")]:
            if tp * ep > len(jax.devices()) or (ep > 1 and cfg.moe is None):
                continue
            try:
                e = engine_on(cfg, params, tp, ep, a, attention)
            except ParallelismError as err:       # e.g. tp 8 on 28 heads: say so, go on
                print(f"tp={tp} ep={ep}: {err}", flush=True)
                out["rows"].append(dict(tp=tp, ep=ep, refused=str(err)))
                continue
            n = min(a.length, a.chunk)          # the first prefill piece's last-row logits (slot 0)
            last = np.asarray(e.runner.prefill(0, ids, 0, n), np.float32)
            greedy = e.generate(ids[:64], prefill.SamplingParams(max_new_tokens=16, ignore_eos=True)).token_ids
            if base is None:
                base = (last, greedy)
            err = float(np.abs(last - base[0]).max() / np.abs(base[0]).max())
            row = dict(tp=tp, ep=ep, mesh=dict(e.mesh.shape), logits_rel_err_vs_first=err,
                       greedy_equal=greedy == base[1],
                       prefill=prefill.measure(e, [a.length], warm), decode=decode.measure(e, [a.context], warm))
            print(row, flush=True)
            out["rows"].append(row)
            write_json(f"tp_check_{a.model}.json", out)
            del e
    return out


if __name__ == "__main__":
    main()
