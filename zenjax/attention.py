"""The attention dispatcher: the model's only way into attention kernels.

One call covers prefill chunks and decode steps, plain RoPE and Dual Chunk Attention:

    out = attention(q, k_cache, v_cache, q_start=..., kv_len=..., impl="reference"|"cudnn"|"pallas",
                    dca=None | DCAConfig)

Shapes (alphabet of zenjax/model.py):
    q        [B, T, N, H]      plain: queries rotated with their absolute positions
             [3, B, T, N, H]   DCA: the same queries rotated three ways, (intra, succ, inter), spec 2.2
    k_cache  [B, S, K, H]      keys already written for this step (DCA: rotated with j mod s)
    v_cache  [B, S, K, H]
    q_start  [B] int32         absolute position of query row 0
    kv_len   [B] int32         valid keys after this step's write; query rows t >= kv_len - q_start
                               are padding (their output is finite and ignored)
    out      [B, T, N, H]      in q's dtype

Semantics: query row t (absolute p = q_start + t) attends keys j <= p, j < kv_len, with softmax scale
1/sqrt(H). The DCA temperature m(L) is applied by the model to q and k before they get here (vLLM's
convention, spec 2.6), so every implementation uses the plain scale. With DCA, the key j is seen by
q_intra when floor(j/s) == floor(p/s), by q_succ when it is one DCA chunk back, by q_inter otherwise.

`reference` is plain jnp (any backend, O(T*S) memory: for tests and short inputs); `cudnn` and `pallas`
must equal it within the tolerance their tests state.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from zenjax.config import DCAConfig

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


def reference_attention_lse(q, k_cache, v_cache, *, q_start, kv_len, dca: DCAConfig | None = None):
    """Plain-jnp attention in float32. Returns (out [B,T,N,H] float32, lse [B,T,N] float32).

    GQA without repeating K/V: q heads are grouped as [K, G] (q head n uses kv head n // G).
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
    logits = jnp.where(mask, logits, NEG_INF)
    lse = jax.nn.logsumexp(logits, axis=-1)                                      # [B, K, G, T]
    probs = jnp.exp(logits - lse[..., None])
    out = jnp.einsum("bkgts,bskh->btkgh", probs, vf).reshape(B, T, N, H)
    return out, lse.reshape(B, N, T).transpose(0, 2, 1)


def attention(q, k_cache, v_cache, *, q_start, kv_len, impl: str, dca: DCAConfig | None = None,
              k_scale=None, v_scale=None):
    """Dispatch to one implementation; see the module docstring for the contract. An e4m3 cache comes
    with its [B,S,K] float32 scales: the pallas path reads it in the decode kernel; the others get a
    dequantized copy in q's dtype (zenjax.model.dequantize_fp8)."""
    if k_scale is not None and impl != "pallas":
        from zenjax.model import dequantize_fp8
        k_cache, v_cache = dequantize_fp8(k_cache, k_scale, q.dtype), dequantize_fp8(v_cache, v_scale, q.dtype)
        k_scale = v_scale = None
    if impl == "reference":
        out, _ = reference_attention_lse(q, k_cache, v_cache, q_start=q_start, kv_len=kv_len, dca=dca)
        return out.astype(q.dtype)
    if impl == "cudnn":
        from zenjax import attention_cudnn
        return attention_cudnn.attention(q, k_cache, v_cache, q_start=q_start, kv_len=kv_len, dca=dca)
    if impl == "pallas":
        from zenjax import attention_pallas
        return attention_pallas.attention(q, k_cache, v_cache, q_start=q_start, kv_len=kv_len, dca=dca,
                                          k_scale=k_scale, v_scale=v_scale)
    raise ValueError(f"attention impl={impl!r}: expected reference, cudnn or pallas")
