"""GPU check and timing of the Pallas fp8 weight matmul (pallas_kernels/fp8_matmul.py) at decode size.

    PYTHONPATH=. python3 benchmarks/check_fp8_matmul.py [--smoke]

Qwen2.5-7B's dense projections (in -> out): q/o 3584 -> 3584, k/v 3584 -> 512, gate/up 3584 -> 18944,
down 18944 -> 3584, at M = 1 and 8 rows (and 4096, a prefill piece: no kernel there). Per shape: the
kernel (a few tile / warp configs), XLA's path for an fp8 weight (`x @ w8.astype(bf16)`, then the scale),
the "w8a8" path of zenjax.layers (activations quantized per row, e4m3 x e4m3 on fp8 tensor cores), and a
bf16 weight matmul (the bf16 model's cost). Correctness: ||kernel - fp8_matmul_reference|| / ||.|| (bf16 x: ~1e-3). GB/s counts the weight
bytes read (1 per element for e4m3, 2 for bf16) against the copy bandwidth of benchmarks/common.py.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.common import bench, write_json
from pallas_kernels.fp8_matmul import MAX_ROWS, fp8_matmul, fp8_matmul_reference

SHAPES = {"q_o": (3584, 3584), "k_v": (3584, 512), "gate_up": (3584, 18944), "down": (18944, 3584)}
CONFIGS = [(128, 128, 4), (128, 64, 4), (256, 128, 8)]          # (block_k, block_n, num_warps)


def w8a8_row(x, w8, scale, ref, reps) -> dict:
    """The "w8a8" path of zenjax.layers.linear (activations quantized per row, e4m3 x e4m3 dot): time,
    error vs the fp8-weight reference, and whether XLA lowered it to an fp8 GEMM (cuBLASLt f8 custom call)
    rather than converting to bf16 first. Also the same product with the weight stored [N, K] (the "TN"
    layout cuBLASLt's fp8 GEMM wants), to see whether XLA transposes a [K, N] weight every call."""
    from zenjax import layers
    from zenjax.fp8 import Fp8Weight
    mode, layers.FP8_MATMUL = layers.FP8_MATMUL, "w8a8"
    try:
        f = jax.jit(lambda x, w8, s: layers.linear("md,dn->mn", x, Fp8Weight(w8, s)))
        got = f(x, w8, scale).astype(jnp.float32)
        hlo = f.lower(x, w8, scale).compile().as_text()
    finally:
        layers.FP8_MATMUL = mode

    def tn(x, w8t, s):
        xf = x.astype(jnp.float32)
        sx = jnp.max(jnp.abs(xf), axis=1, keepdims=True) / 448.0
        y = jax.lax.dot_general((xf / sx).astype(jnp.float8_e4m3fn), w8t, (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)
        return (y * sx * s[None, :]).astype(x.dtype)
    w8t = jnp.asarray(w8.T)
    g = jax.jit(tn)
    hlo_t = g.lower(x, w8t, scale).compile().as_text()
    return {"w8a8_us": round(bench(f, x, w8, scale, reps=reps, inner=reps) * 1e6, 1),
            "w8a8_tn_us": round(bench(g, x, w8t, scale, reps=reps, inner=reps) * 1e6, 1),
            "w8a8_rel_err": float(f"{float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref)):.2e}"),
            "w8a8_f8_gemm": "f8" in hlo and "cublas" in hlo, "w8a8_tn_f8_gemm": "f8" in hlo_t and "cublas" in hlo_t,
            "w8a8_transposes": hlo.count("transpose")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args(argv)
    interp = jax.default_backend() != "gpu"
    shapes = {"small": (256, 256)} if a.smoke else SHAPES
    rows = []
    for name, (Kd, Nd) in shapes.items():
        w = jax.random.normal(jax.random.key(Kd + Nd), (Kd, Nd), jnp.float32) * 0.02
        scale = jnp.max(jnp.abs(w), axis=0) / 448.0
        w8, wb = (w / scale).astype(jnp.float8_e4m3fn), w.astype(jnp.bfloat16)
        del w
        for M in ((1, 8) if a.smoke else (1, 8, 4096)):
            x = jax.random.normal(jax.random.key(M), (M, Kd), jnp.bfloat16)
            ref = fp8_matmul_reference(x, w8, scale)
            row = dict(shape=name, K=Kd, N=Nd, M=M)
            xla = jax.jit(lambda x, w8, s: ((x @ w8.astype(jnp.bfloat16)).astype(jnp.float32) * s).astype(x.dtype))
            b16 = jax.jit(lambda x, w: x @ w)
            reps = 2 if interp else 50
            row["xla_fp8_us"] = round(bench(xla, x, w8, scale, reps=reps, inner=reps) * 1e6, 1)
            row.update(w8a8_row(x, w8, scale, ref, reps))
            row["bf16_us"] = round(bench(b16, x, wb, reps=reps, inner=reps) * 1e6, 1)
            best = None
            for bk, bn, nw in (CONFIGS if M <= MAX_ROWS else ()):     # the kernel serves decode sizes only
                f = jax.jit(lambda x, w8, s, bk=bk, bn=bn, nw=nw: fp8_matmul(x, w8, s, block_k=bk, block_n=bn,
                                                                           num_warps=nw, interpret=interp))
                got = f(x, w8, scale).astype(jnp.float32)
                err = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
                t = bench(f, x, w8, scale, reps=reps, inner=reps)
                key = f"kernel_bk{bk}_bn{bn}_w{nw}"
                row[key + "_us"], row[key + "_rel_err"] = round(t * 1e6, 1), float(f"{err:.2e}")
                if best is None or t < best[0]:
                    best = (t, key)
            if best is not None:
                row["best"] = best[1]
                row["best_tbs"] = round(Kd * Nd / best[0] / 1e12, 3)
            row["bf16_tbs"] = round(2 * Kd * Nd / (row["bf16_us"] * 1e-6) / 1e12, 3)
            print(row, flush=True)
            rows.append(row)
    write_json("check_fp8_matmul.json", {"device": jax.devices()[0].device_kind, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
