"""GPU correctness check of the cuDNN attention path (zenjax/attention/cudnn.py) against the fp32 reference.

Run on the GPU machine from the repo root:
    PYTHONPATH=. python3 benchmarks/check_cudnn.py [--out $OUT/check_cudnn.json]
CPU self-test of this script (XLA attention in place of cuDNN, small shapes):
    PYTHONPATH=. python3 benchmarks/check_cudnn.py --small --impl xla

Qwen2.5-7B heads (28 q / 4 kv, d=128), bf16 inputs (random normal; DCA queries are three independent
arrays, which checks the decomposition as well as real rotations would). Cases: plain prefill chunks of
1024 at q_start 0 and 3000; a DCA prefill chunk in DCA chunk 3 (s = 2048: c = 2560, w = 512), where all
four partials are present; a DCA whole prompt of 4608 tokens (crosses two DCA boundaries: cut into
per-chunk steps because q_start is concrete); decode B=4 at kv_len 5000..12000, plain and DCA.

Each case runs two variants: `cudnn` (the module's default: cuDNN's fp32 softmax statistics) and
`cudnn_public` (jax.nn.dot_product_attention, whose lse is bf16 for bf16 inputs), against
`reference_attention_lse` in float32 on the same bf16-rounded inputs. Printed per variant, over valid rows:
max |out - ref|, relative error ||out - ref|| / ||ref||, max |lse - ref lse|; and, as the floor, the
same numbers for the reference itself rounded to bf16. Exit status 1 if the `cudnn` variant's relative
error exceeds --tol (default 1e-2, bf16 operands) or any output is non-finite; `cudnn_public` is reported
(it measures the cost of a bf16 lse) but only fails on non-finite output.
"""
from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from zenjax.attention import cudnn as attention_cudnn
from zenjax.attention import reference_attention_lse
from zenjax.config import DCAConfig

N, K = 28, 4


def cases(small: bool):
    """(name, dca, B, T, S, q_start, kv_len, concrete). Small: the same structure at 1/16 size (CPU)."""
    f = 16 if small else 1
    dca = DCAConfig(chunk_size=2560 // f, local_size=512 // f, original_max_position_embeddings=2560 // f)
    s = dca.chunk_len
    dec = np.array([5000, 6100, 9000, 12000]) // f
    return [
        ("plain prefill T=1024 q_start=0", None, 1, 1024 // f, 4096 // f, [0], [1024 // f], False),
        ("plain prefill T=1024 q_start=3000", None, 1, 1024 // f, 4096 // f, [3000 // f], [4024 // f], False),
        ("DCA prefill in DCA chunk 3", dca, 1, 1024 // f, 8192 // f, [3 * s + 300 // f],
         [3 * s + 300 // f + 1000 // f], False),
        ("DCA whole prompt 4608 (cut at s)", dca, 1, 4608 // f, 4608 // f, [0], [4608 // f], True),
        ("plain decode B=4", None, 4, 1, 12288 // f, list(dec - 1), list(dec), False),
        ("DCA decode B=4", dca, 4, 1, 12288 // f, list(dec - 1), list(dec), False),
    ]


def errors(out, lse, ref, ref_lse, valid):
    out, lse, ref, ref_lse = (np.asarray(x, np.float32) for x in (out, lse, ref, ref_lse))
    d = (out - ref)[valid]
    return {"max_abs": float(np.abs(d).max()),
            "rel": float(np.linalg.norm(d) / np.linalg.norm(ref[valid])),
            "lse_max_abs": float(np.abs(lse - ref_lse)[valid].max()),
            "finite": bool(np.isfinite(out).all())}


def check_case(name, dca, B, T, S, q_start, kv_len, concrete, impls, H, seed=0):
    key = jax.random.split(jax.random.key(seed), 3)
    qshape = (3, B, T, N, H) if dca else (B, T, N, H)
    q = jax.random.normal(key[0], qshape, jnp.bfloat16)
    k = jax.random.normal(key[1], (B, S, K, H), jnp.bfloat16)
    v = jax.random.normal(key[2], (B, S, K, H), jnp.bfloat16)
    qs, kl = np.array(q_start, np.int32), np.array(kv_len, np.int32)
    ref, ref_lse = jax.jit(lambda q, k, v, a, b: reference_attention_lse(
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), q_start=a, kv_len=b, dca=dca))(
        q, k, v, jnp.asarray(qs), jnp.asarray(kl))
    valid = (qs[:, None] + np.arange(T)[None, :]) < kl[:, None]
    res = {"floor_bf16_output": errors(ref.astype(jnp.bfloat16), ref_lse, ref, ref_lse, valid)}
    for impl in impls:
        if concrete:      # numpy constants closed over: stay concrete under jit (step cut at DCA boundaries)
            f = jax.jit(lambda q, k, v: attention_cudnn.attention_lse(
                q, k, v, q_start=qs, kv_len=kl, dca=dca, _implementation=impl))
            out, lse = f(q, k, v)
        else:             # traced positions, as in the engine
            f = jax.jit(lambda q, k, v, a, b: attention_cudnn.attention_lse(
                q, k, v, q_start=a, kv_len=b, dca=dca, _implementation=impl))
            out, lse = f(q, k, v, jnp.asarray(qs), jnp.asarray(kl))
        res[impl] = errors(out, lse, ref, ref_lse, valid)
    return res


def run(small: bool = False, impls=("cudnn", "cudnn_public"), tol: float = 1e-2) -> tuple[dict, bool]:
    H = 16 if small else 128
    results, ok = {}, True
    for name, *args in cases(small):
        try:
            r = check_case(name, *args, impls=impls, H=H)
        except Exception as e:                                   # report and keep checking the rest
            results[name] = {"error": repr(e)[:600]}
            print(f"{name}: FAILED with {e!r}"[:800], flush=True)
            ok = False
            continue
        results[name] = r
        for variant, e in r.items():
            bad = (not e["finite"]) or (variant == impls[0] and e["rel"] > tol)
            ok &= not bad
            print(f"{name:36s} {variant:18s} max|d| {e['max_abs']:.3e}  rel {e['rel']:.3e}  "
                  f"lse max|d| {e['lse_max_abs']:.3e}{'  <-- FAIL' if bad else ''}", flush=True)
    return results, ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="1/16 sizes, head_dim 16 (CPU self-test)")
    ap.add_argument("--impl", choices=("cudnn", "xla"), default="cudnn",
                    help="xla: run the same decomposition with XLA attention (CPU self-test)")
    ap.add_argument("--tol", type=float, default=1e-2, help="max relative error of the cudnn variant")
    ap.add_argument("--out", help="write the results as JSON here")
    a = ap.parse_args(argv)
    impls = ("cudnn", "cudnn_public") if a.impl == "cudnn" else ("xla",)
    print(f"devices: {jax.devices()}", flush=True)
    results, ok = run(a.small, impls, a.tol)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"ok": ok, "tol": a.tol, "results": results}, f, indent=1)
    print("OK" if ok else "FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
