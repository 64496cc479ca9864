"""impl="pallas" of the attention dispatcher: routes to the Pallas DCA kernels in pallas_kernels/.

Same contract as zenjax/attention/__init__.py (shapes, semantics, padding rows): q [B,T,N,H] (plain) or
[3,B,T,N,H] (DCA: intra, succ, inter), k_cache / v_cache [B,S,K,H], q_start / kv_len [B] int32.
A step with T <= DECODE_MAX_T queries goes to the split-K decode kernel (it parallelizes over the keys),
longer query chunks to a prefill kernel (it parallelizes over query tiles; the Mosaic one also over keys
when a short chunk would leave SMs idle, SPLIT_KEYS): on a GPU with bf16/f16 inputs
and head_dim a multiple of 64, the Mosaic GPU (Hopper wgmma + TMA) kernel `dca_prefill_mgpu`; otherwise
(CPU interpret mode, float32, other GPUs' head sizes) the portable Triton-lowered `dca_prefill`.
Measured on the H100 (benchmarks/RESULTS.md, 2026-11-23, 28/4 heads, d=128, DCA): Mosaic 597 TFLOP/s at
32K and 630 at 128K vs dense cuDNN causal 615 / 586 (97% / 108%); Triton 434 / 451.

Block sizes: powers of two that divide the DCA chunk length s (tiles must not straddle a DCA chunk
boundary); for Qwen2.5-1M s = 253952 = 2^13 * 31, so the defaults (128 / 64) fit. A config
whose s has no power-of-two divisor >= 16 is refused with a ValueError naming s.
On a host without a GPU the kernels run in Pallas interpret mode (slow; for tests).
"""
from __future__ import annotations

from pallas_kernels.dca_decode import dca_decode
from pallas_kernels.dca_prefill import dca_prefill
from zenjax.config import DCAConfig, is_hopper

DECODE_MAX_T = 8
# Tuned on an H100 (benchmarks/NOTES-attention.md, 2026-11-23, d = 128, bf16): prefill 128-query x 64-key
# tiles, 8 warps, 3 stages; decode 64-key tiles, 2 warps, 3 stages, splits from `default_num_splits`.
# 128-key tiles no longer fit: the two branches of the DCA loop (uniform / mixed) each get their own
# pipeline buffers and Triton then asks for ~416 KB of shared memory (the H100 has 227 KB).
PREFILL_BLOCK_Q = 128
PREFILL_BLOCK_K = 64
PREFILL_WARPS, PREFILL_STAGES = 8, 3
DECODE_BLOCK_K = 64
DECODE_WARPS, DECODE_STAGES = 2, 3
# Mosaic GPU prefill: 64-row query tiles per warpgroup (two warpgroups per CTA), 128-key tiles in 2 TMA
# slots: the only 128-key DCA config that fits SMEM with three query variants (bk64 runs 11-16% slower).
MGPU_BLOCK_K, MGPU_STEPS = 128, 2
# A short query chunk over a long cache (a 256-row piece of a 128K prompt: 56 CTAs for 132 SMs) also splits
# the keys, `prefill_num_splits` picks how many; False = one CTA per query-tile pair and head (before).
SPLIT_KEYS = True


def _use_mgpu(q, interpret: bool | None) -> bool:
    import jax
    import jax.numpy as jnp
    if interpret or (interpret is None and jax.default_backend() != "gpu"):
        return False
    if q.dtype not in (jnp.bfloat16, jnp.float16) or q.shape[-1] % 64:
        return False
    return is_hopper(jax.devices()[0].device_kind)


def _block(cap: int, chunk_len: int | None, what: str) -> int:
    """Largest power of two <= cap, >= 16, dividing chunk_len (any when plain attention)."""
    b = cap
    while b >= 16:
        if chunk_len is None or chunk_len % b == 0:
            return b
        b //= 2
    raise ValueError(f"pallas attention: DCA chunk length s={chunk_len} (chunk_size - local_size) has no "
                     f"power-of-two divisor >= 16 for the {what} tile; use impl='reference' or 'cudnn'")


# Prefill on an e4m3 cache: the Triton prefill kernel can read e4m3 tiles + scales itself (dca_prefill's
# k_scale / v_scale, tested), but measured on the H200 (2026-12-02, 131072 keys, 2048 rows, 28/4 heads,
# benchmarks/check_fp8_decode.py) it takes 17.4 ms against 7.1 ms for dequantizing the layer's K/V to bf16
# and running the Mosaic kernel (10.5 ms with the Triton kernel): prefill is compute-bound, the per-tile
# e4m3 -> f16 conversion sits on the tensor cores' critical path, and the copy (one layer, transient:
# 2 GB at 1M keys, against a 29 GB e4m3 cache) is paid once per piece of thousands of rows. So prefill
# dequantizes; decode (bandwidth-bound) reads e4m3 in the kernel.
PREFILL_READS_FP8 = False


def attention_lse(q, k_cache, v_cache, *, q_start, kv_len, dca: DCAConfig | None = None,
                  interpret: bool | None = None, k_scale=None, v_scale=None, kv_rows=None):
    """(out [B,T,N,H] in q's dtype, lse [B,T,N] float32) through the Pallas kernels. An e4m3 cache
    (k_scale, v_scale [B,S,K]) is read directly by the decode kernel; prefill dequantizes the layer first
    (PREFILL_READS_FP8 says why). kv_rows [B] (meta.py): the cache rows the query rows read, caches
    [R, S, K, H]; the Mosaic prefill kernel indexes them in place, the other paths get a copy of the rows."""
    chunk_len = None if dca is None else dca.chunk_len
    T = q.shape[-3]
    in_place = (T > DECODE_MAX_T and k_scale is None and _use_mgpu(q, interpret)   # the Mosaic prefill below
                and (chunk_len is None or chunk_len % 64 == 0))
    if kv_rows is not None and not in_place:
        from zenjax.attention.meta import select_rows
        k_cache, v_cache, k_scale, v_scale = select_rows(kv_rows, k_cache, v_cache, k_scale, v_scale)
        kv_rows = None
    if T <= DECODE_MAX_T and (chunk_len is None or T < chunk_len):
        block_k = _block(DECODE_BLOCK_K, chunk_len, "decode key")
        if k_scale is None or k_cache.shape[1] % block_k == 0:
            return dca_decode(q, k_cache, v_cache, q_start, kv_len, chunk_len=chunk_len, block_k=block_k,
                              num_warps=DECODE_WARPS, num_stages=DECODE_STAGES, interpret=interpret,
                              k_scale=k_scale, v_scale=v_scale)
    # A short chunk gets a short query tile (fewer padded rows): the power of two >= T, 16..128.
    cap_q = min(PREFILL_BLOCK_Q, max(16, 1 << (T - 1).bit_length()))
    triton = dict(chunk_len=chunk_len, block_q=_block(cap_q, chunk_len, "prefill query"),
                  block_k=_block(PREFILL_BLOCK_K, chunk_len, "prefill key"), num_warps=PREFILL_WARPS,
                  num_stages=PREFILL_STAGES, interpret=interpret)
    if k_scale is not None:
        if PREFILL_READS_FP8 and k_cache.shape[1] % triton["block_k"] == 0:
            return dca_prefill(q, k_cache, v_cache, q_start, kv_len, k_scale=k_scale, v_scale=v_scale, **triton)
        from zenjax.model import dequantize_fp8
        k_cache, v_cache = dequantize_fp8(k_cache, k_scale, q.dtype), dequantize_fp8(v_cache, v_scale, q.dtype)
    if _use_mgpu(q, interpret) and (chunk_len is None or chunk_len % 64 == 0):
        from pallas_kernels.dca_prefill_mgpu import dca_prefill_mgpu, prefill_num_splits
        block_k = MGPU_BLOCK_K if chunk_len is None or chunk_len % MGPU_BLOCK_K == 0 else 64
        B, N = q.shape[-4], q.shape[-2]                               # q [3,]B,T,N,H
        splits = prefill_num_splits(B, N, T, k_cache.shape[1], block_k) if SPLIT_KEYS else 1
        return dca_prefill_mgpu(q, k_cache, v_cache, q_start, kv_len, chunk_len=chunk_len, block_k=block_k,
                                max_concurrent_steps=MGPU_STEPS, num_splits=splits, interpret=False,
                                kv_rows=kv_rows)
    return dca_prefill(q, k_cache, v_cache, q_start, kv_len, **triton)


READS_FP8 = True     # the decode kernel reads an e4m3 cache and its scales; prefill dequantizes (attention_lse)
# meta.kv_rows: the Mosaic prefill kernel reads a prefilling slot's row of the server's [max_batch, S, K, H]
# cache in place. Why: a kernel call takes its operands as buffers, so a dynamic slice of the row is expected
# to be copied into a new one per layer and piece: at S = 132096 (4 kv heads, d 128, bf16) 270 MB of K/V
# read and written per layer, ~15 GB and ~5 ms a piece on an H100 whatever the piece's size or context,
# which a 100 ms inter-token budget would pay on each of its ~150 small pieces of a 128K prompt
# (benchmarks/RESULTS.md, session 15). Not yet measured: benchmarks/check_kv_rows.py times both ways.
READS_KV_ROWS = True


def run(q, k_cache, v_cache, meta, k_scale=None, v_scale=None):
    """The dispatcher's entry: (out in q's dtype, lse float32)."""
    return attention_lse(q, k_cache, v_cache, q_start=meta.q_start, kv_len=meta.kv_len, dca=meta.dca,
                         k_scale=k_scale, v_scale=v_scale, kv_rows=meta.kv_rows)


def SPARSE_READY() -> bool:
    """sparse="auto" turns sparse prefill on where the Mosaic GPU sparse kernel runs (a Hopper GPU): it passes
    its GPU check (rel 2.8e-3, LSE 1.9e-6 against the reference mask), runs a 1M prompt of the 7B shape in
    38.3 s with Qwen's budgets as A-shape heads (dense: 400.8 s), and the demo model's passkey accuracy
    with sparse on equals dense at 32K and 128K (H200, 2026-12-02, benchmarks/RESULTS.md). Elsewhere the
    sparse path would be the O(T*S) reference, so "auto" stays dense there."""
    import jax
    try:
        return jax.default_backend() == "gpu" and is_hopper(jax.devices()[0].device_kind)
    except RuntimeError:
        return False


def run_sparse(q, k_cache, v_cache, meta):
    """Sparse prefill (zenjax/attention/sparse.py's mask): on Hopper with bf16/f16, H % 64 == 0 and a DCA
    chunk length that is a multiple of 128 (or plain RoPE), the Mosaic GPU kernel
    `pallas_kernels.vs_prefill_mgpu`; otherwise the plain-jnp reference."""
    from zenjax.attention import sparse
    s = None if meta.dca is None else meta.dca.chunk_len
    if _use_mgpu(q, None) and (s is None or s % 128 == 0):
        from pallas_kernels.vs_prefill_mgpu import vs_prefill_mgpu
        return vs_prefill_mgpu(q, k_cache, v_cache, meta.q_start, meta.kv_len, meta.indices.vertical,
                               meta.indices.slash, chunk_len=s, interpret=False)
    return sparse.run_sparse(q, k_cache, v_cache, meta)
