"""GPU check and timing of the Pallas fp8 weight matmul (pallas_kernels/fp8_matmul.py) at decode size.

    PYTHONPATH=. python3 benchmarks/check_fp8_matmul.py [--smoke]

Qwen2.5-7B's dense projections (in -> out): q/o 3584 -> 3584, k/v 3584 -> 512, gate/up 3584 -> 18944,
down 18944 -> 3584, at M = 1 and 8 rows. Per shape: the kernel (a few tile / warp configs), XLA's path
for an fp8 weight (`x @ w8.astype(bf16)`, then the scale), and a bf16 weight matmul (the bf16 model's
cost). Correctness: ||kernel - fp8_matmul_reference|| / ||.|| (bf16 x: ~1e-3). GB/s counts the weight
bytes read (1 per element for e4m3, 2 for bf16) against the copy bandwidth of benchmarks/common.py.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.common import bench, write_json
from pallas_kernels.fp8_matmul import fp8_matmul, fp8_matmul_reference

SHAPES = {"q_o": (3584, 3584), "k_v": (3584, 512), "gate_up": (3584, 18944), "down": (18944, 3584)}
CONFIGS = [(128, 128, 4), (128, 64, 4), (256, 128, 8)]          # (block_k, block_n, num_warps)


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
        for M in (1, 8):
            x = jax.random.normal(jax.random.key(M), (M, Kd), jnp.bfloat16)
            ref = fp8_matmul_reference(x, w8, scale)
            row = dict(shape=name, K=Kd, N=Nd, M=M)
            xla = jax.jit(lambda x, w8, s: ((x @ w8.astype(jnp.bfloat16)).astype(jnp.float32) * s).astype(x.dtype))
            b16 = jax.jit(lambda x, w: x @ w)
            reps = 2 if interp else 50
            row["xla_fp8_us"] = round(bench(xla, x, w8, scale, reps=reps, inner=reps) * 1e6, 1)
            row["bf16_us"] = round(bench(b16, x, wb, reps=reps, inner=reps) * 1e6, 1)
            best = None
            for bk, bn, nw in CONFIGS:
                f = jax.jit(lambda x, w8, s, bk=bk, bn=bn, nw=nw: fp8_matmul(x, w8, s, block_k=bk, block_n=bn,
                                                                           num_warps=nw, interpret=interp))
                got = f(x, w8, scale).astype(jnp.float32)
                err = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
                t = bench(f, x, w8, scale, reps=reps, inner=reps)
                key = f"kernel_bk{bk}_bn{bn}_w{nw}"
                row[key + "_us"], row[key + "_rel_err"] = round(t * 1e6, 1), float(f"{err:.2e}")
                if best is None or t < best[0]:
                    best = (t, key)
            row["best"] = best[1]
            row["best_tbs"] = round(Kd * Nd / best[0] / 1e12, 3)
            row["bf16_tbs"] = round(2 * Kd * Nd / (row["bf16_us"] * 1e-6) / 1e12, 3)
            print(row, flush=True)
            rows.append(row)
    write_json("check_fp8_matmul.json", {"device": jax.devices()[0].device_kind, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
