"""GPU check and timing of the decode kernel reading an e4m3 cache directly (pallas_kernels/dca_decode.py).

    PYTHONPATH=. python3 benchmarks/check_fp8_decode.py [--contexts 131072,1048576] [--smoke]

Qwen2.5-7B-1M attention shape (28 q / 4 kv heads, d = 128, DCA s = 253952), batch 1, one query at the
end of the context. For each context: the kernel on bf16 K/V, the kernel on e4m3 K/V + float32 scales
(the same values quantized), and the old path (dequantize the whole cache to bf16, then the bf16 kernel).
Correctness: ||fp8 kernel - bf16 kernel on the dequantized cache|| / ||.|| (same inputs, should be ~1e-3:
bf16 rounding of P only). Bytes: K/V read (e4m3: 1 byte + 4 / 128 per element for the scales).
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.common import bench, write_json
from pallas_kernels.dca_decode import dca_decode
from zenjax.model import dequantize_fp8, quantize_fp8


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
        row = dict(context=ctx, rel_err_fp8_vs_bf16_kernel=float(f"{err:.3e}"), fp8_kernel_us=round(t8 * 1e6, 1),
                   fp8_kernel_tbs=round(by8 / t8 / 1e12, 3), old_dequant_then_kernel_us=round(told * 1e6, 1),
                   bf16_kernel_us=round(t16 * 1e6, 1), bf16_kernel_tbs=round(by16 / t16 / 1e12, 3),
                   ok=bool(err < 1e-2))
        print(row, flush=True)
        rows.append(row)
        del k8, v8, ks, vs, kd, vd
    write_json("check_fp8_decode.json", {"device": jax.devices()[0].device_kind, "rows": rows})
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
