"""DCA prefill: flash attention of a query chunk against the KV cache, one pass, per-tile query variant.

Flow: `dca_prefill` checks shapes and block sizes, pads the queries to whole tiles, and launches one
Pallas program per (query tile, batch row, q head); the program walks the key tiles from 0 up to
min(kv_len, its last query position + 1) with the shared loop of `_flash_dca.flash_over_key_tiles`
(query variant chosen per DCA key chunk, mask only on the diagonal / kv_len edge), and writes its
normalized output tile and the row log-sum-exp. `dca_prefill_reference` is the same math in plain jnp,
written the other way round (three masked partial attentions merged by LSE, spec 2.3-2.4), so the two
check each other.

GQA without repeating K/V: q head n reads kv head n // G through the BlockSpec index map, and the grid
walks query tiles fastest, so the programs in flight share one kv head's K/V in L2. Query tiles are
launched last-first: the late tiles have the most keys, so the long programs start first and the short
ones fill the tail.

Portable Pallas (Triton lowering on GPU; interpret=True on CPU runs the same kernel body).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._flash_dca import (Fp8Ref, check_dca_blocks, default_interpret, finish,
                                       flash_over_key_tiles, init_carry, lse_merge, pad_axis)


def _split_variants(q, chunk_len):
    """q as [R, B, T, N, H] with R = 3 (DCA: intra, succ, inter) or 1 (plain); checks the rank."""
    if chunk_len is None:
        if q.ndim == 4:
            return q[None]
        if q.ndim == 5 and q.shape[0] == 1:
            return q
        raise ValueError(f"plain attention (chunk_len=None) wants q [B,T,N,H]; got shape {q.shape}")
    if q.ndim != 5 or q.shape[0] != 3:
        raise ValueError(f"DCA (chunk_len={chunk_len}) wants q [3,B,T,N,H] (intra, succ, inter); "
                         f"got shape {q.shape}")
    return q


def _validate(q3, k, v, q_start, kv_len, chunk_len):
    _, B, T, N, H = q3.shape
    if k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"k and v must both be [B,S,K,H]; got {k.shape} and {v.shape}")
    Bk, S, K, Hk = k.shape
    if (Bk, Hk) != (B, H):
        raise ValueError(f"q {q3.shape[1:]} and k {k.shape} disagree on batch or head_dim")
    if N % K:
        raise ValueError(f"q heads N={N} must be a multiple of kv heads K={K} (GQA groups)")
    if q_start.shape != (B,) or kv_len.shape != (B,):
        raise ValueError(f"q_start and kv_len must be [B]=[{B}]; got {q_start.shape}, {kv_len.shape}")
    if chunk_len is not None and chunk_len <= 0:
        raise ValueError(f"chunk_len={chunk_len} must be > 0")


def _prefill_kernel(q_start_ref, kv_len_ref, *refs, n_variants, num_q_tiles, block_q, block_k,
                    chunk_len, seq_len, scale, uniform_fast_path, fp8=False):
    q_refs = refs[:n_variants]
    if fp8:                                  # e4m3 K/V + per-key scales, read tile by tile (Fp8Ref)
        k8_ref, v8_ref, ks_ref, vs_ref, o_ref, lse_ref = refs[n_variants:]
        k_ref, v_ref = Fp8Ref(k8_ref, ks_ref), Fp8Ref(v8_ref, vs_ref)
    else:
        k_ref, v_ref, o_ref, lse_ref = refs[n_variants:]
    tile = num_q_tiles - 1 - pl.program_id(0)                        # launched last-first
    kv_len = jnp.minimum(kv_len_ref[...], seq_len)
    first_pos = q_start_ref[...] + tile * block_q
    row_pos = first_pos + jnp.arange(block_q, dtype=jnp.int32)
    visible_end = jnp.minimum(kv_len, first_pos + block_q)          # keys <= last row, < kv_len
    tile_hi = lax.div(visible_end + block_k - 1, block_k)
    carry = init_carry(block_q, o_ref.shape[-1])
    carry = flash_over_key_tiles(q_refs, k_ref, v_ref, carry, row_pos=row_pos, first_pos=first_pos,
                                 tile_lo=0, tile_hi=tile_hi, kv_len=kv_len, chunk_len=chunk_len,
                                 block_k=block_k, scale=scale, seq_len=seq_len,
                                 split_uniform=uniform_fast_path)
    o, lse = finish(carry)
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse


@functools.partial(jax.jit, static_argnames=("chunk_len", "block_q", "block_k", "num_warps",
                                             "num_stages", "interpret", "uniform_fast_path"))
def _dca_prefill(q3, k, v, q_start, kv_len, k_scale=None, v_scale=None, *, chunk_len, block_q, block_k,
                 num_warps, num_stages, interpret, uniform_fast_path=True):
    R, B, T, N, H = q3.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    q3 = pad_axis(q3, 2, block_q)
    # K/V are never copied: when S is not a multiple of block_k the block is rounded up to whole tiles
    # and the kernel loads the rows past S masked (interpret mode pads the block itself).
    Tp, Sp = q3.shape[2], -(-S // block_k) * block_k
    nqt = Tp // block_q
    rev = lambda i: nqt - 1 - i
    kernel = functools.partial(_prefill_kernel, n_variants=R, num_q_tiles=nqt, block_q=block_q,
                               block_k=block_k, chunk_len=chunk_len, seq_len=S, scale=H ** -0.5,
                               uniform_fast_path=uniform_fast_path, fp8=k_scale is not None)
    scalar_spec = pl.BlockSpec((None,), lambda i, b, n: (b,))
    q_specs = [pl.BlockSpec((None, None, block_q, None, H), lambda i, b, n, r=r: (r, b, rev(i), n, 0))
               for r in range(R)]
    kv_spec = pl.BlockSpec((None, Sp, None, H), lambda i, b, n: (b, 0, lax.div(n, G), 0))
    scale_specs, scales = [], []
    if k_scale is not None:                   # [B, S, K] float32 -> the [S] scales of one (row, kv head)
        scale_specs = [pl.BlockSpec((None, Sp, None), lambda i, b, n: (b, 0, lax.div(n, G)))] * 2
        scales = [k_scale, v_scale]
    out, lse = pl.pallas_call(
        kernel,
        grid=(nqt, B, N),
        in_specs=[scalar_spec, scalar_spec, *q_specs, kv_spec, kv_spec, *scale_specs],
        out_specs=[pl.BlockSpec((None, block_q, None, H), lambda i, b, n: (b, rev(i), n, 0)),
                   pl.BlockSpec((None, None, block_q), lambda i, b, n: (b, n, rev(i)))],
        out_shape=[jax.ShapeDtypeStruct((B, Tp, N, H), q3.dtype),
                   jax.ShapeDtypeStruct((B, N, Tp), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="dca_prefill",
    )(q_start, kv_len, *([q3] * R), k, v, *scales)
    return out[:, :T], lse[:, :, :T].transpose(0, 2, 1)


def dca_prefill(q, k, v, q_start, kv_len, *, chunk_len: int | None = None, block_q: int = 128,
                block_k: int = 64, num_warps: int = 8, num_stages: int = 3,
                interpret: bool | None = None, uniform_fast_path: bool = True, k_scale=None, v_scale=None):
    """Attention of T queries (absolute positions q_start + t) against the cache, DCA or plain.

    q: [3, B, T, N, H] (intra, succ, inter rotations) when chunk_len = s is given; [B, T, N, H] when
    chunk_len is None (plain RoPE). k, v: [B, S, K, H]. q_start, kv_len: [B] int32; row t sees keys
    j <= q_start + t, j < kv_len. Returns (out [B, T, N, H] in q's dtype, lse [B, T, N] float32,
    natural log, softmax scale 1/sqrt(H)). Block sizes must be powers of two >= 16 dividing s.
    Defaults: the fastest of the H100 sweep in benchmarks/NOTES-attention.md (d = 128, bf16).
    interpret=None: interpret mode unless the default backend is a GPU. uniform_fast_path=False always
    takes the per-row variant select (for A/B timing; results are the same).
    An e4m3 cache: k, v float8_e4m3fn with k_scale, v_scale [B,S,K] float32 (x = x8 * scale), read by the
    kernel tile by tile (`_flash_dca.Fp8Ref`, no dequantized copy); S must be a multiple of block_k.
    """
    q3 = _split_variants(q, chunk_len)
    _validate(q3, k, v, q_start, kv_len, chunk_len)
    check_dca_blocks(chunk_len, block_q=block_q, block_k=block_k)
    if interpret is None:
        interpret = default_interpret()
    check_fp8_scales(k, v, k_scale, v_scale, block_k, "dca_prefill")
    return _dca_prefill(q3, k, v, jnp.asarray(q_start, jnp.int32), jnp.asarray(kv_len, jnp.int32),
                        k_scale, v_scale, chunk_len=chunk_len, block_q=block_q, block_k=block_k, num_warps=num_warps,
                        num_stages=num_stages, interpret=interpret, uniform_fast_path=uniform_fast_path)


def check_fp8_scales(k, v, k_scale, v_scale, block_k: int, who: str) -> None:
    """ValueError unless the scales are both absent, or both [B, S, K] with S a multiple of block_k."""
    if (k_scale is None) != (v_scale is None):
        raise ValueError(f"{who}: give both k_scale and v_scale, or neither")
    if k_scale is None:
        return
    if k_scale.shape != k.shape[:3] or v_scale.shape != v.shape[:3]:
        raise ValueError(f"{who}: scales {k_scale.shape}, {v_scale.shape} must be [B, S, K] = {k.shape[:3]}")
    if k.shape[1] % block_k:
        raise ValueError(f"{who}: an e4m3 cache needs S={k.shape[1]} to be a multiple of block_k={block_k}")


def dca_prefill_reference(q, k, v, q_start, kv_len, *, chunk_len: int | None = None):
    """Plain jnp, float32: three masked partial attentions (intra causal, succ, inter) merged by LSE.

    Same contract as `dca_prefill`, returns (out [B,T,N,H] float32, lse [B,T,N] float32). O(T*S) memory.
    Worked example (s = 48): query p = 100 (chunk 2) sees keys 96..100 with q_intra, 48..95 with q_succ,
    0..47 with q_inter; each set gives (o_i, lse_i) and the result is their LSE merge (spec 2.4).
    """
    q3 = _split_variants(q, chunk_len)
    _validate(q3, k, v, q_start, kv_len, chunk_len)
    R, B, T, N, H = q3.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    qf = q3.astype(jnp.float32).reshape(R, B, T, K, G, H)
    kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
    p = jnp.asarray(q_start, jnp.int32)[:, None] + jnp.arange(T)[None, :]            # [B, T]
    j = jnp.arange(S)[None, None, :]
    visible = (j <= p[:, :, None]) & (j < jnp.asarray(kv_len, jnp.int32)[:, None, None])  # [B, T, S]
    if chunk_len is None:
        parts = [(qf[0], visible)]
    else:
        d = p[:, :, None] // chunk_len - j // chunk_len
        parts = [(qf[0], visible & (d == 0)), (qf[1], visible & (d == 1)), (qf[2], visible & (d >= 2))]
    outs, lses = [], []
    for qv, mask in parts:
        logits = jnp.einsum("btkgh,bskh->btkgs", qv, kf) * H ** -0.5
        logits = jnp.where(mask[:, :, None, None, :], logits, -jnp.inf)
        lse = jax.nn.logsumexp(logits, axis=-1)                                         # [B,T,K,G]
        probs = jnp.exp(logits - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None])
        outs.append(jnp.einsum("btkgs,bskh->btkgh", probs, vf))
        lses.append(lse)
    out, lse = lse_merge(jnp.stack(outs), jnp.stack(lses), axis=0)
    return out.reshape(B, T, N, H), lse.reshape(B, T, N)
