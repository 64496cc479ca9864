"""Would fusing a decode step's projections pay? The 28 layers' weight matmuls of one 7B decode step, timed
in one jitted call, three ways:

    separate   q, k, v, gate, up each its own product (the model today, zenjax/layers.py)
    kv_gu      k|v as one [D, 2, K, H] product, gate|up as one [D, 2, F]
    qkv_gu     q|k|v as one [D, K, G+2, H] product (per kv head its G q heads, its k, its v), gate|up fused

    PYTHONPATH=. python3 benchmarks/check_fusion.py [--rows 1,8] [--weights bf16,fp8] [--smoke]

Each layer runs h -> projections -> x += o(q) -> x += down(silu(gate) * up), so the products chain as in
the model (attention, norms and rotary are left out: they do not change with the fusion). fp8 uses the
model's out-major Fp8Weight and zenjax.layers.linear's default (XLA) path. Reported: ms per step and the
weight bytes per second. Weights: 28 layers x 466 MB (bf16) for each of the three layouts; fp8 half that.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import QWEN25_7B_1M, SMOKE, write_json
from zenjax.fp8 import Fp8Weight
from zenjax.layers import linear

LAYOUTS = ("separate", "kv_gu", "qkv_gu")


def make_layers(cfg, layout: str, weights: str, key):
    D, F, N, K, H = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    G = N // K
    shapes = {"separate": {"wq": (D, N, H), "wk": (D, K, H), "wv": (D, K, H), "w_gate": (D, F), "w_up": (D, F)},
              "kv_gu": {"wq": (D, N, H), "w_kv": (D, 2, K, H), "w_gate_up": (D, 2, F)},
              "qkv_gu": {"w_qkv": (D, K, G + 2, H), "w_gate_up": (D, 2, F)}}[layout]
    shapes = dict(shapes, wo=(N, H, D), w_down=(F, D))
    ins = {"wo": 2}                                 # leading in-dims of each weight (1 for the rest)
    layers = []
    for l in range(cfg.num_layers):
        w = {}
        for i, (name, shape) in enumerate(sorted(shapes.items())):
            k = jax.random.fold_in(key, l * 100 + i)
            if weights == "bf16":
                w[name] = (jax.random.normal(k, shape, jnp.float32) * 0.02).astype(jnp.bfloat16)
            else:                                   # out-major e4m3 values [out..., in...] + scale [out...]
                n_in = ins.get(name, 1)
                out_shape = shape[n_in:] + shape[:n_in]
                vals = (jax.random.normal(k, out_shape, jnp.float32) * 64).astype(jnp.float8_e4m3fn)
                w[name] = Fp8Weight(vals, jnp.full(shape[n_in:], 0.02 / 64, jnp.float32))
        layers.append(w)
    return layers


def step(cfg, layout: str, layers, x):
    """x [B, 1, D] through every layer's projections; returns the new x."""
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    G = N // K
    for w in layers:
        h = x
        if layout == "qkv_gu":
            y = linear("btd,dkgh->btkgh", h, w["w_qkv"])
            q = y[:, :, :, :G].reshape(y.shape[:2] + (N, H))
            kv = y[:, :, :, G:]                      # k, v: [B, T, K, 2, H]
        else:
            q = linear("btd,dnh->btnh", h, w["wq"])
            if layout == "kv_gu":
                kv = linear("btd,dskh->btskh", h, w["w_kv"])
            else:
                kv = jnp.stack([linear("btd,dkh->btkh", h, w["wk"]), linear("btd,dkh->btkh", h, w["wv"])], 2)
        a = q + jnp.sum(kv, axis=(2, 3, 4))[:, :, None, None] * 0   # keep k, v live (attention reads them)
        x = x + linear("btnh,nhd->btd", a, w["wo"])
        if layout == "separate":
            gate, up = linear("btd,df->btf", x, w["w_gate"]), linear("btd,df->btf", x, w["w_up"])
        else:
            gu = linear("btd,dsf->btsf", x, w["w_gate_up"])
            gate, up = gu[:, :, 0], gu[:, :, 1]
        x = x + linear("btf,fd->btd", jax.nn.silu(gate) * up, w["w_down"])
    return x


def time_layout(cfg, layout, weights, rows, reps):
    layers = make_layers(cfg, layout, weights, jax.random.key(1))
    f = jax.jit(lambda layers, x: step(cfg, layout, layers, x))
    x = jnp.ones((rows, 1, cfg.hidden_size), jnp.bfloat16) * 0.01
    jax.block_until_ready(f(layers, x))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(4):                          # queue 4 calls: host dispatch hidden
            out = f(layers, x)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / 4)
    nbytes = sum(a.nbytes for a in jax.tree.leaves(layers))
    hlo = f.lower(layers, x).compile().as_text()
    del layers
    t = float(np.median(times))
    return {"layout": layout, "weights": weights, "rows": rows, "ms": round(t * 1e3, 4),
            "weight_gb": round(nbytes / 1e9, 3), "tb_s": round(nbytes / t / 1e12, 3),
            "fusions_in_hlo": hlo.count(" fusion("), "dots_in_hlo": hlo.count(" dot(") + hlo.count("gemm")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--weights", default="bf16,fp8")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args(argv)
    cfg = SMOKE if a.smoke else QWEN25_7B_1M
    rows_out = []
    for weights in a.weights.split(","):
        for rows in [int(r) for r in a.rows.split(",")]:
            for layout in LAYOUTS:
                r = time_layout(cfg, layout, weights, rows, 2 if a.smoke else a.reps)
                print(r, flush=True)
                rows_out.append(r)
    write_json("check_fusion.json", {"device": jax.devices()[0].device_kind, "rows": rows_out})


if __name__ == "__main__":
    main()
