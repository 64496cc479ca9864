"""Pallas DCA kernels in interpret mode (CPU) vs their plain-jnp references vs zenjax's reference.

Layout: Qwen's real heads (28 q / 4 kv, group 7) with head_dim 16; DCA chunk_size 64, local 16, so the
chunk length is s = 48; key/query blocks of 16. The batch rows of one call end in DCA chunks 0, 1, 2 and 5,
start at positions that are not tile-aligned, cross chunk boundaries inside a query tile, and carry
padding rows (T = 21 is not a multiple of 16). The cache has S = 293 slots (not a multiple of the key
block: the last key tile is read with masked loads, no K/V copy). Interpret mode is slow, so every case
packs several contexts into one call.

Tolerances: float32 inputs, max |diff| <= 2e-5 on outputs and LSE (the kernels reassociate the softmax
sums; observed ~1e-6). bfloat16 inputs: ||out - ref|| / ||ref|| <= 1e-2 (P is rounded to bf16 before the
second matmul, as in every flash kernel), LSE max |diff| <= 1e-2.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.dca_decode import dca_decode, dca_decode_reference
from pallas_kernels.dca_prefill import dca_prefill, dca_prefill_reference
from zenjax import attention as dispatcher
from zenjax.attention import reference_attention_lse
from zenjax.config import DCAConfig

N, K, H = 28, 4, 16
DCA = DCAConfig(chunk_size=64, local_size=16, original_max_position_embeddings=64)
S_LEN = DCA.chunk_len                                   # 48
SEQ = 6 * S_LEN + 5                                     # cache slots: chunk 5 and a ragged tail
TOL32 = 2e-5


def _inputs(seed, B, T, dca=True, dtype=jnp.float32, S=SEQ):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(k1, ((3,) if dca else ()) + (B, T, N, H), dtype)
    return q, jax.random.normal(k2, (B, S, K, H), dtype), jax.random.normal(k3, (B, S, K, H), dtype)


def _valid(q_start, kv_len, T):
    """[B, T] rows that are real queries (the rest are padding rows, contract: ignored)."""
    return np.arange(T)[None, :] < np.asarray(kv_len - q_start)[:, None]


def _max_diff(a, b, valid):
    d = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))
    return float(d.reshape(d.shape[0], d.shape[1], -1).max(-1)[valid].max())


# Prefill chunks: (q_start, kv_len) per batch row, T = 21 rows per call.
#   (5, 26)    inside chunk 0
#   (40, 61)   crosses the 0|1 boundary at 48 inside one query tile
#   (90, 108)  crosses 1|2 at 96; 18 real rows + 3 padding rows
#   (250, 271) in chunk 5: sees intra (240..), succ (192..239) and inter (0..191)
PREFILL_Q_START = jnp.array([5, 40, 90, 250], jnp.int32)
PREFILL_KV_LEN = jnp.array([26, 61, 108, 271], jnp.int32)
PREFILL_T = 21


@pytest.mark.parametrize("dca", [True, False], ids=["dca", "plain"])
def test_prefill_kernel_matches_references_fp32(dca):
    q, k, v = _inputs(0, 4, PREFILL_T, dca)
    cl = S_LEN if dca else None
    out, lse = dca_prefill(q, k, v, PREFILL_Q_START, PREFILL_KV_LEN, chunk_len=cl, block_q=16, block_k=16,
                           interpret=True)
    ref, ref_lse = dca_prefill_reference(q, k, v, PREFILL_Q_START, PREFILL_KV_LEN, chunk_len=cl)
    zen, zen_lse = reference_attention_lse(q, k, v, q_start=PREFILL_Q_START, kv_len=PREFILL_KV_LEN,
                                           dca=DCA if dca else None)
    valid = _valid(PREFILL_Q_START, PREFILL_KV_LEN, PREFILL_T)
    assert out.shape == (4, PREFILL_T, N, H) and out.dtype == jnp.float32 and lse.shape == (4, PREFILL_T, N)
    assert np.isfinite(np.asarray(out)).all()                       # padding rows too
    assert _max_diff(out, ref, valid) <= TOL32
    assert _max_diff(lse, ref_lse, valid) <= TOL32
    assert _max_diff(ref, zen, valid) <= TOL32                        # reference == zenjax reference
    assert _max_diff(ref_lse, zen_lse, valid) <= TOL32


def test_prefill_dca_differs_from_plain():
    """Guard against a kernel that ignores the variants: chunk 5 rows must differ from plain RoPE."""
    q, k, v = _inputs(0, 4, PREFILL_T, True)
    dca_out, _ = dca_prefill_reference(q, k, v, PREFILL_Q_START, PREFILL_KV_LEN, chunk_len=S_LEN)
    plain_out, _ = dca_prefill_reference(q[0], k, v, PREFILL_Q_START, PREFILL_KV_LEN)
    assert float(jnp.abs(dca_out[3] - plain_out[3]).max()) > 1e-2


def test_prefill_kernel_bf16_long_chunk():
    """bf16, and a query chunk spanning several DCA chunks: a whole 130-token prompt from position 0
    (chunks 0..2) and a chunk of 130 at 70 (crosses 96, 144 and 192; 127 real rows), blocks 16."""
    T = 130
    q_start, kv_len = jnp.array([0, 70], jnp.int32), jnp.array([130, 197], jnp.int32)
    q, k, v = _inputs(1, 2, T, True, jnp.bfloat16, S=6 * S_LEN)      # S a multiple of the block
    out, lse = dca_prefill(q, k, v, q_start, kv_len, chunk_len=S_LEN, block_q=16, block_k=16, interpret=True)
    ref, ref_lse = dca_prefill_reference(q, k, v, q_start, kv_len, chunk_len=S_LEN)
    valid = _valid(q_start, kv_len, T)
    assert out.dtype == jnp.bfloat16
    m = valid[:, :, None, None]
    err = np.linalg.norm(np.where(m, np.asarray(out, np.float32) - ref, 0)) / np.linalg.norm(np.where(m, ref, 0))
    assert err <= 1e-2
    assert _max_diff(lse, ref_lse, valid) <= 1e-2


# Decode: the new token is the last key; contexts end in chunks 0, 1 (just past 48), 2, 5, and 6 inside
# the last, ragged key tile (keys 288..292 of S = 293: that tile is read with masked loads).
DECODE_KV_LEN = jnp.array([20, 49, 97, 260, 291], jnp.int32)


@pytest.mark.parametrize("T,dca", [(1, True), (1, False), (3, True)], ids=["dca-T1", "plain-T1", "dca-T3"])
def test_decode_kernel_matches_references(T, dca):
    q, k, v = _inputs(2, 5, T, dca)
    q_start = DECODE_KV_LEN - T                 # T=3 at kv_len 49: queries 46, 47 | 48 cross a boundary
    cl = S_LEN if dca else None
    # 5 splits over at most 19 tiles: uneven shares; short rows leave some splits empty (lse = -inf).
    out, lse = dca_decode(q, k, v, q_start, DECODE_KV_LEN, chunk_len=cl, block_k=16, num_splits=5,
                          interpret=True)
    ref, ref_lse = dca_decode_reference(q, k, v, q_start, DECODE_KV_LEN, chunk_len=cl)
    zen, zen_lse = reference_attention_lse(q, k, v, q_start=q_start, kv_len=DECODE_KV_LEN,
                                           dca=DCA if dca else None)
    valid = np.ones((5, T), bool)
    assert out.shape == (5, T, N, H)
    assert _max_diff(out, ref, valid) <= TOL32
    assert _max_diff(lse, ref_lse, valid) <= TOL32
    assert _max_diff(ref, zen, valid) <= TOL32
    assert _max_diff(ref_lse, zen_lse, valid) <= TOL32


def test_one_pass_merge_equals_three_pass():
    """The decode kernel's single-reduction LSE merge against the three-pass lse_merge, with empty
    partials (lse = -inf) inside rows and one row whose partials are all empty (out 0, lse -inf in both).
    Error model: float32; both forms sum <= 66 terms whose weights lie in (0, 1], so reassociation moves
    a result by at most ~66 * 2^-24 ~ 4e-6 of its scale: out (|o| < 5) within 2e-5, lse (|lse| < 110)
    within 4e-6 relative (observed 3.6e-7 and 3.8e-6 absolute)."""
    from pallas_kernels._flash_dca import lse_merge, lse_merge_one_pass
    k1, k2, k3 = jax.random.split(jax.random.key(7), 3)
    P, shape = 66, (2, 4, 16)
    outs = jax.random.normal(k1, (P, *shape, H), jnp.float32)
    lses = 30.0 * jax.random.normal(k2, (P, *shape), jnp.float32)             # spreads of e^60 between splits
    empty = jax.random.bernoulli(k3, 0.4, (P, *shape)).at[:, 1, 2, 3].set(True)
    lses = jnp.where(empty, -jnp.inf, lses)
    got, got_lse = lse_merge_one_pass(outs, lses)
    want, want_lse = lse_merge(outs, lses, axis=0)
    assert got.shape == want.shape and got_lse.shape == want_lse.shape
    assert float(jnp.max(jnp.abs(got - want))) <= 2e-5
    finite = np.isfinite(np.asarray(want_lse))
    assert not finite[1, 2, 3] and not np.isfinite(np.asarray(got_lse)[1, 2, 3])
    assert float(jnp.abs(got[1, 2, 3]).max()) == 0.0
    np.testing.assert_allclose(np.asarray(got_lse)[finite], np.asarray(want_lse)[finite], rtol=4e-6, atol=0)


def test_dispatcher_pallas_equals_reference():
    """impl="pallas" through zenjax.attention (adapter picks blocks 16 for s = 48): prefill and decode."""
    q, k, v = _inputs(3, 4, PREFILL_T, True)
    valid = _valid(PREFILL_Q_START, PREFILL_KV_LEN, PREFILL_T)
    meta = dispatcher.AttentionMeta.of(PREFILL_Q_START, PREFILL_KV_LEN, DCA)
    got = dispatcher.attention(q, k, v, meta, impl="pallas")
    want = dispatcher.attention(q, k, v, meta, impl="reference")
    assert _max_diff(got, want, valid) <= TOL32
    qd, kl = q[:, :, :1], DECODE_KV_LEN[:4]
    meta = dispatcher.AttentionMeta.of(kl - 1, kl, DCA)
    got = dispatcher.attention(qd, k, v, meta, impl="pallas")
    want = dispatcher.attention(qd, k, v, meta, impl="reference")
    assert _max_diff(got, want, np.ones((4, 1), bool)) <= TOL32


def test_bad_input_is_refused():
    q, k, v = _inputs(4, 1, 4, True)
    qs, kl = jnp.array([0], jnp.int32), jnp.array([4], jnp.int32)
    with pytest.raises(ValueError, match="does not divide the DCA chunk length s=48"):
        dca_prefill(q, k, v, qs, kl, chunk_len=S_LEN, block_q=32, block_k=16, interpret=True)
    with pytest.raises(ValueError, match=r"wants q \[3,B,T,N,H\]"):
        dca_prefill(q[0], k, v, qs, kl, chunk_len=S_LEN, interpret=True)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        dca_decode(q[:, :, :, :27], k, v, qs, kl, chunk_len=S_LEN, block_k=16, interpret=True)
    with pytest.raises(ValueError, match="fewer than the DCA chunk length"):
        dca_decode(jnp.zeros((3, 1, 48, N, H)), k, v, qs, kl, chunk_len=S_LEN, block_k=16, interpret=True)


@pytest.mark.parametrize("T, S, splits", [(256, 131072, 7), (8192, 131072, 1), (300, 4096, 3)])
def test_dispatcher_asks_the_mosaic_kernel_for_key_splits(monkeypatch, T, S, splits):
    # The Mosaic path runs only on a Hopper GPU, so here its kernel is replaced by a recorder to check the
    # glue: the batch, heads, rows and cache length reach prefill_num_splits (132 SMs: a 256-row piece over 128K keys -> 7; an 8192-row piece -> 1; 300 rows
    # at 4096 keys = 84 CTAs x 32 tiles -> 3: 2 waves x (11 + 4) = 30 beats 1 wave x (32 + 4) = 36).
    from zenjax.attention import pallas as pallas_impl
    import pallas_kernels.dca_prefill_mgpu as mg
    seen = {}

    def fake(q, k, v, q_start, kv_len, **kw):
        seen.update(kw)
        return jnp.zeros(q.shape[1:], q.dtype), jnp.zeros(q.shape[1:4], jnp.float32)
    monkeypatch.setattr(pallas_impl, "_use_mgpu", lambda q, interpret: True)
    monkeypatch.setattr(mg, "dca_prefill_mgpu", fake)
    monkeypatch.setattr("pallas_kernels.dca_decode.device_num_sms", lambda: 132)
    q = jax.ShapeDtypeStruct((3, 1, T, 28, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, S, 4, 128), jnp.bfloat16)
    dca = DCAConfig(chunk_size=262144, local_size=8192, original_max_position_embeddings=32768)
    jax.eval_shape(lambda q, k, v: pallas_impl.attention_lse(
        q, k, v, q_start=jnp.zeros(1, jnp.int32), kv_len=jnp.full(1, S, jnp.int32), dca=dca), q, kv, kv)
    assert seen["num_splits"] == splits and seen["block_k"] == 128


@pytest.mark.parametrize("impl", ["reference", "pallas"])
def test_dispatcher_kv_rows_equal_the_selected_rows(impl):
    # meta.kv_rows: query row b reads cache row kv_rows[b] of a larger cache (a server's max_batch rows).
    # The same call on a copy of those rows gives the same floats: identical, because every path here
    # (the reference; pallas on the CPU, which copies the rows for the Triton kernel) computes on the
    # very values of the copy.
    q, k, v = _inputs(11, 1, 21)
    _, k_all, v_all = _inputs(12, 3, 1)
    k_all = k_all.at[1].set(k[0])
    v_all = v_all.at[1].set(v[0])
    meta = dispatcher.AttentionMeta.of([40], [61], DCA)
    want = dispatcher.attention_lse(q, k, v, meta, impl=impl)
    got = dispatcher.attention_lse(q, k_all, v_all, meta.replace(kv_rows=jnp.asarray([1], jnp.int32)), impl=impl)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mosaic_prefill_gets_the_whole_cache_and_its_rows(monkeypatch):
    # The Mosaic path (Hopper only: its kernel replaced by a recorder here) receives the [R, S, K, H] cache
    # itself and kv_rows, not a sliced copy of the row.
    from zenjax.attention import pallas as pallas_impl
    import pallas_kernels.dca_prefill_mgpu as mg
    seen = {}

    def fake(q, k, v, q_start, kv_len, **kw):
        seen.update(k_rows=k.shape[0], kv_rows=kw.get("kv_rows"))
        return jnp.zeros(q.shape[1:], q.dtype), jnp.zeros(q.shape[1:4], jnp.float32)
    monkeypatch.setattr(pallas_impl, "_use_mgpu", lambda q, interpret: True)
    monkeypatch.setattr(mg, "dca_prefill_mgpu", fake)
    monkeypatch.setattr("pallas_kernels.dca_decode.device_num_sms", lambda: 132)
    q = jax.ShapeDtypeStruct((3, 1, 256, 28, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((4, 4096, 4, 128), jnp.bfloat16)
    dca = DCAConfig(chunk_size=262144, local_size=8192, original_max_position_embeddings=32768)
    meta = dispatcher.AttentionMeta.of([0], [4096], dca, kv_rows=[2])
    jax.eval_shape(lambda q, k, v: dispatcher.attention_lse(q, k, v, meta, impl="pallas"), q, kv, kv)
    assert seen["k_rows"] == 4 and seen["kv_rows"].shape == (1,)
