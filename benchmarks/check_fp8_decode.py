"""GPU check and timing of the decode kernel reading an e4m3 cache directly (pallas_kernels/dca_decode.py).

    PYTHONPATH=. python3 benchmarks/check_fp8_decode.py [--contexts 131072,1048576] [--smoke]

Qwen2.5-7B-1M attention shape (28 q / 4 kv heads, d = 128, DCA s = 253952), batch 1, one query at the
end of the context. For each context: the kernel on bf16 K/V, the kernel on e4m3 K/V + float32 scales
(the same values quantized), and the old path (dequantize the whole cache to bf16, then the bf16 kernel).
Correctness: ||fp8 kernel - bf16 kernel on the dequantized cache|| / ||.|| (same inputs, should be ~1e-3:
f16 rounding of P and q vs bf16). Bytes: K/V read (e4m3: 1 byte + 4 / 128 per element for the scales).
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.common import bench, write_json
from pallas_kernels.dca_decode import dca_decode
from zenjax.model import dequantize_fp8, quantize_fp8


def check_prefill(ctx: int, T: int, s: int) -> dict:
    """The Triton prefill kernel on an e4m3 cache (the dispatcher's fp8 prefill path) vs the same kernel on
    the dequantized bf16 cache, and the times of: fp8 kernel, dequantize + Triton, dequantize + Mosaic."""
    from pallas_kernels.dca_prefill import dca_prefill
    from pallas_kernels.dca_prefill_mgpu import dca_prefill_mgpu
    N, K, H = 28, 4, 128
    S = -(-(ctx + 1) // 128) * 128
    k1, k2, k3 = jax.random.split(jax.random.key(ctx + T), 3)
    q = jax.random.normal(k1, (3, 1, T, N, H), jnp.bfloat16)
    (k8, ks), (v8, vs) = (quantize_fp8(jax.random.normal(kk, (1, S, K, H), jnp.bfloat16)) for kk in (k2, k3))
    qs, kl = jnp.array([ctx - T], jnp.int32), jnp.array([ctx], jnp.int32)
    tri = dict(chunk_len=s, block_q=128, block_k=64, num_warps=8, num_stages=3, interpret=False)
    f8 = jax.jit(lambda q, k8, v8, ks, vs: dca_prefill(q, k8, v8, qs, kl, k_scale=ks, v_scale=vs, **tri)[0])
    deq = lambda k8, ks: dequantize_fp8(k8, ks, jnp.bfloat16)
    tri16 = jax.jit(lambda q, k8, v8, ks, vs: dca_prefill(q, deq(k8, ks), deq(v8, vs), qs, kl, **tri)[0])
    mg16 = jax.jit(lambda q, k8, v8, ks, vs: dca_prefill_mgpu(q, deq(k8, ks), deq(v8, vs), qs, kl, chunk_len=s,
                                                             block_k=128, max_concurrent_steps=2)[0])
    got, ref = f8(q, k8, v8, ks, vs).astype(jnp.float32), tri16(q, k8, v8, ks, vs).astype(jnp.float32)
    err = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
    args = (q, k8, v8, ks, vs)
    t8, tt, tm = (bench(f, *args, reps=5) for f in (f8, tri16, mg16))
    flops = 4 * N * H * T * (ctx - T / 2)
    row = dict(prefill_context=ctx, T=T, rel_err_fp8_vs_bf16_triton=float(f"{err:.3e}"),
               fp8_triton_ms=round(t8 * 1e3, 2), fp8_triton_tflops=round(flops / t8 / 1e12, 1),
               dequant_triton_ms=round(tt * 1e3, 2), dequant_mosaic_ms=round(tm * 1e3, 2), ok=bool(err < 1e-2))
    print(row, flush=True)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--contexts", default="131072,1048576")
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args(argv)
    N, K, H, s = (28, 4, 16, 48) if a.smoke else (28, 4, 128, 253952)
    block = 16 if a.smoke else 64
    interp = jax.default_backend() != "gpu"
    rows = []
    for ctx in [int(x) for x in a.contexts.split(",")]:
        S = -(-(ctx + 1) // 128) * 128
        k1, k2, k3 = jax.random.split(jax.random.key(ctx), 3)
        q = jax.random.normal(k1, (3, 1, 1, N, H), jnp.bfloat16)
        k = jax.random.normal(k2, (1, S, K, H), jnp.bfloat16)
        v = jax.random.normal(k3, (1, S, K, H), jnp.bfloat16)
        (k8, ks), (v8, vs) = quantize_fp8(k), quantize_fp8(v)
        del k, v
        qs, kl = jnp.array([ctx - 1], jnp.int32), jnp.array([ctx], jnp.int32)
        kw = dict(chunk_len=s, block_k=block, interpret=interp)
        f8 = jax.jit(lambda q, k8, v8, ks, vs: dca_decode(q, k8, v8, qs, kl, k_scale=ks, v_scale=vs, **kw)[0])
        old = jax.jit(lambda q, k8, v8, ks, vs: dca_decode(q, dequantize_fp8(k8, ks, jnp.bfloat16),
                                                           dequantize_fp8(v8, vs, jnp.bfloat16), qs, kl, **kw)[0])
        kd, vd = dequantize_fp8(k8, ks, jnp.bfloat16), dequantize_fp8(v8, vs, jnp.bfloat16)
        b16 = jax.jit(lambda q, k, v: dca_decode(q, k, v, qs, kl, **kw)[0])
        ref = b16(q, kd, vd).astype(jnp.float32)
        got = f8(q, k8, v8, ks, vs).astype(jnp.float32)
        err = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
        reps = 2 if interp else 10
        t8, told, t16 = (bench(f8, q, k8, v8, ks, vs, reps=reps, inner=reps), bench(old, q, k8, v8, ks, vs, reps=reps),
                         bench(b16, q, kd, vd, reps=reps, inner=reps))
        by8, by16 = 2 * ctx * K * (H + 4), 2 * ctx * K * H * 2
        sweep = {}
        for w in (4, 8):                   # more warps: more conversion throughput per program
            fw = jax.jit(lambda q, k8, v8, ks, vs, w=w: dca_decode(q, k8, v8, qs, kl, k_scale=ks, v_scale=vs,
                                                                   num_warps=w, **kw)[0])
            tw = bench(fw, q, k8, v8, ks, vs, reps=reps, inner=reps)
            sweep[f"fp8_kernel_warps{w}_us"] = round(tw * 1e6, 1)
            sweep[f"fp8_kernel_warps{w}_tbs"] = round(by8 / tw / 1e12, 3)
        row = dict(context=ctx, rel_err_fp8_vs_bf16_kernel=float(f"{err:.3e}"), fp8_kernel_us=round(t8 * 1e6, 1),
                   fp8_kernel_tbs=round(by8 / t8 / 1e12, 3), **sweep, old_dequant_then_kernel_us=round(told * 1e6, 1),
                   bf16_kernel_us=round(t16 * 1e6, 1), bf16_kernel_tbs=round(by16 / t16 / 1e12, 3),
                   ok=bool(err < 1e-2))
        print(row, flush=True)
        rows.append(row)
        del k8, v8, ks, vs, kd, vd
    prefill = [] if a.smoke else [check_prefill(131072, 2048, s)]
    write_json("check_fp8_decode.json", {"device": jax.devices()[0].device_kind, "rows": rows, "prefill": prefill})
    return 0 if all(r["ok"] for r in rows + prefill) else 1


if __name__ == "__main__":
    raise SystemExit(main())
