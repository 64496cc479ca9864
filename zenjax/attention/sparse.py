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


def _rotate_const(x, pos: int, theta: float):
    """x [n, N, H] rotated by the constant position `pos` (apply_rope wants [B, T, heads, H])."""
    return apply_rope(x[None], jnp.full((1, x.shape[0]), pos, jnp.int32), theta)[0]


def _topk(scores, k_static: int, budget, kv_len):
    """scores [N, S] -> ids [N, k_static] (SENTINEL where beyond the head's budget or kv_len)."""
    if k_static == 0:
        return jnp.zeros((scores.shape[0], 0), jnp.int32)
    vals, ids = lax.top_k(scores, k_static)
    rank = jnp.arange(k_static)[None, :]
    keep = (rank < jnp.minimum(budget[:, None], kv_len)) & (vals > -jnp.inf)
    return jnp.where(keep, ids, SENTINEL).astype(jnp.int32)


def _sorted_unique(x):
    """Ascending along the last axis, repeated entries replaced by SENTINEL (then at the end)."""
    x = jnp.sort(x, axis=-1)
    dup = jnp.concatenate([jnp.zeros(x.shape[:-1] + (1,), bool), x[..., 1:] == x[..., :-1]], axis=-1)
    return jnp.sort(jnp.where(dup, SENTINEL, x), axis=-1)


def _estimate_row(q_rows, k, row_pos, row_ok, q_start, kv_len, *, layer, dca, group):
    """One batch row. q_rows [n, N, H] q_intra of the scored rows at positions row_pos [n] (row_ok: real
    rows), k [S, K, H]. Returns (vertical [N, V], slash [N, D])."""
    S, N, H = k.shape[0], q_rows.shape[1], q_rows.shape[2]
    scale = 1.0 / (H ** 0.5)
    j = jnp.arange(S)
    if dca is not None:
        s, c = dca.chunk_len, dca.chunk_size
        P = (q_start // s) * s
        variants = jnp.stack([q_rows, _rotate_const(q_rows, s, layer.rope_theta),
                              _rotate_const(q_rows, c, layer.rope_theta)])               # [3, n, N, H]
        region = jnp.where(j >= P, 0, jnp.where(j >= P - s, 1, 2))                       # [S]
    else:
        variants = q_rows[None]
        region = jnp.zeros((S,), jnp.int32)
    visible = (j[None, :] <= row_pos[:, None]) & (j[None, :] < kv_len) & row_ok[:, None]  # [n, S]
    dist_key = row_pos[:, None] - j[None, :]                 # key of diagonal d = j for row i: p_i - d

    def head(n):
        kh = k[:, n // group].astype(jnp.float32)                                        # [S, H]
        qh = lax.dynamic_index_in_dim(variants, n, axis=2, keepdims=False).astype(jnp.float32)  # [R, n, H]
        lg = jnp.einsum("rih,sh->ris", qh, kh) * scale
        lg = jnp.take_along_axis(lg, jnp.broadcast_to(region[None, None], (1,) + lg.shape[1:]), axis=0)[0]
        lg = jnp.where(visible, lg, -jnp.inf)
        m = jnp.max(lg, axis=-1, keepdims=True)
        e = jnp.where(visible, jnp.exp(lg - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
        a = e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), 1e-30)                    # [n, S]
        vert = jnp.sum(a, axis=0)
        diag = jnp.take_along_axis(a, jnp.clip(dist_key, 0, S - 1), axis=1)
        slash = jnp.sum(jnp.where(dist_key >= 0, diag, 0.0), axis=0)                     # [S] by d
        return vert, slash

    vert, slash = lax.map(head, jnp.arange(N))                                           # [N, S] each
    vert = jnp.where(j < kv_len, jnp.where(j < layer.sink, jnp.inf, vert), -jnp.inf)
    slash = jnp.where(j < kv_len, jnp.where(j < layer.local, jnp.inf, slash), -jnp.inf)  # d <= kv_len - 1
    v_ids = _topk(vert, min(max(layer.vertical), S), jnp.asarray(layer.vertical, jnp.int32), kv_len)
    s_ids = _topk(slash, min(max(layer.slash), S), jnp.asarray(layer.slash, jnp.int32), kv_len)
    if dca is not None:
        v_ids = jnp.concatenate([v_ids, _fallback(v_ids, s_ids, q_start, kv_len, dca)], axis=-1)
    return _sorted_unique(v_ids), jnp.sort(s_ids, axis=-1)


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
