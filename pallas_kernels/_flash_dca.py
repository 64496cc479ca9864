"""The inner loop both DCA kernels share: online softmax over key tiles, query variant picked per tile.

Walk of one program (prefill: a tile of query rows of one q head; decode: the G heads x T queries of one
kv head against one split of the keys):

1. The caller knows each query row's absolute position `row_pos` (rows sorted, spanning < s positions)
   and the range of key tiles [tile_lo, tile_hi) it must visit, already cut at min(kv_len, last row+1).
2. Key tiles are aligned to absolute positions and `block_k` divides the DCA chunk length s, so every key
   tile lies in one DCA chunk nk. The rows span at most two chunks, nq_lo and nq_lo + 1 (nq_lo = chunk of
   the first row), so the key range splits into four segments with one query per segment:
       chunks <= nq_lo-2   every row is >= 2 chunks ahead           -> q_inter for all rows
       chunk  nq_lo-1      rows in nq_lo: succ, rows in nq_lo+1: inter
       chunk  nq_lo        rows in nq_lo: intra, rows in nq_lo+1: succ
       chunk  nq_lo+1      rows in nq_lo+1: intra (rows in nq_lo see none of it: causal mask)
   The per-row choice is made ONCE per segment on the query tile ([rows, H] selects), never per key tile
   on the logits, so each key tile costs exactly the two matmuls of plain flash attention.
   Fast path: when all rows lie in one chunk (every tile but the one straddling a chunk boundary) a
   `lax.cond` takes a branch where each segment's variant is static and the matmul's query is a plain
   load. Measured on the H100 (benchmarks/NOTES-attention.md): 439 vs 369 TFLOP/s without it; the
   select-fed query operand cost 16%. The price: each branch gets its own pipeline buffers in shared
   memory, so 128-key tiles no longer fit (bf16, d = 128).
   Worked example (s = 48, block 16, query rows at positions 40..55, so nq_lo = 0):
       segment "chunk 0" (tiles 0..2): rows 40..47 use q_intra, rows 48..55 use q_succ
       segment "chunk 1" (tile 3, keys 48..63 cut to <= 55): rows 48..55 use q_intra, rows 40..47 masked.
3. Inside each segment, tiles whose every key is visible to every row (key < min(first row + 1, kv_len))
   run without a mask; only the tail (the diagonal and the kv_len edge) builds the causal/length mask.
4. Plain RoPE attention (one query variant) is the same loop with one segment.

Softmax runs in base 2 (exp2 of logits pre-multiplied by log2(e)); the caller turns (m, l) into the
natural-log LSE: lse = (m + log2 l) * ln 2.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# Finite: a masked logit never makes inf - inf = NaN in the running-max update.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def check_dca_blocks(chunk_len: int | None, **blocks: int) -> None:
    """Raise ValueError unless every named block size divides the DCA chunk length s."""
    for name, size in blocks.items():
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name}={size}: must be a power of two >= 16 (Triton tile shapes)")
        if chunk_len is not None and chunk_len % size:
            raise ValueError(
                f"{name}={size} does not divide the DCA chunk length s={chunk_len}: tiles must be "
                f"aligned to absolute positions so that no tile straddles a DCA chunk boundary; "
                f"pick a power of two that divides s")


def init_carry(rows: int, head_dim: int):
    """(o, m, l) of the online softmax: unnormalized output, running max (base 2), running sum."""
    return (jnp.zeros((rows, head_dim), jnp.float32),
            jnp.full((rows,), -jnp.inf, jnp.float32),
            jnp.zeros((rows,), jnp.float32))


class Fp8Ref:
    """An e4m3 K or V ref [S, H] with its float32 per-key scales [S] (x = x8 * scale[key]).

    `_tile_step` never forms x8 * scale per element: the e4m3 tile is converted to f16 (exact: every
    e4m3 value is an f16 value; one hardware cvt per 2 elements on Hopper) and the scales are applied
    per key column where they are cheap, s_ij = (q_i . k8_j) * ks_j on the [rows, block_k] scores and
    p_ij * vs_j on the probabilities before P.V8. A bf16 tile of x8 * scale instead costs a float32
    multiply and two conversions per element, which left the decode kernel compute-bound at 1.6 TB/s on
    the H200 (benchmarks/RESULTS.md, 2026-12-02). f16 for q and P: |q| in Qwen2.5 stays far below f16's
    65504 and P <= 1; f16 keeps 3 more mantissa bits than bf16.
    """

    def __init__(self, ref, scale_ref):
        self.ref, self.scale_ref, self.shape = ref, scale_ref, ref.shape


def _fp8_compute_dtype(q_dtype):
    """f16 on the tensor cores; float32 stays float32 (CPU interpret tests compare at f32 precision)."""
    return jnp.float32 if q_dtype == jnp.float32 else jnp.float16


def _tile_step(q, k_ref, v_ref, start_k, carry, *, block_k, qk_scale, mask_rows=None, seq_len=None):
    """One key tile of flash attention. mask_rows=(row_pos, kv_len) builds the causal/length mask.

    seq_len: the cache length S when it is not a multiple of block_k (static). The last tile then reads
    past the array: those rows are loaded masked as zeros (never garbage: 0 * NaN would poison o).
    k_ref / v_ref may be `Fp8Ref`s (e4m3 + per-key scales; S a multiple of block_k).
    """
    o, m, l = carry
    ks = pl.ds(pl.multiple_of(start_k * block_k, block_k), block_k)
    if isinstance(k_ref, Fp8Ref):
        if seq_len is not None:
            raise ValueError("an e4m3 cache needs S to be a multiple of block_k")
        cdt = _fp8_compute_dtype(q.dtype)
        k, v = k_ref.ref[ks, :].astype(cdt), v_ref.ref[ks, :].astype(cdt)
        k_sc, v_sc = k_ref.scale_ref[ks], v_ref.scale_ref[ks]                 # [block_k] float32
        s = plgpu.dot(q.astype(cdt), k, trans_b=True) * (k_sc * qk_scale)[None, :]
        return _softmax_update(s, v, carry, start_k, block_k=block_k, mask_rows=mask_rows, v_scale=v_sc)
    if seq_len is None:
        k = k_ref[ks, :]
        v = v_ref[ks, :]
    else:
        inside = (start_k * block_k + jnp.arange(block_k, dtype=jnp.int32) < seq_len)[:, None]
        k = plgpu.load(k_ref.at[ks, :], mask=inside, other=0.0)
        v = plgpu.load(v_ref.at[ks, :], mask=inside, other=0.0)
    s = plgpu.dot(q, k, trans_b=True) * qk_scale                      # [rows, block_k] fp32
    return _softmax_update(s, v, carry, start_k, block_k=block_k, mask_rows=mask_rows)


def _softmax_update(s, v, carry, start_k, *, block_k, mask_rows, v_scale=None):
    """Online-softmax update of (o, m, l) with the tile's base-2 logits s [rows, block_k] and values v;
    v_scale [block_k] (e4m3 values) weighs each key's probability: sum_j p_j (v8_j vs_j) = sum_j (p_j vs_j) v8_j."""
    o, m, l = carry
    if mask_rows is not None:
        row_pos, kv_len = mask_rows
        j = start_k * block_k + jnp.arange(block_k, dtype=jnp.int32)
        visible = (j[None, :] <= row_pos[:, None]) & (j[None, :] < kv_len)
        s = jnp.where(visible, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    l_new = alpha * l + jnp.sum(p, axis=1)
    pv = p if v_scale is None else p * v_scale[None, :]
    o_new = alpha[:, None] * o + plgpu.dot(pv.astype(v.dtype), v)
    return o_new, m_new, l_new


def _run_range(q, k_ref, v_ref, lo, hi, unmasked_end, carry, *, block_k, qk_scale, row_pos, kv_len,
               ragged_len):
    """Tiles [lo, hi): unmasked ones first, then the masked tail starting at unmasked_end.

    Unmasked tiles end at or below kv_len <= S, so only the masked tail can reach past a ragged S.
    """
    mid = jnp.clip(unmasked_end, lo, hi)
    if isinstance(k_ref, Fp8Ref):            # cast the query once, not per key tile (`_tile_step`)
        q = q.astype(_fp8_compute_dtype(q.dtype))
    plain = lambda t, c: _tile_step(q, k_ref, v_ref, t, c, block_k=block_k, qk_scale=qk_scale)
    carry = lax.fori_loop(lo, mid, plain, carry)
    masked = lambda t, c: _tile_step(q, k_ref, v_ref, t, c, block_k=block_k, qk_scale=qk_scale,
                                     mask_rows=(row_pos, kv_len), seq_len=ragged_len)
    return lax.fori_loop(mid, hi, masked, carry)


def flash_over_key_tiles(q_refs, k_ref, v_ref, carry, *, row_pos, first_pos, tile_lo, tile_hi,
                         kv_len, chunk_len, block_k, scale, split_uniform=True, seq_len=None):
    """Run the online softmax of `carry` over key tiles [tile_lo, tile_hi).

    q_refs: (q,) for plain attention or (q_intra, q_succ, q_inter), each a [rows, H] ref.
    row_pos: [rows] int32 absolute positions (sorted; rows span < chunk_len positions).
    first_pos: scalar, position of row 0 (the smallest). kv_len: scalar valid-key count.
    split_uniform: branch (lax.cond) to a select-free path when all rows share one DCA chunk.
    seq_len: the array's S when the K/V block was rounded up to whole tiles (S % block_k != 0).
    """
    qk_scale = scale * LOG2E
    # Every row sees every key below min(first_pos + 1, kv_len): those tiles need no mask.
    unmasked_end = lax.div(jnp.minimum(first_pos + 1, kv_len), block_k)
    seq_len = k_ref.shape[0] if seq_len is None else seq_len
    ragged_len = seq_len if seq_len % block_k else None
    run = lambda q, lo, hi, c: _run_range(q, k_ref, v_ref, lo, hi, unmasked_end, c, block_k=block_k,
                                          qk_scale=qk_scale, row_pos=row_pos, kv_len=kv_len,
                                          ragged_len=ragged_len)
    if chunk_len is None:
        return run(q_refs[0][...], tile_lo, tile_hi, carry)

    q_intra_ref, q_succ_ref, q_inter_ref = q_refs
    tiles_per_chunk = chunk_len // block_k
    nq_lo = lax.div(first_pos, chunk_len)
    row_chunk = lax.div(row_pos, chunk_len)[:, None]                  # [rows, 1]
    edge = lambda c: jnp.clip(c * tiles_per_chunk, tile_lo, tile_hi)  # first tile of chunk c, clipped
    e1, e2, e3 = edge(nq_lo - 1), edge(nq_lo), edge(nq_lo + 1)

    def uniform(carry):
        # Every row in chunk nq_lo (the common case): the variant of each segment is static, and the
        # matmul reads its query straight from a load, exactly as in the plain kernel. Tiles of chunk
        # nq_lo + 1 lie beyond every row (tile_hi stops at the last row), so there are three segments.
        carry = run(q_inter_ref[...], tile_lo, e1, carry)
        carry = run(q_succ_ref[...], e1, e2, carry)
        return run(q_intra_ref[...], e2, tile_hi, carry)

    def mixed(carry):
        # The rows straddle the boundary into chunk nq_lo + 1: pick the variant per row, per segment.
        def query_for_key_chunk(nk):
            d = row_chunk - nk                                         # chunk distance per row
            return jnp.where(d <= 0, q_intra_ref[...],
                             jnp.where(d == 1, q_succ_ref[...], q_inter_ref[...]))
        carry = run(q_inter_ref[...], tile_lo, e1, carry)             # chunks <= nq_lo - 2
        carry = run(query_for_key_chunk(nq_lo - 1), e1, e2, carry)
        carry = run(query_for_key_chunk(nq_lo), e2, e3, carry)
        return run(query_for_key_chunk(nq_lo + 1), e3, tile_hi, carry)

    last_pos = jnp.max(row_pos)
    if not split_uniform:
        return mixed(carry)
    return lax.cond(lax.div(last_pos, chunk_len) == nq_lo, uniform, mixed, carry)


def finish(carry):
    """(o normalized, lse natural log) from the carry; a row that saw no key gets o = 0, lse = -inf."""
    o, m, l = carry
    seen = l > 0
    o = o / jnp.where(seen, l, 1.0)[:, None]
    lse = jnp.where(seen, (m + jnp.log2(jnp.where(seen, l, 1.0))) * LN2, -jnp.inf)
    return o, lse


def lse_merge(outs, lses, axis: int):
    """Merge partial attentions (o_i, lse_i) along `axis` (spec 2.4); empty partials have lse = -inf.

    outs: [..., P, ..., H] with the partial axis at `axis` (>= 0); lses: the same without H.
    """
    m = jnp.max(lses, axis=axis, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lses - m)                                              # exp(-inf) = 0 for empty ones
    den = jnp.sum(w, axis=axis)
    out = jnp.sum(w[..., None] * outs, axis=axis) / jnp.where(den > 0, den, 1.0)[..., None]
    lse = jnp.squeeze(m, axis) + jnp.log(den)
    return out, lse


def _merge_pair(a, b):
    """Two running merges (m, l, acc) -> one: m the largest LSE seen, l = sum exp(lse_i - m),
    acc = sum exp(lse_i - m) o_i. Associative and commutative, so XLA may combine in any order.
    Example: (m=2, l=1, acc=o1) with (m=0, l=1, acc=o2) -> (2, 1 + e^-2, o1 + e^-2 o2)."""
    (ma, la, oa), (mb, lb, ob) = a, b
    m = jnp.maximum(ma, mb)
    ref = jnp.where(jnp.isfinite(m), m, 0.0)                          # both empty: m = -inf
    wa, wb = jnp.exp(ma - ref), jnp.exp(mb - ref)                    # exp(-inf) = 0
    return m, la * wa + lb * wb, oa * wa + ob * wb


def lse_merge_one_pass(outs, lses):
    """lse_merge along axis 0 as ONE variadic reduction (the online-softmax merge as its combiner).

    Same values as lse_merge up to float32 reassociation. Why: the decode step merges ~66 split partials
    per layer, where the three-pass form (max, then sum of exp, then weighted sum) is three small GPU
    kernels plus an epilogue per layer (H100 profile, benchmarks/RESULTS.md session 12); one reduction
    reads the partials once. outs [P, ..., H], lses [P, ...] -> (out [..., H], lse [...])."""
    m = jnp.broadcast_to(lses[..., None], outs.shape)               # every operand of a reduce has one shape
    init = (jnp.float32(-jnp.inf), jnp.float32(0.0), jnp.float32(0.0))
    m, l, acc = jax.lax.reduce((m.astype(jnp.float32), jnp.ones(outs.shape, jnp.float32),
                                outs.astype(jnp.float32)), init, _merge_pair, (0,))
    out = acc / jnp.where(l > 0, l, 1.0)
    return out, m[..., 0] + jnp.log(l[..., 0])


def pad_axis(x, axis: int, multiple: int):
    """Zero-pad `axis` of x up to a multiple of `multiple` (no copy when already a multiple)."""
    size = x.shape[axis]
    extra = -size % multiple
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def default_interpret() -> bool:
    """Interpret mode unless a GPU backs the default device (CPU tests run the same kernel code)."""
    return jax.default_backend() != "gpu"
