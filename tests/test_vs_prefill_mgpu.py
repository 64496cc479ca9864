"""The Mosaic GPU vertical-slash sparse prefill kernel in interpret mode (CPU) vs the reference mask.

The reference is zenjax/attention/sparse.py's `run_sparse` (dense float32 DCA restricted to the mask
defined there) on the same bf16 values; the kernel module's own `_reference` builds the same mask the
other way round (per row block from active_blocks) and is checked too. Tolerances: the kernel writes bf16
output (rounding ~2e-3 relative) and merges its two passes in float32: ||out - ref|| / ||ref|| < 1e-2;
LSE is float32 throughout (exp2/log2 base change ~1e-6): max |diff| < 1e-3 over valid rows.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.vs_prefill_mgpu import _reference, vs_prefill_mgpu
from zenjax.attention import AttentionMeta, sparse
from zenjax.config import DCAConfig


def _case(seed, *, B, T, N, K, H, S, q_start, kv_len, n_cols, dists):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (3, B, T, N, H), jnp.float32).astype(jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, S, K, H), jnp.float32).astype(jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, S, K, H), jnp.float32).astype(jnp.bfloat16)
    rng = np.random.default_rng(seed)
    vert = np.full((B, N, n_cols + 2), sparse.SENTINEL, np.int32)
    slash = np.full((B, N, 5 + len(dists) + 1), sparse.SENTINEL, np.int32)
    for b in range(B):
        for n in range(N):
            vert[b, n, :n_cols] = np.sort(rng.choice(kv_len[b], n_cols, replace=False))
            slash[b, n, :5 + len(dists)] = np.sort(np.concatenate([np.arange(5), rng.choice(dists, len(dists))]))
    return q, k, v, jnp.asarray(q_start, jnp.int32), jnp.asarray(kv_len, jnp.int32), jnp.asarray(vert), jnp.asarray(slash)


@pytest.mark.parametrize("seed", [0])
def test_qwen_heads_three_dca_regions_partial_blocks(seed):
    # 28 q / 4 kv heads, s = 128: rows 260..359 (T = 100, not a whole 128-row block) lie in DCA chunk 2,
    # so keys [0,128) are inter, [128,256) succ, [256,360) intra; S = 448 (not a multiple of 128, kv_len <
    # S). Columns spread over all regions; diagonals: the 5 nearest (key block 2) plus far ones > 259
    # whose bands lie in key block 0 (inter), so key block 1 (succ) is reached only through its columns.
    s = 128
    q, k, v, qs, kl, vert, slash = _case(seed, B=1, T=100, N=28, K=4, H=64, S=448, q_start=[260], kv_len=[360],
                                        n_cols=24, dists=[270, 290, 310, 330])
    out, lse = vs_prefill_mgpu(q, k, v, qs, kl, vert, slash, chunk_len=s, interpret=True)
    meta = AttentionMeta.of(qs, kl, DCAConfig(s + 16, 16, s + 16),
                            indices=sparse.SparseIndices(vert, slash))
    ref, ref_lse = sparse.run_sparse(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), meta)
    own, own_lse = _reference(q, k, v, qs, kl, vert, slash, chunk_len=s)
    assert out.shape == ref.shape and out.dtype == q.dtype and lse.dtype == jnp.float32
    o = np.asarray(out.astype(jnp.float32))
    ref, own = np.asarray(ref), np.asarray(own)
    assert np.linalg.norm(o - ref) / np.linalg.norm(ref) < 1e-2
    assert np.max(np.abs(np.asarray(lse) - np.asarray(ref_lse))) < 1e-3
    assert np.max(np.abs(own - ref)) < 1e-5 and np.max(np.abs(np.asarray(own_lse) - np.asarray(ref_lse))) < 1e-5
    # and it is sparse: dense DCA differs
    dense_meta = AttentionMeta.of(qs, kl, DCAConfig(s + 16, 16, s + 16))
    from zenjax.attention import reference_attention_lse
    dense, _ = reference_attention_lse(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                       q_start=qs, kv_len=kl, dca=dense_meta.dca)
    assert np.linalg.norm(np.asarray(dense) - ref) / np.linalg.norm(ref) > 0.05


def test_refusals():
    q, k, v, qs, kl, vert, slash = _case(1, B=1, T=8, N=4, K=2, H=64, S=128, q_start=[0], kv_len=[8],
                                        n_cols=2, dists=[3])
    with pytest.raises(ValueError, match="multiple of 128"):
        vs_prefill_mgpu(q, k, v, qs, kl, vert, slash, chunk_len=48, interpret=True)
    with pytest.raises(ValueError, match="bf16"):
        vs_prefill_mgpu(q.astype(jnp.float32), k, v, qs, kl, vert, slash, chunk_len=128, interpret=True)
    with pytest.raises(ValueError, match="vertical"):
        vs_prefill_mgpu(q, k, v, qs, kl, vert[:, :2], slash, chunk_len=128, interpret=True)


@pytest.mark.parametrize("q_start, T, kv_len", [(260, 100, 360), (256, 300, 556), (0, 200, 200), (1000, 77, 1077)])
def test_block_distances_give_the_active_blocks(q_start, T, kv_len):
    """The kernel's per-head block-distance lists (block_distances) name exactly the blocks of the
    (query block, key block) table `active_blocks` defines, for q_start on and off a 128 boundary."""
    from pallas_kernels.vs_prefill_mgpu import BLOCK, active_blocks, block_distances
    S = 1280
    rng = np.random.default_rng(q_start)
    N = 3
    slash = np.full((1, N, 40), sparse.SENTINEL, np.int32)
    for n in range(N):
        d = np.sort(rng.choice(kv_len, 30 + n, replace=False))
        slash[0, n, :len(d)] = d
    qs, kl = jnp.array([q_start], jnp.int32), jnp.array([kv_len], jnp.int32)
    act = np.asarray(active_blocks(jnp.asarray(slash), qs, kl, T, S))[0]                # [N, nqb, nkb]
    delta, bstart, nblk = (np.asarray(x)[0] for x in block_distances(jnp.asarray(slash), qs, kl, T, S))
    for n in range(N):
        for m in range(act.shape[1]):
            got = [q_start // BLOCK + m - x for x in delta[n, bstart[n, m]:bstart[n, m] + nblk[n, m]]]
            assert got == sorted(got) and got == np.flatnonzero(act[n, m]).tolist(), (n, m)
