"""The Mosaic GPU DCA prefill kernel in Mosaic GPU interpret mode (CPU) vs the float32 reference.

Interpret mode runs the kernel's warpgroups, barriers, TMA copies and wgmma on the CPU; it cannot run
`pl.run_state` or a register wgmma operand, so the kernel's interpret variant stages P through SMEM for
the P.V product (the only difference, see the module docstring). The GPU-only variant is checked by
benchmarks/check_mgpu.py on the H100.
Tolerances (stated where checked): bf16 inputs, the kernel writes bf16 output, the reference computes in
float32 on the same bf16 values: ||out - ref|| / ||ref|| < 1e-2 (bf16 rounding of the output is ~2e-3),
LSE (float32 in the kernel) max |diff| < 1e-3.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.dca_prefill_mgpu import _reference, dca_prefill_mgpu


def _inputs(seed, *, dca, B, T, N, K, H, S):
    ks = jax.random.split(jax.random.key(seed), 3)
    qshape = (3, B, T, N, H) if dca else (B, T, N, H)
    q = jax.random.normal(ks[0], qshape, jnp.float32).astype(jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, S, K, H), jnp.float32).astype(jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, S, K, H), jnp.float32).astype(jnp.bfloat16)
    return q, k, v


def _check(q, k, v, q_start, kv_len, *, chunk_len, block_k, num_splits=1):
    q_start, kv_len = jnp.asarray(q_start, jnp.int32), jnp.asarray(kv_len, jnp.int32)
    out, lse = dca_prefill_mgpu(q, k, v, q_start, kv_len, chunk_len=chunk_len, block_k=block_k,
                                num_splits=num_splits, interpret=True)
    ref_out, ref_lse = _reference(q, k, v, q_start, kv_len, chunk_len=chunk_len)
    assert out.shape == ref_out.shape and out.dtype == q.dtype
    assert lse.shape == ref_lse.shape and lse.dtype == jnp.float32
    out = np.asarray(out.astype(jnp.float32))
    rel = np.linalg.norm(out - ref_out) / np.linalg.norm(ref_out)
    assert rel < 1e-2, rel                                           # bf16 output rounding ~2e-3
    assert np.max(np.abs(np.asarray(lse) - np.asarray(ref_lse))) < 1e-3


def test_dca_qwen_heads_tile_straddles_chunk_boundary():
    # 28 q / 4 kv heads (G = 7), s = 128. Rows 100..169 (T = 70, not a multiple of the 128-row CTA):
    # warpgroup 0 holds rows 100..163, straddling the chunk 0/1 boundary at row 28 (mixed path:
    # per-row variant built in SMEM); the cache (S = 256) is longer than kv_len = 170.
    q, k, v = _inputs(0, dca=True, B=1, T=70, N=28, K=4, H=64, S=256)
    _check(q, k, v, [100], [170], chunk_len=128, block_k=64)


def test_dca_all_segments_batch_ragged_cache():
    # B = 2 rows with different q_start / kv_len; s = 128, block_k = 128 (one key tile per DCA chunk),
    # H = 128. Row 0: positions 250..399 reach chunk 3, so every segment (inter, succ, intra) and both
    # uniform and mixed tiles run; row 1 starts at 0 with kv_len < S. S = 400 is not a multiple of
    # block_k (the wrapper pads K/V).
    q, k, v = _inputs(1, dca=True, B=2, T=150, N=4, K=2, H=128, S=400)
    _check(q, k, v, [250, 0], [400, 150], chunk_len=128, block_k=128)


def test_plain_causal_unaligned_start():
    # Plain RoPE attention (one variant), q_start = 37 not tile-aligned, T = 100.
    q, k, v = _inputs(2, dca=False, B=1, T=100, N=2, K=1, H=64, S=192)
    _check(q, k, v, [37], [137], chunk_len=None, block_k=64)


def test_key_splits_dca_mixed_tiles_and_rows_with_no_key_in_a_split():
    # The DCA case above (28/4 heads, rows 100..169 straddling the chunk boundary, kv_len 170 < S) with the
    # keys of each CTA cut into 3 runs: 3 tiles of 64 needed -> one tile per split, so the rows of warpgroup
    # 0 (positions 100..163) see nothing in split 2 (keys 128..191 lie right of rows 100..127's diagonal,
    # a masked tile whose first rows have no key: the NaN guard) and the partials meet in the LSE merge.
    # Tolerance as _check: the merge adds one bf16 rounding of the partials (2^-9 relative) to the 1e-2.
    q, k, v = _inputs(0, dca=True, B=1, T=70, N=28, K=4, H=64, S=256)
    _check(q, k, v, [100], [170], chunk_len=128, block_k=64, num_splits=3)


def test_key_splits_plain_batch_more_splits_than_tiles():
    # Two batch rows, 4 splits: row 0 needs 5 tiles of 64 (positions 200..299), row 1 (q_start 0, T 100
    # rows) 2 tiles, so some of its CTAs have an empty key run (lse -inf, out 0: weight 0 in the merge).
    q, k, v = _inputs(5, dca=False, B=2, T=100, N=4, K=2, H=64, S=320)
    _check(q, k, v, [200, 0], [300, 100], chunk_len=None, block_k=64, num_splits=4)


def test_prefill_num_splits_fills_the_sms_and_leaves_long_chunks_alone():
    from pallas_kernels.dca_prefill_mgpu import prefill_num_splits
    # Worked example of its docstring: 56 CTAs (256 rows x 28 heads) over 1024 tiles on 132 SMs -> 7.
    assert prefill_num_splits(1, 28, 256, 131072, 128, num_sms=132) == 7
    assert prefill_num_splits(1, 28, 8192, 131072, 128, num_sms=132) == 1   # 13.6 waves already
    assert prefill_num_splits(1, 28, 256, 100, 128, num_sms=132) == 1       # never more splits than tiles
    with pytest.raises(ValueError, match="keys=0"):
        prefill_num_splits(1, 28, 256, 0, 128, num_sms=132)


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_q=128), "block_q"),
    (dict(block_k=32), "block_k"),
    (dict(max_concurrent_steps=1), "max_concurrent_steps"),
    (dict(block_k=128, max_concurrent_steps=4), "shared memory"),
    (dict(num_splits=0), "num_splits"),
])
def test_bad_config_is_refused(kwargs, match):
    q, k, v = _inputs(3, dca=True, B=1, T=8, N=4, K=2, H=128, S=128)
    with pytest.raises(ValueError, match=match):
        dca_prefill_mgpu(q, k, v, jnp.zeros(1, jnp.int32), jnp.full(1, 8, jnp.int32), chunk_len=128,
                         interpret=True, **kwargs)


def test_float32_inputs_are_refused():
    q, k, v = _inputs(4, dca=False, B=1, T=8, N=2, K=1, H=64, S=64)
    with pytest.raises(ValueError, match="bf16 or all f16"):
        dca_prefill_mgpu(q.astype(jnp.float32), k, v, jnp.zeros(1, jnp.int32), jnp.full(1, 8, jnp.int32),
                         interpret=True)


def test_kv_rows_read_a_larger_cache_in_place():
    # A server's cache holds R = 3 rows; the 2 query rows read cache rows 2 and 0 (kv_rows) in place: equal
    # to the reference on a copy of those rows within _check's tolerances (a wrong row or offset would be
    # off by O(1)). 28/4 heads, DCA, T = 70 (not a multiple of the 128-row CTA), row 0 straddling a chunk
    # boundary, row 1 with kv_len < S.
    q, _, _ = _inputs(3, dca=True, B=2, T=70, N=28, K=4, H=64, S=256)
    _, k, v = _inputs(4, dca=True, B=3, T=1, N=28, K=4, H=64, S=256)
    rows = jnp.asarray([2, 0], jnp.int32)
    q_start, kv_len = jnp.asarray([100, 20], jnp.int32), jnp.asarray([170, 90], jnp.int32)
    out, lse = dca_prefill_mgpu(q, k, v, q_start, kv_len, chunk_len=128, block_k=64, interpret=True, kv_rows=rows)
    ref_out, ref_lse = _reference(q, k[rows], v[rows], q_start, kv_len, chunk_len=128)
    out = np.asarray(out.astype(jnp.float32))
    assert np.linalg.norm(out - ref_out) / np.linalg.norm(ref_out) < 1e-2        # as _check
    assert np.max(np.abs(np.asarray(lse) - np.asarray(ref_lse))) < 1e-3
    with pytest.raises(ValueError, match="kv_rows must be"):
        dca_prefill_mgpu(q, k, v, q_start, kv_len, chunk_len=128, block_k=64, interpret=True, kv_rows=rows[:1])
