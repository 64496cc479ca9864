"""Dual Chunk Attention positions, and a brute-force oracle that checks the three-variant trick.

Spec: shared/spec/long-context.md section 2.2 ("code" column, i.e. what vLLM/ChunkLlama compute).

How DCA is run (zenjax/model.py and the attention implementations):
  1. `dca_positions(pos, dca)` turns absolute positions into four rotary positions:
        key_pos  = j mod s                      (keys are cached rotated with this)
        q_intra  = r(p) = p mod s               (for keys in the query's own DCA chunk)
        q_succ   = min(r(p) + s, c)             (for keys one DCA chunk back)
        q_inter  = min(2s - 1, c)  (a constant) (for keys two or more DCA chunks back)
     with c = chunk_size, w = local_size, s = c - w.
  2. Each query is rotated three ways, each key once; attention picks the query variant per key
     region (zenjax.attention.reference_attention_lse, zenjax.attention.cudnn, the Pallas kernels).

The oracle below does NOT use step 2. It builds the relative-distance matrix Delta[p, j] of spec 2.2
directly from the chunk indices of p and j, and computes each logit as q_p . R(Delta[p, j]) k_j with
UNROTATED q and k (RoPE's relative property: R(a) q . R(b) k = R(a - b) q . k). If the three-variant
trick, the region selection or the key rotation were wrong, the two would disagree.

Worked example (c=8, w=3 -> s=5), query p=12 (chunk 2, r=2) against keys j=0..12:
    j in chunk 2 (10..12): Delta = p - j                    -> 2 1 0
    j in chunk 1 (5..9):   Delta = min(r(p)+s, c) - r(j)    = 7 - (0..4) -> 7 6 5 4 3
    j in chunk 0 (0..4):   Delta = min(2s-1, c) - r(j)      = 8 - (0..4) -> 8 7 6 5 4
which is the row "p=12: 8 7 6 5 4 7 6 5 4 3 2 1 0" of the spec's table.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from zenjax.config import DCAConfig
from zenjax.rope import apply_rope


def dca_positions(pos, dca: DCAConfig):
    """Absolute positions (int array, any shape) -> (key_pos, q_intra_pos, q_succ_pos, q_inter_pos), int32.

    Example (c=64, w=16 -> s=48): pos 50 -> key 2, intra 2, succ min(2+48, 64)=50, inter min(95, 64)=64;
    pos 60 -> key 12, intra 12, succ min(60, 64)=60, inter 64; pos 63 -> succ 63; pos 70 -> succ 64 (capped).
    """
    pos = jnp.asarray(pos, jnp.int32)
    s = dca.chunk_len
    r = pos % s
    q_succ = jnp.minimum(r + s, dca.succ_cap)
    q_inter = jnp.full_like(pos, dca.inter_pos)
    return r, r, q_succ.astype(jnp.int32), q_inter


def rotate_for_dca(q_raw, k_raw, q_pos, k_pos, dca: DCAConfig, theta: float):
    """Rotate unrotated q [B,T,N,H] / k [B,S,K,H] (positions q_pos [B,T], k_pos [B,S]) the way the model
    does for the dispatcher: (q3 [3,B,T,N,H] = intra, succ, inter; k [B,S,K,H] rotated with j mod s)."""
    _, intra, succ, inter = dca_positions(q_pos, dca)
    key_pos = dca_positions(k_pos, dca)[0]
    # One rotation broadcast over the three position sets (the same values as three rotations stacked).
    q3 = apply_rope(q_raw[None], jnp.stack([intra, succ, inter]), theta)
    return q3, apply_rope(k_raw, key_pos, theta)


# ----------------------------------------------------------------------------------------------
# Brute-force oracle (numpy, float64)
# ----------------------------------------------------------------------------------------------

def delta_matrix(q_pos, k_pos, dca: DCAConfig | None):
    """Delta[p, j] = query rotary position - key rotary position, spec 2.2 "code" column.

    q_pos [T], k_pos [S] absolute positions (numpy ints). Written from the spec's region rules, not from
    `dca_positions`, so tests can check the two against each other. Entries with j > p are filled too
    (callers mask them). dca=None -> plain RoPE, Delta = p - j.
    """
    p = np.asarray(q_pos, np.int64)[:, None]
    j = np.asarray(k_pos, np.int64)[None, :]
    if dca is None:
        return p - j
    c, s = dca.chunk_size, dca.chunk_len
    n_p, n_j = p // s, j // s
    r_p, r_j = p % s, j % s
    same = p - j                                  # same chunk: exact distance
    prev = np.minimum(r_p + s, c) - r_j           # one chunk back: succ position capped at c
    older = min(2 * s - 1, c) - r_j               # two or more back: constant inter position
    return np.where(n_j == n_p, same, np.where(n_j == n_p - 1, prev, older))


def dca_oracle_attention(q_raw, k_raw, v, *, q_start, kv_len, dca: DCAConfig | None, theta: float):
    """Brute-force attention with relative rotations. Returns (out [B,T,N,H], lse [B,T,N]) float64.

    q_raw [B,T,N,H], k_raw/v [B,S,K,H] are UNROTATED; q_start/kv_len [B] ints. Query row t (absolute
    p = q_start + t) sees keys j <= p, j < kv_len; scale 1/sqrt(H). Logit[p, j] = q_p . R(Delta[p, j]) k_j,
    expanded per rotary pair i (q = (q1, q2) halves, angle phi = Delta * inv_freq[i]):
        R(phi) q . k = cos(phi) (q1 k1 + q2 k2) + sin(phi) (q1 k2 - q2 k1)
    Rows with no visible key (padding beyond kv_len) get out 0, lse -inf.
    """
    q = np.asarray(q_raw, np.float64)
    k = np.asarray(k_raw, np.float64)
    vv = np.asarray(v, np.float64)
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    half = H // 2
    inv_freq = 1.0 / (float(theta) ** (np.arange(0, H, 2, dtype=np.float64) / H))          # [H/2]
    out = np.zeros((B, T, N, H))
    lse = np.full((B, T, N), -np.inf)
    for b in range(B):
        p = int(q_start[b]) + np.arange(T)
        j = np.arange(S)
        delta = delta_matrix(p, j, dca)                                                    # [T, S]
        visible = (j[None, :] <= p[:, None]) & (j[None, :] < int(kv_len[b]))
        phi = delta[:, :, None] * inv_freq                                                 # [T, S, H/2]
        cos, sin = np.cos(phi), np.sin(phi)
        kk = np.repeat(k[b], G, axis=1)                                                    # [S, N, H]
        q1, q2 = q[b, ..., :half], q[b, ..., half:]                                        # [T, N, H/2]
        k1, k2 = kk[..., :half], kk[..., half:]                                            # [S, N, H/2]
        a = np.einsum("tni,sni->ntsi", q1, k1) + np.einsum("tni,sni->ntsi", q2, k2)
        c = np.einsum("tni,sni->ntsi", q1, k2) - np.einsum("tni,sni->ntsi", q2, k1)
        logits = (a * cos + c * sin).sum(-1) / np.sqrt(H)                                  # [N, T, S]
        logits = np.where(visible[None], logits, -np.inf)
        m = logits.max(-1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        e = np.exp(logits - m)
        z = e.sum(-1, keepdims=True)
        probs = e / np.where(z > 0, z, 1.0)
        out[b] = np.einsum("nts,snh->tnh", probs, np.repeat(vv[b], G, axis=1))
        with np.errstate(divide="ignore"):
            lse[b] = (np.log(z) + m)[..., 0].T
    return out, lse
