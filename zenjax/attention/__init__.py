"""The attention dispatcher: the model's only way into attention kernels.

One call covers prefill chunks and decode steps, plain RoPE, Dual Chunk Attention and sparse prefill:

    out = attention(q, k_cache, v_cache, meta, impl="reference" | "cudnn" | "pallas")
    out, lse = attention_lse(q, k_cache, v_cache, meta, impl=...)

Shapes (alphabet of zenjax/model.py):
    q        [B, T, N, H]      plain: queries rotated with their absolute positions
             [3, B, T, N, H]   DCA: the same queries rotated three ways, (intra, succ, inter), spec 2.2
    k_cache  [B, S, K, H]      keys already written for this step (DCA: rotated with j mod s)
    v_cache  [B, S, K, H]
    meta     AttentionMeta     q_start [B], kv_len [B], dca, sparse budgets / indices, and kv_rows
                               (meta.py): with kv_rows, k/v may hold more rows than B, row b reads kv_rows[b]
    out      [B, T, N, H]      in q's dtype;  lse [B, T, N] float32 (natural log)

Semantics: query row t (absolute p = q_start + t) attends keys j <= p, j < kv_len, with softmax scale
1/sqrt(H); rows t >= kv_len - q_start are padding (finite output, ignored). The DCA temperature m(L) is
applied by the model to q and k before they get here (vLLM's convention, spec 2.6), so every
implementation uses the plain scale. With DCA, the key j is seen by q_intra when floor(j/s) == floor(p/s),
by q_succ when it is one DCA chunk back, by q_inter otherwise. With `meta.sparse` set (a prefill step of
a prompt longer than the sparse threshold), row t attends only the keys of the vertical-slash mask
defined in zenjax/attention/sparse.py, estimated from this step's queries unless `meta.indices` is given.

Several devices: `attention(..., mesh=mesh)` with a zenjax mesh (zenjax/sharding.py) runs the chosen
implementation inside `jax.shard_map`, per device on its q heads (split over the mesh's ("tp", "kvr")) and
the kv heads they read (split over "tp"; kv heads are replicated over "kvr" when tensor_parallel > K), so
group mapping stays local and every implementation is unchanged. Sparse indices are estimated on the
global arrays and sliced with the q heads.

Implementations live in a registry, `IMPLS`: name -> module, imported on first use (cudnn / pallas pull in
GPU-only code). A module provides `run(q, k, v, meta) -> (out, lse)` for dense attention and may provide
`run_sparse(q, k, v, meta)`; without one the sparse step uses the reference's (plain jnp). `reference` is
O(T*S) memory (tests, CPU, short inputs); the others must equal it within the tolerance their tests state.
"""
from __future__ import annotations

import importlib

from zenjax.attention.meta import AttentionMeta, select_rows
from zenjax.attention.reference import NEG_INF, attention_mask, dca_region, reference_attention_lse

__all__ = ["AttentionMeta", "IMPLS", "attention", "attention_lse", "implementation", "sparse_ready",
           "reference_attention_lse",
           "attention_mask", "dca_region", "NEG_INF"]

IMPLS = {
    "reference": "zenjax.attention.reference",
    "cudnn": "zenjax.attention.cudnn",
    "pallas": "zenjax.attention.pallas",
}


def implementation(impl: str):
    """The module registered under `impl`."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl={impl!r}: expected one of {', '.join(IMPLS)}")
    return importlib.import_module(IMPLS[impl])


def sparse_ready(impl: str) -> bool:
    """Whether `impl` has a validated, memory-bounded sparse prefill path here (its module's SPARSE_READY,
    a bool or a function of the machine: pallas's holds on Hopper GPUs only).
    The reference's is O(T*S) but it is the reference; cudnn has none."""
    ready = getattr(implementation(impl), "SPARSE_READY", False)
    return bool(ready() if callable(ready) else ready)


def attention_lse(q, k_cache, v_cache, meta: AttentionMeta, *, impl: str, k_scale=None, v_scale=None,
                  mesh=None):
    """(out [B,T,N,H] in q's dtype, lse [B,T,N] float32) through the implementation `impl`.

    An e4m3 cache comes with its [B,S,K] float32 scales: a module with READS_FP8 gets them as they are
    (pallas: the decode kernel scales e4m3 tiles in registers, no dequantized copy of the layer's cache);
    every other path, sparse prefill included, gets a dequantized copy in q's dtype.

    mesh: a zenjax mesh (zenjax/sharding.py) spanning several devices -> the implementation runs inside
    `jax.shard_map`, each device on its own q heads and the kv heads they read (q heads split over
    ("tp", "kvr"), kv heads over "tp", so a q head's kv head is always local), replicated over "ep".
    Sparse indices [B, N, ...] are estimated on the global arrays (the per-head budgets are static) and
    sliced with the q heads."""
    if mesh is None or mesh.size == 1:
        return _local_attention_lse(q, k_cache, v_cache, meta, impl=impl, k_scale=k_scale, v_scale=v_scale)
    meta, (k_cache, v_cache, k_scale, v_scale) = _rows(implementation(impl), meta, k_cache, v_cache, k_scale, v_scale)
    import jax
    from jax.sharding import PartitionSpec as P
    from zenjax.sharding import spec_for
    if (meta.sparse is not None) and meta.indices is None:
        from zenjax.attention import sparse
        if k_scale is not None:           # the estimator reads float keys (the sparse path dequantizes anyway)
            from zenjax.model import dequantize_fp8
            k_cache, v_cache = dequantize_fp8(k_cache, k_scale, q.dtype), dequantize_fp8(v_cache, v_scale, q.dtype)
            k_scale = v_scale = None
        meta = meta.replace(indices=sparse.estimate(q, k_cache, meta))
    heads = spec_for(("q_heads",), mesh)[0]
    kvh = spec_for(("kv_heads",), mesh)[0]
    lead = (None,) * (q.ndim - 3)                                  # [3,] B, T
    q_spec, out_spec = P(*lead, None, heads, None), P(None, None, heads, None)
    kv_spec, scale_spec = P(None, None, kvh, None), P(None, None, kvh)
    idx_spec = None if meta.indices is None else jax.tree.map(lambda x: P(None, heads, *(None,) * (x.ndim - 2)),
                                                              meta.indices)          # [B, N, ...]
    meta_spec = meta.replace(q_start=P(), kv_len=P(), indices=idx_spec,
                             kv_rows=None if meta.kv_rows is None else P())
    scales = () if k_scale is None else (k_scale, v_scale)

    def local(q, k, v, meta, *scales):
        ks, vs = scales if scales else (None, None)
        return _local_attention_lse(q, k, v, meta, impl=impl, k_scale=ks, v_scale=vs)

    fn = jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, meta_spec) + (scale_spec,) * len(scales),
                       out_specs=(out_spec, P(None, None, heads)), check_vma=False)
    return fn(q, k_cache, v_cache, meta, *scales)


def _local_attention_lse(q, k_cache, v_cache, meta: AttentionMeta, *, impl: str, k_scale=None, v_scale=None):
    """attention_lse on one device's arrays (all heads, or the heads of a shard_map body)."""
    mod = implementation(impl)
    meta, (k_cache, v_cache, k_scale, v_scale) = _rows(mod, meta, k_cache, v_cache, k_scale, v_scale)
    dense = meta.sparse is None and meta.indices is None
    if k_scale is not None and not (dense and getattr(mod, "READS_FP8", False)):
        from zenjax.model import dequantize_fp8
        k_cache, v_cache = dequantize_fp8(k_cache, k_scale, q.dtype), dequantize_fp8(v_cache, v_scale, q.dtype)
        k_scale = v_scale = None
    if dense:
        scales = {} if k_scale is None else dict(k_scale=k_scale, v_scale=v_scale)
        out, lse = mod.run(q, k_cache, v_cache, meta, **scales)
        return out.astype(q.dtype), lse
    from zenjax.attention import sparse
    if meta.indices is None:
        meta = meta.replace(indices=sparse.estimate(q, k_cache, meta))
    run_sparse = getattr(mod, "run_sparse", None) or sparse.run_sparse
    out, lse = run_sparse(q, k_cache, v_cache, meta)
    return out.astype(q.dtype), lse


def _rows(mod, meta: AttentionMeta, *caches):
    """(meta, caches) as `mod` takes them: with meta.kv_rows set, the full caches where the module indexes
    them itself (READS_KV_ROWS, dense, and READS_FP8 for an e4m3 cache), else a copy of the rows it reads
    (select_rows) and kv_rows cleared. The sparse path always gets the copy: its estimator and kernels
    read [B, S, K, H]."""
    if meta.kv_rows is None:
        return meta, caches
    dense = meta.sparse is None and meta.indices is None
    fp8 = caches[2] is not None
    if dense and getattr(mod, "READS_KV_ROWS", False) and (not fp8 or getattr(mod, "READS_FP8", False)):
        return meta, caches
    return meta.replace(kv_rows=None), select_rows(meta.kv_rows, *caches)


def attention(q, k_cache, v_cache, meta: AttentionMeta, *, impl: str, k_scale=None, v_scale=None, mesh=None):
    """The attention output [B,T,N,H] in q's dtype; see the module docstring for the contract."""
    return attention_lse(q, k_cache, v_cache, meta, impl=impl, k_scale=k_scale, v_scale=v_scale, mesh=mesh)[0]
