"""impl="reference" of the attention dispatcher: plain jnp, float32, O(T*S) memory.

Contract: zenjax/attention/__init__.py. Written for clarity, not speed: it builds the [T, S] logits, picks
the DCA query variant per key region, masks, and normalizes. Every other implementation is tested
against it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from zenjax.config import DCAConfig

SPARSE_READY = True   # zenjax/attention/sparse.py's run_sparse is this implementation's sparse path
NEG_INF = -1e30  # finite: a fully masked row gives a uniform softmax, never NaN


def attention_mask(q_start, kv_len, T: int, S: int):
    """[B, T, S] bool: causal and within the valid cache."""
    p = q_start[:, None] + jnp.arange(T)[None, :]                    # [B, T]
    j = jnp.arange(S)
    return (j[None, None, :] <= p[:, :, None]) & (j[None, None, :] < kv_len[:, None, None])


def dca_region(q_start, T: int, S: int, chunk_len: int):
    """[B, T, S] int: 0 = same DCA chunk (intra), 1 = previous chunk (succ), 2 = older (inter)."""
    p = q_start[:, None] + jnp.arange(T)[None, :]
    j = jnp.arange(S)
    d = p[:, :, None] // chunk_len - j[None, None, :] // chunk_len
    return jnp.clip(d, 0, 2)


def reference_attention_lse(q, k_cache, v_cache, *, q_start, kv_len, dca: DCAConfig | None = None,
                            extra_mask=None):
    """Plain-jnp attention in float32. Returns (out [B,T,N,H] float32, lse [B,T,N] float32).

    GQA without repeating K/V: q heads are grouped as [K, G] (q head n uses kv head n // G).
    extra_mask [B, N, T, S] bool (sparse prefill): keys also outside it are masked.
    """
    B, S, K, H = k_cache.shape
    T, N = q.shape[-3], q.shape[-2]
    G = N // K
    scale = 1.0 / (H ** 0.5)
    kf = k_cache.astype(jnp.float32)
    vf = v_cache.astype(jnp.float32)
    qf = q.astype(jnp.float32).reshape(q.shape[:-2] + (K, G, H))
    if dca is None:
        logits = jnp.einsum("btkgh,bskh->bkgts", qf, kf) * scale
    else:
        per_variant = jnp.einsum("rbtkgh,bskh->rbkgts", qf, kf) * scale           # [3, B, K, G, T, S]
        region = dca_region(q_start, T, S, dca.chunk_len)[:, None, None]          # [B, 1, 1, T, S]
        logits = jnp.where(region == 0, per_variant[0],
                           jnp.where(region == 1, per_variant[1], per_variant[2]))
    mask = attention_mask(q_start, kv_len, T, S)[:, None, None]                  # [B, 1, 1, T, S]
    if extra_mask is not None:
        mask = mask & extra_mask.reshape(B, K, G, T, S)
    logits = jnp.where(mask, logits, NEG_INF)
    lse = jax.nn.logsumexp(logits, axis=-1)                                      # [B, K, G, T]
    probs = jnp.exp(logits - lse[..., None])
    out = jnp.einsum("bkgts,bskh->btkgh", probs, vf).reshape(B, T, N, H)
    return out, lse.reshape(B, N, T).transpose(0, 2, 1)


def run(q, k_cache, v_cache, meta):
    """The dispatcher's entry: (out, lse) float32."""
    return reference_attention_lse(q, k_cache, v_cache, q_start=meta.q_start, kv_len=meta.kv_len, dca=meta.dca)
