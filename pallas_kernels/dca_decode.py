"""DCA decode: split-K flash-decoding of a few queries per sequence against a long KV cache.

Flow: `dca_decode` regroups the queries of one kv head into one tile of rows (row r = t * G + g: query
t, head g of the group; padded to >= 16 rows for the tensor cores) and launches one Pallas program per
(split, kv head, batch row). Each program reads K/V straight from the [B, S, K, H] cache (no copy, no
repeat over the G heads) and walks its share of the key tiles below min(kv_len, last query + 1) with the
shared DCA loop of `_flash_dca` (intra / succ / inter query chosen per key chunk, spec 2.5), writing a
normalized partial output and its LSE. The partials are merged by LSE in jnp (spec 2.4) - a few MB,
against hundreds of MB of K/V read at 128K keys.

Why the split is computed from kv_len inside the kernel: the grid is static (it must be, under jit) but
the valid length is data. Program j takes tiles [j * per, (j + 1) * per) with per = cdiv(valid tiles,
num_splits), so the work is spread evenly whether the 1M-slot cache holds 1K or 1M tokens.
Worked example: kv_len = 131072, block_k = 128 -> 1024 tiles; num_splits = 128 -> 8 tiles (1024 keys)
per program, 128 x 4 kv heads = 512 programs on 132 SMs.

`dca_decode_reference` is the plain-jnp reference (the prefill reference at small T: decode is the same
mathematics with T = 1).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._flash_dca import (check_dca_blocks, default_interpret, finish, flash_over_key_tiles,
                                       init_carry, lse_merge, pad_axis)
from pallas_kernels.dca_prefill import _split_variants, _validate, dca_prefill_reference

MIN_ROWS = 16  # smallest M of a tensor-core tile in the Triton lowering


def _decode_kernel(q_start_ref, kv_len_ref, *refs, n_variants, num_splits, block_k, chunk_len,
                   seq_len, num_queries, group, scale):
    q_refs = refs[:n_variants]
    k_ref, v_ref, o_ref, lse_ref = refs[n_variants:]
    split = pl.program_id(0)
    rows = o_ref.shape[0]
    q_start = q_start_ref[...]
    kv_len = jnp.minimum(kv_len_ref[...], seq_len)
    # Padding rows (r >= T*G) reuse the last query's position: same chunks, output dropped later.
    t = jnp.minimum(lax.div(jnp.arange(rows, dtype=jnp.int32), group), num_queries - 1)
    row_pos = q_start + t
    visible_end = jnp.minimum(kv_len, q_start + num_queries)
    tiles = lax.div(visible_end + block_k - 1, block_k)
    per = lax.div(tiles + num_splits - 1, num_splits)
    lo = jnp.minimum(split * per, tiles)
    hi = jnp.minimum(lo + per, tiles)
    carry = init_carry(rows, o_ref.shape[-1])
    carry = flash_over_key_tiles(q_refs, k_ref, v_ref, carry, row_pos=row_pos, first_pos=q_start,
                                 tile_lo=lo, tile_hi=hi, kv_len=kv_len, chunk_len=chunk_len,
                                 block_k=block_k, scale=scale, seq_len=seq_len)
    o, lse = finish(carry)                                           # empty split: o = 0, lse = -inf
    o_ref[...] = o
    lse_ref[...] = lse


@functools.partial(jax.jit, static_argnames=("chunk_len", "block_k", "num_splits", "num_warps",
                                             "num_stages", "interpret"))
def _dca_decode(q3, k, v, q_start, kv_len, **static):
    """The kernel's split partials merged by LSE: (out [B,T,N,H] q.dtype, lse [B,T,N] f32)."""
    R, B, T, N, H = q3.shape
    K = k.shape[2]
    G = N // K
    o_part, lse_part = _decode_partials(q3, k, v, q_start, kv_len, **static)
    out, lse = lse_merge(o_part, lse_part, axis=0)                  # [B, K, rows, H], [B, K, rows]
    out = out[:, :, :T * G].reshape(B, K, T, G, H).transpose(0, 2, 1, 3, 4).reshape(B, T, N, H)
    lse = lse[:, :, :T * G].reshape(B, K, T, G).transpose(0, 2, 1, 3).reshape(B, T, N)
    return out.astype(q3.dtype), lse


def _decode_partials(q3, k, v, q_start, kv_len, *, chunk_len, block_k, num_splits, num_warps, num_stages,
                     interpret):
    """The Pallas call alone: per-split (o [splits, B, K, rows, H], lse [splits, B, K, rows]) float32."""
    R, B, T, N, H = q3.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    rows = max(MIN_ROWS, pl.next_power_of_2(T * G))
    # [R, B, T, K, G, H] -> [R, B, K, T*G, H], padded to `rows`: a tiny copy of the queries only.
    qg = q3.reshape(R, B, T, K, G, H).transpose(0, 1, 3, 2, 4, 5).reshape(R, B, K, T * G, H)
    qg = pad_axis(qg, 3, rows)
    # K/V are never copied: when S is not a multiple of block_k the block is rounded up to whole tiles
    # and the kernel loads the rows past S masked (interpret mode pads the block itself).
    Sp = -(-S // block_k) * block_k
    kernel = functools.partial(_decode_kernel, n_variants=R, num_splits=num_splits, block_k=block_k,
                               chunk_len=chunk_len, seq_len=S, num_queries=T, group=G,
                               scale=H ** -0.5)
    scalar_spec = pl.BlockSpec((None,), lambda j, h, b: (b,))
    q_specs = [pl.BlockSpec((None, None, None, rows, H), lambda j, h, b, r=r: (r, b, h, 0, 0))
               for r in range(R)]
    kv_spec = pl.BlockSpec((None, Sp, None, H), lambda j, h, b: (b, 0, h, 0))
    o_part, lse_part = pl.pallas_call(
        kernel,
        grid=(num_splits, K, B),
        in_specs=[scalar_spec, scalar_spec, *q_specs, kv_spec, kv_spec],
        out_specs=[pl.BlockSpec((None, None, None, rows, H), lambda j, h, b: (j, b, h, 0, 0)),
                   pl.BlockSpec((None, None, None, rows), lambda j, h, b: (j, b, h, 0))],
        out_shape=[jax.ShapeDtypeStruct((num_splits, B, K, rows, H), jnp.float32),
                   jax.ShapeDtypeStruct((num_splits, B, K, rows), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="dca_decode",
    )(q_start, kv_len, *([qg] * R), k, v)
    return o_part, lse_part


def default_num_splits(batch: int, kv_heads: int, seq_len: int, block_k: int,
                       target_programs: int = 512) -> int:
    """Enough (split, kv head, batch) programs to cover 132 SMs ~4 times, never more than the tiles."""
    tiles = -(-seq_len // block_k)
    return max(1, min(tiles, -(-target_programs // (batch * kv_heads))))


def dca_decode(q, k, v, q_start, kv_len, *, chunk_len: int | None = None, block_k: int = 64,
               num_splits: int | None = None, num_warps: int = 2, num_stages: int = 3,
               interpret: bool | None = None):
    """Attention of a few queries per sequence (T small, typically 1) against the cache, DCA or plain.

    Same contract as `pallas_kernels.dca_prefill.dca_prefill`: q [3,B,T,N,H] (DCA, chunk_len = s) or
    [B,T,N,H] (plain); k, v [B,S,K,H]; q_start, kv_len [B] int32; query t sits at q_start + t and sees
    keys j <= q_start + t, j < kv_len. Returns (out [B,T,N,H] in q's dtype, lse [B,T,N] float32).
    T must be < s (the queries span at most two DCA chunks). num_splits=None picks
    `default_num_splits`.
    """
    q3 = _split_variants(q, chunk_len)
    _validate(q3, k, v, q_start, kv_len, chunk_len)
    check_dca_blocks(chunk_len, block_k=block_k)
    T = q3.shape[2]
    if chunk_len is not None and T >= chunk_len:
        raise ValueError(f"dca_decode: T={T} queries must be fewer than the DCA chunk length "
                         f"s={chunk_len}; use dca_prefill for long query chunks")
    if num_splits is None:
        num_splits = default_num_splits(k.shape[0], k.shape[2], k.shape[1], block_k)
    if num_splits < 1:
        raise ValueError(f"num_splits={num_splits} must be >= 1")
    if interpret is None:
        interpret = default_interpret()
    return _dca_decode(q3, k, v, jnp.asarray(q_start, jnp.int32), jnp.asarray(kv_len, jnp.int32),
                       chunk_len=chunk_len, block_k=block_k, num_splits=num_splits,
                       num_warps=num_warps, num_stages=num_stages, interpret=interpret)


def dca_decode_reference(q, k, v, q_start, kv_len, *, chunk_len: int | None = None):
    """Plain jnp float32 (out [B,T,N,H], lse [B,T,N]). Decode is prefill at small T, so this is
    `dca_prefill_reference`: per query, the intra / succ / inter key regions of spec 2.5 as masked
    partial attentions merged by LSE."""
    return dca_prefill_reference(q, k, v, q_start, kv_len, chunk_len=chunk_len)
