"""DCA decode: split-K flash-decoding of a few queries per sequence against a long KV cache.

Flow: `dca_decode` regroups the queries of one kv head into one tile of rows (row r = t * G + g: query
t, head g of the group; padded to >= 16 rows for the tensor cores) and launches one Pallas program per
(split, kv head, batch row). Each program reads K/V straight from the [B, S, K, H] cache (no copy, no
repeat over the G heads) and walks its share of the key tiles below min(kv_len, last query + 1) with a
DCA loop (intra / succ / inter query chosen per key chunk, spec 2.5; `loop` picks which, see LOOPS),
writing a normalized partial output and its LSE. The partials are merged by LSE in jnp (spec 2.4) - a few MB,
against hundreds of MB of K/V read at 128K keys - in one variadic reduction (`lse_merge_one_pass`): on the
H100 two kernels per layer (XLA materializes the LSEs broadcast over H, then reduces) instead of four.

Why the split is computed from kv_len inside the kernel: the grid is static (it must be, under jit) but
the valid length is data. Program j takes tiles [j * per, (j + 1) * per) with per = cdiv(valid tiles,
num_splits), so the work is spread evenly whether the 1M-slot cache holds 1K or 1M tokens.
Worked example: kv_len = 131072, block_k = 64 -> 2048 tiles; num_splits = 64 (`default_num_splits` on an
H100) -> 32 tiles (2048 keys) per program, 64 x 4 kv heads = 256 programs: one wave of 2 per SM.

Tuning: benchmarks/decode_sweep.py times splits x block_k x warps x stages x loop on the GPU. Its H100
run (2026-11-23, benchmarks/RESULTS.md) set DEFAULT_LOOP = "segments": 87.2% of HBM at 1M (66 splits,
the heuristic's pick) and 68.7% at 128K (64 splits); "single" was best at 128K (70.2%) but falls to 55% at
1M with 64 splits. Every config at 128K lands at 114-121 us: a fixed cost the key stream cannot hide.

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

from pallas_kernels._flash_dca import (LOG2E, Fp8Ref, _run_range, _tile_step, check_dca_blocks,
                                       default_interpret, finish, flash_over_key_tiles, init_carry,
                                       lse_merge_one_pass, pad_axis)
from pallas_kernels.dca_prefill import _split_variants, _validate, check_fp8_scales, dca_prefill_reference

MIN_ROWS = 16  # smallest M of a tensor-core tile in the Triton lowering
# How a program walks its key tiles (static; benchmarks/decode_sweep.py times all three):
#   "cond"     `_flash_dca.flash_over_key_tiles` as in prefill: lax.cond(uniform, mixed), up to 8 loops.
#              The code measured in benchmarks/NOTES-attention.md (run 3).
#   "segments" T = 1: the uniform branch only (rows cannot straddle a chunk), 6 loops, no cond;
#              T > 1 falls back to "cond". The default (decode_sweep.py on the H100).
#   "single"   one masked loop, query variant selected per tile (`_single_loop`).
LOOPS = ("cond", "segments", "single")
DEFAULT_LOOP = "segments"
# Split heuristic (`default_num_splits`): resident programs per SM it plans for, and the per-program
# start cost (query loads, bookkeeping, pipeline fill) in units of one key tile's streaming time.
# Rough fit to run 3: 16 tiles/program at 512 programs took 157 us, 32 tiles at 256 took 131 us, and
# 128 tiles at 512 (1M) 780 us -> the start cost is several tiles. Re-fit from decode_sweep.py output.
CTAS_PER_SM = 2
START_COST_TILES = 4
FALLBACK_NUM_SMS = 132                                               # H100 SXM


def _decode_kernel(q_start_ref, kv_len_ref, *refs, n_variants, num_splits, block_k, chunk_len,
                   seq_len, num_queries, group, scale, loop, fp8=False):
    q_refs = refs[:n_variants]
    if fp8:
        k8_ref, v8_ref, ks_ref, vs_ref, o_ref, lse_ref = refs[n_variants:]
        k_ref, v_ref = Fp8Ref(k8_ref, ks_ref), Fp8Ref(v8_ref, vs_ref)
    else:
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
    common = dict(row_pos=row_pos, tile_lo=lo, tile_hi=hi, kv_len=kv_len, chunk_len=chunk_len,
                  block_k=block_k, scale=scale, seq_len=seq_len)
    if loop == "single":
        carry = _single_loop(q_refs, k_ref, v_ref, carry, q_start=q_start, one_position=num_queries == 1,
                             **common)
    elif loop == "segments" and num_queries == 1 and chunk_len is not None:
        carry = _uniform_segments(q_refs, k_ref, v_ref, carry, q_pos=q_start, **common)
    else:                                    # "cond", or "segments" where the rows may straddle chunks
        carry = flash_over_key_tiles(q_refs, k_ref, v_ref, carry, first_pos=q_start, **common)
    o, lse = finish(carry)                                           # empty split: o = 0, lse = -inf
    o_ref[...] = o
    lse_ref[...] = lse


def _ragged(seq_len, block_k):
    """The cache length when the last key tile reads past it (masked loads), else None (static)."""
    return seq_len if seq_len % block_k else None


def _uniform_segments(q_refs, k_ref, v_ref, carry, *, q_pos, row_pos, tile_lo, tile_hi, kv_len, chunk_len,
                      block_k, scale, seq_len):
    """T = 1: every row sits at q_pos, so the rows never straddle a DCA chunk and `_flash_dca`'s uniform
    branch is the whole story. Taking it statically drops the `lax.cond`, the mixed branch's selects and
    its second set of pipeline buffers (half the shared memory: room for 128-key tiles or more CTAs
    per SM). Segments: chunks <= nq-2 (q_inter), chunk nq-1 (q_succ), chunk nq (q_intra)."""
    q_intra_ref, q_succ_ref, q_inter_ref = q_refs
    unmasked_end = lax.div(jnp.minimum(q_pos + 1, kv_len), block_k)
    run = lambda q, a, b, c: _run_range(q, k_ref, v_ref, a, b, unmasked_end, c, block_k=block_k,
                                        qk_scale=scale * LOG2E, row_pos=row_pos, kv_len=kv_len,
                                        ragged_len=_ragged(seq_len, block_k))
    tiles_per_chunk = chunk_len // block_k
    nq = lax.div(q_pos, chunk_len)
    e1 = jnp.clip((nq - 1) * tiles_per_chunk, tile_lo, tile_hi)
    e2 = jnp.clip(nq * tiles_per_chunk, tile_lo, tile_hi)
    carry = run(q_inter_ref[...], tile_lo, e1, carry)
    carry = run(q_succ_ref[...], e1, e2, carry)
    return run(q_intra_ref[...], e2, tile_hi, carry)


def _single_loop(q_refs, k_ref, v_ref, carry, *, q_start, one_position, row_pos, tile_lo, tile_hi, kv_len,
                 chunk_len, block_k, scale, seq_len):
    """All of a split's tiles in ONE loop: one software pipeline (one fill, no drain at segment edges,
    one set of buffers), every tile masked, the query variant picked per tile by selects on registers.

    Why it can pay in decode and not in prefill: a decode tile is 16 query rows against block_k keys,
    so the mask and the [rows, H] selects are small next to the 2 * block_k * H * 2 bytes it loads, while
    each extra loop costs a pipeline fill (a DRAM round trip) in a program that sees only ~16-32 tiles.
    Variant for key chunk nk and a row in chunk nq: d = nq - nk; d <= 0 intra (d < 0 is all masked),
    d == 1 succ, d >= 2 inter. With T = 1 (one_position) d is a scalar, so the select is uniform.
    """
    qk_scale = scale * LOG2E
    ragged_len = _ragged(seq_len, block_k)
    if chunk_len is None:
        q = q_refs[0][...]
        pick = lambda tile: q
    else:
        q_intra, q_succ, q_inter = (r[...] for r in q_refs)
        tiles_per_chunk = chunk_len // block_k
        q_chunk = lax.div(q_start, chunk_len) if one_position else lax.div(row_pos, chunk_len)[:, None]

        def pick(tile):
            d = q_chunk - lax.div(tile, tiles_per_chunk)
            return jnp.where(d <= 0, q_intra, jnp.where(d == 1, q_succ, q_inter))

    body = lambda tile, c: _tile_step(pick(tile), k_ref, v_ref, tile, c, block_k=block_k, qk_scale=qk_scale,
                                      mask_rows=(row_pos, kv_len), seq_len=ragged_len)
    return lax.fori_loop(tile_lo, tile_hi, body, carry)


@functools.partial(jax.jit, static_argnames=("chunk_len", "block_k", "num_splits", "num_warps",
                                             "num_stages", "loop", "interpret"))
def _dca_decode(q3, k, v, q_start, kv_len, k_scale=None, v_scale=None, **static):
    """The kernel's split partials merged by LSE: (out [B,T,N,H] q.dtype, lse [B,T,N] f32)."""
    R, B, T, N, H = q3.shape
    K = k.shape[2]
    G = N // K
    o_part, lse_part = _decode_partials(q3, k, v, q_start, kv_len, k_scale=k_scale, v_scale=v_scale, **static)
    out, lse = lse_merge_one_pass(o_part, lse_part)                # [B, K, rows, H], [B, K, rows]
    out = out[:, :, :T * G].reshape(B, K, T, G, H).transpose(0, 2, 1, 3, 4).reshape(B, T, N, H)
    lse = lse[:, :, :T * G].reshape(B, K, T, G).transpose(0, 2, 1, 3).reshape(B, T, N)
    return out.astype(q3.dtype), lse


def _decode_partials(q3, k, v, q_start, kv_len, *, chunk_len, block_k, num_splits, num_warps, num_stages,
                     interpret, loop=DEFAULT_LOOP, k_scale=None, v_scale=None):
    """The Pallas call alone: per-split (o [splits, B, K, rows, H], lse [splits, B, K, rows]) float32."""
    if loop not in LOOPS:
        raise ValueError(f"loop={loop!r} must be one of {LOOPS}")
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
    fp8 = k_scale is not None
    kernel = functools.partial(_decode_kernel, n_variants=R, num_splits=num_splits, block_k=block_k,
                               chunk_len=chunk_len, seq_len=S, num_queries=T, group=G,
                               scale=H ** -0.5, loop=loop, fp8=fp8)
    scalar_spec = pl.BlockSpec((None,), lambda j, h, b: (b,))
    q_specs = [pl.BlockSpec((None, None, None, rows, H), lambda j, h, b, r=r: (r, b, h, 0, 0))
               for r in range(R)]
    kv_spec = pl.BlockSpec((None, Sp, None, H), lambda j, h, b: (b, 0, h, 0))
    scale_specs, scales = [], []
    if fp8:                                   # [B, S, K] float32 -> the [S] scales of one (row, kv head)
        scale_specs = [pl.BlockSpec((None, Sp, None), lambda j, h, b: (b, 0, h))] * 2
        scales = [k_scale, v_scale]
    o_part, lse_part = pl.pallas_call(
        kernel,
        grid=(num_splits, K, B),
        in_specs=[scalar_spec, scalar_spec, *q_specs, kv_spec, kv_spec, *scale_specs],
        out_specs=[pl.BlockSpec((None, None, None, rows, H), lambda j, h, b: (j, b, h, 0, 0)),
                   pl.BlockSpec((None, None, None, rows), lambda j, h, b: (j, b, h, 0))],
        out_shape=[jax.ShapeDtypeStruct((num_splits, B, K, rows, H), jnp.float32),
                   jax.ShapeDtypeStruct((num_splits, B, K, rows), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="dca_decode",
    )(q_start, kv_len, *([qg] * R), k, v, *scales)
    return o_part, lse_part


def device_num_sms() -> int:
    """Streaming multiprocessors of the default device (`core_count` on GPUs), else 132 (H100 SXM)."""
    try:
        n = getattr(jax.devices()[0], "core_count", None)
    except RuntimeError:                                             # no backend at all
        n = None
    return n if isinstance(n, int) and n > 0 else FALLBACK_NUM_SMS


def default_num_splits(batch: int, kv_heads: int, seq_len: int, block_k: int,
                       num_sms: int | None = None) -> int:
    """Split count whose (split, kv head, batch) programs fill the SMs in whole waves.

    Model: `slots` = num_sms * CTAS_PER_SM programs run at once; a program of n tiles costs
    n + START_COST_TILES tile-times; time(s) = waves(s) * (cdiv(tiles, s) + START_COST_TILES) with
    waves(s) = cdiv(s * batch * kv_heads, slots). The smallest s of least modelled time wins
    (deterministic; fewer splits also means a smaller LSE merge).
    Worked example (H100, 132 SMs -> 264 slots; B = 1, K = 4; 128K keys, block 64 -> 2048 tiles):
      s = 33: 1 wave x (63 + 4) = 67;  s = 66: 1 x (32 + 4) = 36;  s = 132: 2 x (16 + 4) = 40 -> 66,
    i.e. 264 programs, 2 per SM. At 1M keys (16384 tiles) s = 66 as well (249 + 4 vs 2 x (125 + 4)).
    seq_len is the cache length S (the valid length is data, unknown here); the kernel spreads the
    valid tiles over the splits at run time, so the choice holds for any fill of the cache.
    """
    for name, x in (("batch", batch), ("kv_heads", kv_heads), ("seq_len", seq_len), ("block_k", block_k)):
        if x < 1:
            raise ValueError(f"default_num_splits: {name}={x} must be >= 1")
    sms = device_num_sms() if num_sms is None else num_sms
    if sms < 1:
        raise ValueError(f"default_num_splits: num_sms={sms} must be >= 1")
    tiles = -(-seq_len // block_k)
    programs_per_split = batch * kv_heads
    slots = sms * CTAS_PER_SM
    cap = min(tiles, max(1, 4 * slots // programs_per_split))                # beyond 4 waves never wins
    cost = lambda s: -(-s * programs_per_split // slots) * (-(-tiles // s) + START_COST_TILES)
    return min(range(1, cap + 1), key=lambda s: (cost(s), s))


def dca_decode(q, k, v, q_start, kv_len, *, chunk_len: int | None = None, block_k: int = 64,
               num_splits: int | None = None, num_warps: int = 2, num_stages: int = 3,
               interpret: bool | None = None, loop: str | None = None, k_scale=None, v_scale=None):
    """Attention of a few queries per sequence (T small, typically 1) against the cache, DCA or plain.

    Same contract as `pallas_kernels.dca_prefill.dca_prefill`: q [3,B,T,N,H] (DCA, chunk_len = s) or
    [B,T,N,H] (plain); k, v [B,S,K,H]; q_start, kv_len [B] int32; query t sits at q_start + t and sees
    keys j <= q_start + t, j < kv_len. Returns (out [B,T,N,H] in q's dtype, lse [B,T,N] float32).
    An e4m3 cache: k, v float8_e4m3fn with k_scale, v_scale [B,S,K] float32 (x = x8 * scale); the kernel
    reads them directly (see `_flash_dca.Fp8Ref`); S must then be a multiple of block_k.
    T must be < s (the queries span at most two DCA chunks). num_splits=None picks
    `default_num_splits`; loop=None picks DEFAULT_LOOP (one of LOOPS, see there).
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
    loop = DEFAULT_LOOP if loop is None else loop
    if loop not in LOOPS:
        raise ValueError(f"loop={loop!r} must be one of {LOOPS}")
    if interpret is None:
        interpret = default_interpret()
    check_fp8_scales(k, v, k_scale, v_scale, block_k, "dca_decode")
    return _dca_decode(q3, k, v, jnp.asarray(q_start, jnp.int32), jnp.asarray(kv_len, jnp.int32),
                       k_scale, v_scale, chunk_len=chunk_len, block_k=block_k, num_splits=num_splits,
                       num_warps=num_warps, num_stages=num_stages, loop=loop, interpret=interpret)


def dca_decode_reference(q, k, v, q_start, kv_len, *, chunk_len: int | None = None):
    """Plain jnp float32 (out [B,T,N,H], lse [B,T,N]). Decode is prefill at small T, so this is
    `dca_prefill_reference`: per query, the intra / succ / inter key regions of spec 2.5 as masked
    partial attentions merged by LSE."""
    return dca_prefill_reference(q, k, v, q_start, kv_len, chunk_len=chunk_len)
