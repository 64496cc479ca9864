"""Attention kernels on one GPU: our Pallas DCA prefill / decode vs dense cuDNN, Qwen2.5-7B heads.

Run on the GPU machine from the repo root:
    PYTHONPATH=. python3 benchmarks/attention.py --out $OUT/attention.json

What it does, in order (each part prints as it goes; the table comes last):
1. Ceilings: a device-to-device copy (GB/s counting bytes read + written) and a bf16 matmul (TFLOP/s).
2. Correctness on the GPU, small shapes, bf16 inputs: Pallas prefill / decode (DCA and plain, q_start
   not tile-aligned, T not a multiple of the block) vs `*_reference` in float32 on the same inputs,
   by ||out - ref|| / ||ref|| (bf16 operands: must be < 1e-2).
3. Prefill, B=1, 28 q / 4 kv heads, d=128, bf16, the WHOLE prompt as the query (T = S, q_start = 0):
   S = 32K with DCA (c=16384, w=2048: s=14336, the prompt spans DCA chunks 0..2 so intra, succ and inter
   all appear) and S = 128K (c=65536, w=8192: s=57344). Compared with dense cuDNN causal attention
   (jax.nn.dot_product_attention implementation="cudnn") on the same S, and the cuDNN 3-call DCA merge
   (zenjax/attention/cudnn.py) when that module exists, and the dispatcher's pallas path (on Hopper the
   Mosaic GPU kernel, pallas_kernels/dca_prefill_mgpu.py; elsewhere the Triton kernel above). TFLOP/s
   count causal-equivalent work 4 * S^2 * N * H / 2 for every path, so the columns compare times. At 128K also the last chunked-prefill
   step alone (8192 queries at q_start = S - 8192), and at 32K an A/B of the DCA kernel without its
   uniform-tile fast path.
4. Decode, T=1, at 128K and 1M cached tokens (DCA c=65536, w=8192 at 128K; Qwen2.5-1M's c=262144,
   w=8192 at 1M), in GB/s of K/V bytes read (2 * kv_len * K * H * 2 bytes), vs the 3.35 TB/s datasheet
   HBM bandwidth and vs the measured copy; also the Pallas call alone (no LSE merge) and the cuDNN path.
Timings: median of wall-clock times around block_until_ready after warm-up (one compile per variant);
decode queues 5 calls per sync so host dispatch stays hidden.
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from benchmarks.common import bench

N, K, H = 28, 4, 128


def ceilings(res: dict) -> None:
    for dtype in (jnp.float32, jnp.bfloat16):                        # 4 / 2 GiB, far past the L2
        x = jax.random.normal(jax.random.key(1), (1024, 1024, 1024), dtype)
        t = bench(jax.jit(lambda a: a + jnp.asarray(1, dtype)), x, reps=10)
        res[f"copy_{jnp.dtype(dtype).name}_GBps"] = 2 * x.nbytes / t / 1e9
        del x
    res["copy_GBps"] = max(res["copy_float32_GBps"], res["copy_bfloat16_GBps"])
    a = jax.random.normal(jax.random.key(2), (8192, 8192), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(3), (8192, 8192), jnp.bfloat16)
    t = bench(jax.jit(lambda a, b: a @ b), a, b)
    res["matmul_TFLOPs"] = 2 * 8192 ** 3 / t / 1e12
    print(f"copy {res['copy_float32_GBps']:.0f} / {res['copy_bfloat16_GBps']:.0f} GB/s f32 / bf16 (read+write), bf16 matmul {res['matmul_TFLOPs']:.0f} TFLOP/s",
          flush=True)


def _qkv(key, B, T, S, R, dtype=jnp.bfloat16):
    k1, k2, k3 = jax.random.split(key, 3)
    shape_q = (R, B, T, N, H) if R else (B, T, N, H)
    return (jax.random.normal(k1, shape_q, dtype), jax.random.normal(k2, (B, S, K, H), dtype),
            jax.random.normal(k3, (B, S, K, H), dtype))


def correctness(res: dict) -> None:
    from pallas_kernels.dca_decode import dca_decode, dca_decode_reference
    from pallas_kernels.dca_prefill import dca_prefill, dca_prefill_reference
    rel = lambda a, b, m: float(jnp.linalg.norm(jnp.where(m, a.astype(jnp.float32) - b, 0))
                                / jnp.linalg.norm(jnp.where(m, b, 0)))
    B, T, S, s = 2, 300, 1024, 256
    q_start = jnp.array([500, 37], jnp.int32)
    kv_len = q_start + T - jnp.array([0, 5], jnp.int32)
    valid = (jnp.arange(T)[None, :] < (kv_len - q_start)[:, None])[:, :, None, None]
    for name, cl, R in [("dca", s, 3), ("plain", None, 0)]:
        q, k, v = _qkv(jax.random.key(7), B, T, S, R)
        out, lse = dca_prefill(q, k, v, q_start, kv_len, chunk_len=cl)
        ref, ref_lse = dca_prefill_reference(q, k, v, q_start, kv_len, chunk_len=cl)
        res[f"check_prefill_{name}_rel"] = rel(out, ref, valid)
        res[f"check_prefill_{name}_lse_maxabs"] = float(jnp.max(jnp.where(valid[..., 0], jnp.abs(lse - ref_lse), 0)))
        qd = q[..., -1:, :, :]                                       # decode: the last query row
        kl = jnp.array([S, 777], jnp.int32)
        out, lse = dca_decode(qd, k, v, kl - 1, kl, chunk_len=cl)
        ref, ref_lse = dca_decode_reference(qd, k, v, kl - 1, kl, chunk_len=cl)
        res[f"check_decode_{name}_rel"] = rel(out, ref, True)
        res[f"check_decode_{name}_lse_maxabs"] = float(jnp.max(jnp.abs(lse - ref_lse)))
    print({k: f"{v:.2e}" for k, v in res.items() if k.startswith("check_")}, flush=True)
    res["checks_pass"] = all(v < 1e-2 for k, v in res.items() if k.startswith("check_") and k.endswith("_rel"))


# (block_q, block_k, num_warps, num_stages); history in benchmarks/NOTES-attention.md. 128-key tiles
# no longer fit in shared memory since the DCA loop has two branches (uniform / mixed).
PREFILL_CONFIGS = [(128, 64, 8, 3), (64, 64, 4, 3)]


def prefill(res: dict, S: int, c: int, w: int, sweep: bool, rows: list) -> None:
    from pallas_kernels.dca_prefill import dca_prefill
    flops = 4 * S * S * N * H / 2
    q3, k, v = _qkv(jax.random.key(S), 1, S, S, 3)
    zero, full = jnp.zeros((1,), jnp.int32), jnp.full((1,), S, jnp.int32)

    def record(name, f, *args):
        try:
            t = bench(f, *args, reps=5 if S > 65536 else 10)
            res[f"prefill_{S}_{name}_ms"] = t * 1e3
            rows.append((f"prefill S={S // 1024}K", name, f"{t * 1e3:.2f} ms", f"{flops / t / 1e12:.0f} TFLOP/s"))
            print(rows[-1], flush=True)
            return t
        except Exception as e:                                       # keep the rest of the run going
            res[f"prefill_{S}_{name}_error"] = repr(e)[:400]
            print(f"prefill S={S} {name} failed: {e!r}"[:600], flush=True)
            return None

    cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                 implementation="cudnn"))
    t_cudnn = record("cudnn dense causal", cudnn, q3[0], k, v)
    best = None
    for bq, bk, nw, ns in (PREFILL_CONFIGS if sweep else [tuple(res["prefill_best_config"])]):
        f = jax.jit(lambda q, k, v, bq=bq, bk=bk, nw=nw, ns=ns: dca_prefill(
            q, k, v, zero, full, chunk_len=c - w, block_q=bq, block_k=bk, num_warps=nw, num_stages=ns)[0])
        t = record(f"pallas DCA bq{bq} bk{bk} w{nw} s{ns}", f, q3, k, v)
        if t is not None and (best is None or t < best[0]):
            best = (t, (bq, bk, nw, ns))
    if best is not None:
        res["prefill_best_config"] = list(best[1])
        bq, bk, nw, ns = best[1]
        if sweep:                                                    # A/B: always the per-row select
            f = jax.jit(lambda q, k, v: dca_prefill(q, k, v, zero, full, chunk_len=c - w, block_q=bq, block_k=bk,
                                                    num_warps=nw, num_stages=ns, uniform_fast_path=False)[0])
            record(f"pallas DCA bq{bq} bk{bk} w{nw} s{ns} no fast path", f, q3, k, v)
        f = jax.jit(lambda q, k, v: dca_prefill(q, k, v, zero, full, chunk_len=None, block_q=bq,
                                                block_k=bk, num_warps=nw, num_stages=ns)[0])
        record(f"pallas plain causal bq{bq} bk{bk} w{nw} s{ns}", f, q3[0], k, v)
        if t_cudnn:
            res[f"prefill_{S}_dca_vs_cudnn"] = t_cudnn / best[0]
    # The dispatcher's pallas path: on Hopper the Mosaic GPU kernel (pallas_kernels/dca_prefill_mgpu.py)
    from zenjax.attention import pallas as attention_pallas
    from zenjax.config import DCAConfig
    f = jax.jit(lambda q, k, v: attention_pallas.attention_lse(q, k, v, q_start=zero, kv_len=full,
                                                             dca=DCAConfig(c, w, c))[0])
    t = record("pallas DCA via dispatcher (Mosaic GPU on Hopper)", f, q3, k, v)
    if t and t_cudnn:
        res[f"prefill_{S}_dispatcher_vs_cudnn"] = t_cudnn / t
    try:
        from zenjax.attention import cudnn as attention_cudnn
        dca = DCAConfig(c, w, c)
        # q_start / kv_len are concrete here, so the module cuts the prompt at DCA chunk boundaries itself
        # (one cuDNN call per region and per DCA chunk of rows) and merges by LSE.
        f = jax.jit(lambda q, k, v: attention_cudnn.attention(q, k, v, q_start=zero, kv_len=full, dca=dca))
        record("cudnn 3-call DCA merge", f, q3, k, v)
    except ImportError as e:
        attention_cudnn = None
        res["cudnn_merge_missing"] = repr(e)
    if best is None or S < 131072:
        return
    # The last chunked-prefill step of the prompt: T = 8192 queries at q_start = S - T against S keys.
    # Work: row p sees p + 1 keys -> 4 * N * H * sum(p + 1) (causal-equivalent, as above).
    T = 8192
    qc = q3[:, :, S - T:]
    qs_c = jnp.full((1,), S - T, jnp.int32)
    flops_c = 4 * N * H * (T * (S - T) + T * (T + 1) / 2)
    bq, bk, nw, ns = best[1]
    chunk_rows = []
    for name, f in [(f"pallas DCA last 8K chunk bq{bq} bk{bk} w{nw} s{ns}",
                     jax.jit(lambda q, k, v: dca_prefill(q, k, v, qs_c, full, chunk_len=c - w, block_q=bq,
                                                         block_k=bk, num_warps=nw, num_stages=ns)[0])),
                    ("cudnn 3-call DCA merge, last 8K chunk",
                     None if attention_cudnn is None else jax.jit(lambda q, k, v: attention_cudnn.attention(
                         q, k, v, q_start=qs_c, kv_len=full, dca=DCAConfig(c, w, c))))]:
        if f is None:
            continue
        try:
            t = bench(f, qc, k, v, reps=10)
            res[f"prefill_{S}_{name}_ms"] = t * 1e3
            rows.append((f"chunk 8K@{S // 1024}K", name, f"{t * 1e3:.2f} ms", f"{flops_c / t / 1e12:.0f} TFLOP/s"))
            print(rows[-1], flush=True)
        except Exception as e:
            res[f"prefill_{S}_{name}_error"] = repr(e)[:400]
            print(f"{name} failed: {e!r}"[:600], flush=True)


# (block_k, num_splits or None = auto, num_warps, num_stages); history in benchmarks/NOTES-attention.md.
DECODE_CONFIGS = [(64, None, 2, 3), (64, 64, 2, 4), (32, None, 2, 4)]
HBM_SPEC_GBPS = 3350.0                                               # H100 SXM datasheet


def decode(res: dict, S: int, c: int, w: int, rows: list) -> None:
    from pallas_kernels.dca_decode import _decode_partials, dca_decode, default_num_splits
    q3, k, v = _qkv(jax.random.key(S + 1), 1, 1, S, 3)
    kv_len = jnp.full((1,), S, jnp.int32)
    nbytes = 2 * S * K * H * 2

    def record(name, f, reps=20, inner=5):
        try:
            t = bench(f, q3, k, v, reps=reps, inner=inner)
            gbps = nbytes / t / 1e9
            res[f"decode_{S}_{name}_us"] = t * 1e6
            rows.append((f"decode kv={S // 1024}K", name, f"{t * 1e6:.0f} us",
                         f"{gbps:.0f} GB/s = {100 * gbps / HBM_SPEC_GBPS:.0f}% of 3.35 TB/s, "
                         f"{100 * gbps / res['copy_GBps']:.0f}% of copy"))
            print(rows[-1], flush=True)
            return t
        except Exception as e:
            res[f"decode_{S}_{name}_error"] = repr(e)[:400]
            print(f"decode {S} {name} failed: {e!r}"[:600], flush=True)

    best = None
    for bk, splits, nw, ns in DECODE_CONFIGS:
        name = f"pallas DCA decode bk{bk} splits{splits or 'auto'} w{nw} s{ns}"
        f = jax.jit(lambda q, k, v, bk=bk, splits=splits, nw=nw, ns=ns: dca_decode(
            q, k, v, kv_len - 1, kv_len, chunk_len=c - w, block_k=bk, num_splits=splits,
            num_warps=nw, num_stages=ns)[0])
        t = record(name, f)
        if t is not None and (best is None or t < best[0]):
            best = (t, (bk, splits, nw, ns))
    if best is not None:                                             # the Pallas call alone, no LSE merge
        bk, splits, nw, ns = best[1]
        splits = splits or default_num_splits(1, K, S, bk)
        f = jax.jit(lambda q, k, v: _decode_partials(q, k, v, kv_len - 1, kv_len, chunk_len=c - w, block_k=bk,
                                                     num_splits=splits, num_warps=nw, num_stages=ns,
                                                     interpret=False)[0])
        record(f"  same, kernel only (no merge) splits{splits}", f)
    try:
        from zenjax.attention import cudnn as attention_cudnn
        from zenjax.config import DCAConfig
        dca = DCAConfig(c, w, c)
        f = jax.jit(lambda q, k, v: attention_cudnn.attention(q, k, v, q_start=kv_len - 1, kv_len=kv_len,
                                                              dca=dca))
        record("cudnn DCA decode (3 calls + merge)", f, reps=10, inner=2)
    except ImportError:
        pass
    del q3, k, v


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="write the raw numbers here (JSON)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: check,prefill32,prefill128,decode")
    args = ap.parse_args(argv)
    skip = set(args.skip.split(","))
    res: dict = {"jax": jax.__version__, "device": str(jax.devices()[0].device_kind)}
    rows: list = []
    ceilings(res)
    if "check" not in skip:
        try:
            correctness(res)
        except Exception as e:                                       # report it, still time the rest
            res["check_error"] = repr(e)[:2000]
            print("GPU correctness check failed to run:", repr(e)[:2000], flush=True)
    if "prefill32" not in skip:
        prefill(res, 32768, 16384, 2048, sweep=True, rows=rows)
    if "prefill128" not in skip and "prefill_best_config" in res:
        prefill(res, 131072, 65536, 8192, sweep=False, rows=rows)
    if "decode" not in skip:
        decode(res, 131072, 65536, 8192, rows)
        decode(res, 1 << 20, 262144, 8192, rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    print(f"\n{res['device']}, jax {res['jax']}: copy {res['copy_float32_GBps']:.0f} GB/s (f32), "
          f"{res['copy_bfloat16_GBps']:.0f} GB/s (bf16) read+write, matmul "
          f"{res['matmul_TFLOPs']:.0f} TFLOP/s, GPU checks pass: {res.get('checks_pass')}")
    print(f"{'case':<16} | {'path':<48} | {'time':>10} | rate")
    for r in rows:
        print(f"{r[0]:<16} | {r[1]:<48} | {r[2]:>10} | {r[3]}")
    return res


if __name__ == "__main__":
    main()
