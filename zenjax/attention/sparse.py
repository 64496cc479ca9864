"""Vertical-slash sparse prefill (MInference) inside DCA inside chunked prefill: estimation and the mask.

Spec: shared/spec/long-context.md sections 3.2-3.5. Walk of one sparse prefill step, per layer (the
dispatcher calls `estimate` then an implementation's `run_sparse`):

  1. `estimate(q, k, meta)` scores the piece's last n = min(last_q, valid rows) queries against every valid
     key [0, kv_len), all heads, in float32: keys of the query's own DCA chunk (>= P) with q_intra, keys
     one chunk back [P-s, P) with q_succ_crit (position r(p)+s), older keys with q_inter_crit (r(p)+c).
     The critical rotations are q_intra rotated once more by s or c (RoPE composes: R(a)R(b) = R(a+b)), so
     the model needs no extra query variants. Row softmax (causal), then
         vert[j]  = sum_i A[i, j]            keys 0..sink-1 forced (+inf)
         slash[d] = sum_i A[i, p_i - d]       distances d < local forced (+inf)
     top-k per head with k = min(budget, kv_len), where the static k is the layer's largest budget (per-head
     budgets are masks on that padded top-k). GQA: q head n reads kv head n // G inside a loop over heads,
     K is never repeated per q head.
  2. DCA fallback (spec 3.5 step 5): a present DCA stage (intra [P, end), succ [P-s, P), inter [0, P-s))
     that no selected column lies in, or (succ / inter) that no selected diagonal reaches from any row of
     the piece, gets 5 evenly spaced columns lo + i*(hi-lo)//5. (vLLM adds evenly spaced *diagonals* when
     a stage lacks slashes; we add columns for both cases: a handful of keys either way.)
  3. Result: `SparseIndices` of absolute coordinates, vertical key ids and diagonal distances d = p - j,
     ascending, padded with SENTINEL. Because our kernels run the three DCA regions in one pass in
     absolute coordinates, the per-stage local offsets of spec 3.5's table are not needed: every stage's
     conversion is the identity on (p, p - d), which is what `stage_offsets` computes and tests check.

The mask (what `run_sparse` here and the Mosaic GPU kernel compute), BLOCK_Q = BLOCK_K = 128:
    query block m = rows [128m, 128m + 128) of the step (positions a_m .. a_m + 127, a_m = q_start + 128m);
    key block kb = keys [128kb, 128kb + 128) (aligned to absolute key 0, so to DCA chunk boundaries);
    active(m, kb)  iff  some selected d has a_m - d <= 128kb + 127 and a_m + 127 - d >= 128kb
                        (the band of diagonal d over the block's rows touches key block kb);
    row p attends key j  iff  j <= p and j < kv_len and (j is a selected column or active(m, j // 128)).
This is a superset of vLLM's mask (spec 3.3: a diagonal covers a 64-wide band per 64-row block, which lies
inside the aligned 128-blocks here), apart from vLLM's <= 63-key merge over-cover; with full budgets it
is exactly causal attention, i.e. dense DCA.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from zenjax.attention.meta import AttentionMeta
from zenjax.attention.reference import reference_attention_lse
from zenjax.rope import apply_rope

BLOCK_Q = 128
BLOCK_K = 128
SENTINEL = 2 ** 30         # padding of index lists: larger than any key id or distance
FALLBACK_COLUMNS = 5


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SparseIndices:
    """Selected keys of one sparse prefill step, absolute coordinates, ascending, SENTINEL-padded."""

    vertical: jax.Array      # [B, N, V] int32 key ids
    slash: jax.Array         # [B, N, D] int32 distances d = query position - key position


# How `_topk` selects (static; benchmarks/sparse_kernel.py times both on the GPU):
#   "sort"   lax.top_k, then the ids sorted ascending.
#   "radix"  an exact radix select: the k-th largest score found bit by bit on order-preserving int32
#            keys (32 counting passes over [N, S]), ties at the k-th value taken lowest id first (as
#            lax.top_k), ids compacted in ascending order by a binary search over the running count.
#            No sort of S scores per head, which is what lax.top_k does for k in the thousands.
TOPK_IMPL = "sort"


def _topk(scores, k_static: int, budget, kv_len, impl: str | None = None):
    """scores [N, S] -> ascending ids [N, k_static] of each head's min(budget, kv_len) largest finite
    scores (SENTINEL beyond). Ties at the cut: lowest ids first."""
    if k_static == 0:
        return jnp.zeros((scores.shape[0], 0), jnp.int32)
    want = jnp.minimum(budget, kv_len)                                                   # [N]
    if (impl or TOPK_IMPL) == "sort":
        vals, ids = lax.top_k(scores, k_static)
        rank = jnp.arange(k_static)[None, :]
        keep = (rank < want[:, None]) & (vals > -jnp.inf)
        return jnp.sort(jnp.where(keep, ids, SENTINEL).astype(jnp.int32), axis=-1)
    return _radix_topk(scores, k_static, want)


def _radix_topk(scores, k_static: int, want):
    bits = lax.bitcast_convert_type(scores.astype(jnp.float32), jnp.int32)
    key = jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)                     # monotone in the float
    u = lax.bitcast_convert_type(key, jnp.uint32) ^ jnp.uint32(0x80000000)              # monotone, unsigned
    k = jnp.minimum(want, scores.shape[-1]).astype(jnp.int32)[:, None]                 # [N, 1]

    def bit(i, t):                          # keep bit (31 - i) if >= k scores are at or above it
        cand = t | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        return jnp.where(jnp.sum(u >= cand, axis=-1, keepdims=True) >= k, cand, t)

    t = lax.fori_loop(0, 32, bit, jnp.zeros_like(k, jnp.uint32))                       # k-th largest key
    above = u > t
    ties = (u == t) & (jnp.cumsum(u == t, axis=-1) <= k - jnp.sum(above, axis=-1, keepdims=True))
    sel = (above | ties) & (scores > -jnp.inf) & (k > 0)
    count = jnp.cumsum(sel, axis=-1)                                                    # [N, S]
    r = jnp.arange(1, k_static + 1, dtype=count.dtype)
    ids = jax.vmap(lambda c: jnp.searchsorted(c, r, side="left"))(count).astype(jnp.int32)  # r-th selected
    return jnp.where(r[None, :] <= count[:, -1:], ids, SENTINEL)


def _sorted_unique(x):
    """Ascending along the last axis, repeated entries replaced by SENTINEL (then at the end)."""
    x = jnp.sort(x, axis=-1)
    dup = jnp.concatenate([jnp.zeros(x.shape[:-1] + (1,), bool), x[..., 1:] == x[..., :-1]], axis=-1)
    return jnp.sort(jnp.where(dup, SENTINEL, x), axis=-1)


def _region_rotated_keys(k, q_start, layer, dca):
    """k [S, K, H] with each key rotated back by its DCA region's critical offset (0 / s / c), so that ONE
    product with q_intra scores every region: (R(a) q) . k = q . (R(-a) k) (RoPE is orthogonal). This
    replaces three [n, S] products (one per query variant) and a select by one; the extra cost is one
    elementwise pass over K. Without DCA, k itself."""
    if dca is None:
        return k
    S = k.shape[0]
    s, c = dca.chunk_len, dca.chunk_size
    P = (q_start // s) * s
    j = jnp.arange(S)
    off = jnp.where(j >= P, 0, jnp.where(j >= P - s, s, c))
    return apply_rope(k[None], -off[None], layer.rope_theta)[0]


def _diagonal_sums(a, p0):
    """a [n, S] (row i at position p0 + i) -> [S]: slash[d] = sum_i a[i, p0 + i - d] (0 where the key
    would be < 0), by the skew trick instead of a gather: reverse the columns, pad each row by n, and
    re-read the flat buffer with row width S + n - 1, which shifts row i right by i:
        c[i, t] = a[i, S - 1 - t + i],  so slash[d] = sum_i c[i, S - 1 - p0 + d].
    Worked example (n = 2, S = 4, rows at positions p0 = 2 and 3): slash[1] = a[0, 1] + a[1, 2]; with
    t = S - 1 - p0 + 1 = 2: c[0, 2] = a[0, 3 - 2 + 0] = a[0, 1] and c[1, 2] = a[1, 3 - 2 + 1] = a[1, 2]."""
    n, S = a.shape
    padded = jnp.pad(a[:, ::-1], ((0, 0), (0, n)))                                      # [n, S + n]
    c = padded.reshape(-1)[: n * (S + n - 1)].reshape(n, S + n - 1)
    sums = jnp.concatenate([jnp.sum(c, axis=0), jnp.zeros((S,), a.dtype)])                # [2S + n - 1]
    return lax.dynamic_slice_in_dim(sums, S - 1 - p0, S)


def _estimate_row(q_rows, k, row_pos, row_ok, q_start, kv_len, *, layer, dca, group):
    """One batch row. q_rows [n, N, H] q_intra of the scored rows at consecutive positions row_pos [n]
    (row_ok: real rows), k [S, K, H]. Returns (vertical [N, V], slash [N, D]).

    Cost per q head at S keys: one [n, H] x [H, S] product in the cache dtype with float32 accumulation
    (as MInference: bf16 QK^T, float32 softmax), then a few fused passes over the [n, S] float32 scores
    (row max, row sum, column sums, the skewed diagonal sums)."""
    S, N, H = k.shape[0], q_rows.shape[1], q_rows.shape[2]
    scale = 1.0 / (H ** 0.5)
    j = jnp.arange(S)
    visible = (j[None, :] <= row_pos[:, None]) & (j[None, :] < kv_len) & row_ok[:, None]  # [n, S]
    kr = _region_rotated_keys(k, q_start, layer, dca).astype(k.dtype)
    qr = q_rows.astype(k.dtype)

    def head(n):
        kh = kr[:, n // group]                                                           # [S, H]
        qh = lax.dynamic_index_in_dim(qr, n, axis=1, keepdims=False)                      # [n, H]
        lg = jnp.einsum("ih,sh->is", qh, kh, preferred_element_type=jnp.float32) * scale
        lg = jnp.where(visible, lg, -jnp.inf)
        m = jnp.max(lg, axis=-1, keepdims=True)
        e = jnp.exp(lg - jnp.where(jnp.isfinite(m), m, 0.0))                               # exp(-inf) = 0
        a = e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), 1e-30)                    # [n, S]
        return jnp.sum(a, axis=0), _diagonal_sums(a, row_pos[0])

    if all(layer.static_heads()):                                                         # no VS head
        vert = slash = jnp.zeros((N, S), jnp.float32)
    else:
        vert, slash = lax.map(head, jnp.arange(N))                                       # [N, S] each
    vert = jnp.where(j < kv_len, jnp.where(j < layer.sink, jnp.inf, vert), -jnp.inf)
    slash = jnp.where(j < kv_len, jnp.where(j < layer.local, jnp.inf, slash), -jnp.inf)  # d <= kv_len - 1
    v_ids = _topk(vert, min(max(layer.vertical), S), jnp.asarray(layer.vertical, jnp.int32), kv_len)
    s_ids = _topk(slash, min(max(layer.slash), S), jnp.asarray(layer.slash, jnp.int32), kv_len)
    v_ids, s_ids = _static_heads(v_ids, s_ids, layer, kv_len)
    if dca is not None:
        v_ids = jnp.concatenate([v_ids, _fallback(v_ids, s_ids, q_start, kv_len, dca)], axis=-1)
    return _sorted_unique(v_ids), s_ids                           # _topk / _static_heads give ascending ids


def _static_heads(v_ids, s_ids, layer, kv_len):
    """A-shape heads (spec 3.1: no estimation) keep the first `vertical` keys and the `slash` nearest
    diagonals: ids 0..budget-1 (capped at kv_len), SENTINEL after."""
    if not any(layer.static_heads()):
        return v_ids, s_ids
    static = jnp.asarray(layer.static_heads(), bool)[:, None]
    out = []
    for ids, budget in ((v_ids, layer.vertical), (s_ids, layer.slash)):
        r = jnp.arange(ids.shape[-1], dtype=jnp.int32)[None, :]
        fixed = jnp.where(r < jnp.minimum(jnp.asarray(budget, jnp.int32)[:, None], kv_len), r, SENTINEL)
        out.append(jnp.where(static, fixed, ids))
    return tuple(out)


def _fallback(v_ids, s_ids, q_start, kv_len, dca):
    """[N, 3 * FALLBACK_COLUMNS] extra columns for DCA stages left without columns or diagonals."""
    s = dca.chunk_len
    P = (q_start // s) * s
    begin, end = q_start, kv_len
    out = []
    for lo, hi, present, needs_slash in ((P, end, True, False), (P - s, P, P >= s, True),
                                         (jnp.zeros_like(P), P - s, P >= 2 * s, True)):
        has_v = jnp.any((v_ids >= lo) & (v_ids < hi), axis=-1)
        # diagonal d reaches keys [lo, hi) from some row p in [begin, end) iff begin-hi+1 <= d <= end-1-lo
        has_s = (jnp.any((s_ids >= begin - hi + 1) & (s_ids <= end - 1 - lo), axis=-1) if needs_slash
                 else jnp.asarray(True))
        need = jnp.asarray(present) & (~has_v | ~has_s)                                  # [N]
        cols = lo + (jnp.arange(FALLBACK_COLUMNS) * (hi - lo)) // FALLBACK_COLUMNS
        out.append(jnp.where(need[:, None], cols[None, :], SENTINEL))
    return jnp.concatenate(out, axis=-1).astype(jnp.int32)


def estimate(q, k_cache, meta: AttentionMeta) -> SparseIndices:
    """Indices for this prefill step from its last <= last_q valid queries (module docstring, step 1-3)."""
    layer, dca = meta.sparse, meta.dca
    q_intra = q[0] if dca is not None else q                                            # [B, T, N, H]
    B, T, N, H = q_intra.shape
    n = min(layer.last_q, T)
    valid = meta.kv_len - meta.q_start                                                  # [B] rows of the piece
    r0 = jnp.clip(valid - n, 0, T - n)
    q_rows = jax.vmap(lambda x, r: lax.dynamic_slice_in_dim(x, r, n, axis=0))(q_intra, r0)   # [B, n, N, H]
    rows = r0[:, None] + jnp.arange(n)[None, :]
    row_pos = meta.q_start[:, None] + rows
    row_ok = rows < valid[:, None]
    fn = lambda qr, kk, rp, ok, qs, kl: _estimate_row(qr, kk, rp, ok, qs, kl, layer=layer, dca=dca,
                                                      group=N // k_cache.shape[2])
    vert, slash = jax.vmap(fn)(q_rows, k_cache, row_pos, row_ok, meta.q_start, meta.kv_len)
    return SparseIndices(vertical=vert, slash=slash)


# ----------------------------------------------------------------------------------------------
# The mask and the reference sparse attention
# ----------------------------------------------------------------------------------------------

def active_blocks(slash, q_start, T: int, S: int):
    """[B, N, ceil(T/BLOCK_Q), ceil(S/BLOCK_K)] bool: active(m, kb) of the module docstring."""
    nqb, nkb = -(-T // BLOCK_Q), -(-S // BLOCK_K)
    a = q_start[:, None] + BLOCK_Q * jnp.arange(nqb)[None, :]                           # [B, nqb]
    kb0 = BLOCK_K * jnp.arange(nkb)
    lo = a[:, :, None] - kb0[None, None, :] - BLOCK_K + 1                                # [B, nqb, nkb]
    hi = a[:, :, None] + BLOCK_Q - 1 - kb0[None, None, :]

    def count(d_sorted, lo, hi):                                                        # d [D]; lo, hi [nqb, nkb]
        return (jnp.searchsorted(d_sorted, hi, side="right") - jnp.searchsorted(d_sorted, lo, side="left"))

    per_head = jax.vmap(count, in_axes=(0, None, None))                                  # over N
    return jax.vmap(per_head)(slash, lo, hi) > 0


def sparse_mask(indices: SparseIndices, q_start, kv_len, T: int, S: int):
    """[B, N, T, S] bool: the full mask of the module docstring (reference only: O(T*S))."""
    B, N = indices.vertical.shape[:2]
    col = jnp.zeros((B, N, S), bool)
    col = col.at[jnp.arange(B)[:, None, None], jnp.arange(N)[None, :, None], indices.vertical].set(True,
                                                                                              mode="drop")
    act = active_blocks(indices.slash, q_start, T, S)                                    # [B, N, nqb, nkb]
    act = jnp.repeat(jnp.repeat(act, BLOCK_Q, axis=2)[:, :, :T], BLOCK_K, axis=3)[:, :, :, :S]
    p = q_start[:, None] + jnp.arange(T)[None, :]
    j = jnp.arange(S)
    causal = (j[None, None, :] <= p[:, :, None]) & (j[None, None, :] < kv_len[:, None, None])   # [B, T, S]
    return causal[:, None] & (col[:, :, None, :] | act)


def run_sparse(q, k_cache, v_cache, meta: AttentionMeta):
    """Reference sparse attention (plain jnp, float32): dense DCA restricted to `sparse_mask`."""
    T, S = q.shape[-3], k_cache.shape[1]
    mask = sparse_mask(meta.indices, meta.q_start, meta.kv_len, T, S)
    return reference_attention_lse(q, k_cache, v_cache, q_start=meta.q_start, kv_len=meta.kv_len, dca=meta.dca,
                                   extra_mask=mask)


def stage_offsets(indices: SparseIndices, q_start, kv_len, dca):
    """Spec 3.5's per-stage view, for checking: for each DCA stage (intra, succ, inter) the columns inside
    it in stage-local coordinates (key - stage start) and the kernel offsets o of the diagonals that reach
    it, with o = d - (begin - stage_key_end) for the non-causal stages and o = d for intra. Returns a dict
    stage -> (local columns [B,N,V], offsets [B,N,D]); entries outside the stage are SENTINEL."""
    s = dca.chunk_len
    P = (q_start // s) * s
    begin, end = q_start[:, None, None], kv_len[:, None, None]
    P = P[:, None, None]
    v, d = indices.vertical, indices.slash
    out = {}
    for name, lo, hi, causal in (("intra", P, end, True), ("succ", P - s, P, False),
                                 ("inter", jnp.zeros_like(P), P - s, False)):
        cols = jnp.where((v >= lo) & (v < hi), v - lo, SENTINEL)
        reach = (d < SENTINEL) & (d >= begin - hi + 1) & (d <= end - 1 - lo)
        o = d if causal else d - (begin - hi)
        out[name] = (cols, jnp.where(reach, o, SENTINEL))
    return out
