"""DCA positions and the reference attention against a brute-force relative-position oracle.

Tiny DCA config of the spec's suggested tests: chunk_size c=64, local_size w=16 -> s=48; Qwen's head
layout 28 q / 4 kv heads; head_dim 16; float32. The oracle (zenjax.dca.dca_oracle_attention) builds the
Delta matrix of spec 2.2 and rotates by relative distance; the reference rotates q three ways and k once
(zenjax.dca.dca_positions) and selects per region. They are independent routes to the same numbers.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zenjax.attention import reference_attention_lse
from zenjax.config import DCAConfig
from zenjax.dca import dca_oracle_attention, dca_positions, delta_matrix, rotate_for_dca
from zenjax.rope import apply_rope as rope

DCA = DCAConfig(chunk_size=64, local_size=16, original_max_position_embeddings=64)   # s = 48
THETA = 10000.0
N, K, H = 28, 4, 16
TOL = 1e-5   # max |reference (float32) - oracle (float64)|, output and lse


def test_delta_matrix_worked_example():
    """Spec 2.2 table, "code (vLLM)" column: c=8, w=3 (s=5), L=15."""
    dca = DCAConfig(chunk_size=8, local_size=3, original_max_position_embeddings=8)
    expected = {
        7: [7, 6, 5, 4, 3, 2, 1, 0],
        8: [8, 7, 6, 5, 4, 3, 2, 1, 0],
        9: [8, 7, 6, 5, 4, 4, 3, 2, 1, 0],
        12: [8, 7, 6, 5, 4, 7, 6, 5, 4, 3, 2, 1, 0],
        14: [8, 7, 6, 5, 4, 8, 7, 6, 5, 4, 4, 3, 2, 1, 0],
    }
    delta = delta_matrix(np.arange(15), np.arange(15), dca)
    for p, row in expected.items():
        assert delta[p, :p + 1].tolist() == row, p


def test_delta_from_positions_matches_delta_matrix():
    """The three rotated query positions minus the key position, picked per region, give Delta."""
    L = 5 * DCA.chunk_len + 7
    pos = np.arange(L)
    key, intra, succ, inter = (np.asarray(a) for a in dca_positions(jnp.asarray(pos), DCA))
    assert all(np.asarray(a).dtype == np.int32 for a in (key, intra, succ, inter))
    s = DCA.chunk_len
    d = pos[:, None] // s - pos[None, :] // s
    q = np.where(d == 0, intra[:, None], np.where(d == 1, succ[:, None], inter[:, None]))
    np.testing.assert_array_equal(np.tril(q - key[None, :]), np.tril(delta_matrix(pos, pos, DCA)))
    # Spot values (s=48, c=64): the succ cap and the constant inter position.
    assert (key[50], succ[50], inter[50]) == (2, 50, 64)
    assert (succ[60], succ[63], succ[70]) == (60, 63, 64)


def test_delta_is_plain_within_chunk_size():
    """For L <= c every visible Delta equals p - j (spec 2.2), the reason DCA == RoPE there."""
    pos = np.arange(DCA.chunk_size)
    delta = delta_matrix(pos, pos, DCA)
    np.testing.assert_array_equal(np.tril(delta), np.tril(pos[:, None] - pos[None, :]))
    # ... and not beyond: at L = c + 2 (p = 65, r(p) = 17 > w) the distance to key 0 is capped at c.
    pos = np.arange(DCA.chunk_size + 2)
    assert delta_matrix(pos, pos, DCA)[-1, 0] == DCA.chunk_size


def test_rope_layout_matches_oracle_pairs():
    """The oracle assumes the neox layout: pair (x[i], x[i+H/2]) rotated by angle pos * theta^(-2i/H)."""
    x = np.random.default_rng(0).standard_normal((1, 3, 2, 8)).astype(np.float32)
    pos = np.array([[0, 5, 1000]])
    y = np.asarray(rope(jnp.asarray(x), jnp.asarray(pos), THETA))
    inv = THETA ** (-np.arange(0, 8, 2) / 8)
    for t in range(3):
        a = pos[0, t] * inv
        x1, x2 = x[0, t, :, :4], x[0, t, :, 4:]
        np.testing.assert_allclose(y[0, t, :, :4], x1 * np.cos(a) - x2 * np.sin(a), atol=1e-5)
        np.testing.assert_allclose(y[0, t, :, 4:], x2 * np.cos(a) + x1 * np.sin(a), atol=1e-5)


def _inputs(seed, B, T, S):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, N, H)).astype(np.float32)
    k = rng.standard_normal((B, S, K, H)).astype(np.float32)
    v = rng.standard_normal((B, S, K, H)).astype(np.float32)
    return q, k, v


def _reference_dca(q, k, v, q_start, kv_len, dca=DCA):
    """The dispatcher's reference, fed the way the model feeds it (three query rotations)."""
    out, lse = _reference_dca_jit(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                  jnp.asarray(q_start, jnp.int32), jnp.asarray(kv_len, jnp.int32), dca)
    return np.asarray(out), np.asarray(lse)


@functools.partial(jax.jit, static_argnums=5)   # one compile per shape instead of one per eager op
def _reference_dca_jit(q, k, v, q_start, kv_len, dca):
    B, T = q.shape[:2]
    S = k.shape[1]
    q_pos = jnp.asarray(q_start)[:, None] + jnp.arange(T)[None, :]
    k_pos = jnp.broadcast_to(jnp.arange(S)[None, :], (B, S))
    q3, k_rot = rotate_for_dca(q, k, q_pos, k_pos, dca, THETA)
    return reference_attention_lse(q3, k_rot, v, q_start=q_start, kv_len=kv_len, dca=dca)


def _valid(q_start, kv_len, T):
    """[B, T] bool: rows that are not padding."""
    return (np.asarray(q_start)[:, None] + np.arange(T)[None, :]) < np.asarray(kv_len)[:, None]


# (cached tokens, new tokens, padded T): contexts ending in DCA chunk 0, 1, 2, 5; boundary crossings.
PREFILL_CASES = [
    (0, 40, 40),      # chunk 0 only, from scratch
    (30, 10, 16),     # chunk 0, cached prefix, padded rows
    (46, 4, 4),       # 46 cached + 4 new: crosses 0 -> 1 (spec's example)
    (0, 50, 50),      # whole prompt crossing into chunk 1
    (94, 4, 8),       # crosses 1 -> 2, padded
    (30, 70, 70),     # a query chunk of 70 starting at 30: spans chunks 0, 1, 2
    (230, 20, 24),    # ends in chunk 5 (s*5 = 240)
    (100, 150, 150),  # chunks 2..5 in one query chunk
]


@pytest.mark.parametrize("cached,new,T", PREFILL_CASES)
def test_reference_equals_oracle_prefill(cached, new, T):
    S = cached + T + 5                                     # cache slots beyond kv_len hold junk keys
    q, k, v = _inputs(cached * 1000 + new, 1, T, S)
    q_start, kv_len = np.array([cached]), np.array([cached + new])
    ref_out, ref_lse = _reference_dca(q, k, v, q_start, kv_len)
    orc_out, orc_lse = dca_oracle_attention(q, k, v, q_start=q_start, kv_len=kv_len, dca=DCA, theta=THETA)
    m = _valid(q_start, kv_len, T)
    assert np.abs(ref_out - orc_out)[m].max() <= TOL
    assert np.abs(ref_lse - orc_lse)[m].max() <= TOL
    assert np.isfinite(ref_out).all()                      # padding rows finite too


@pytest.mark.parametrize("kv_lens", [(40, 48, 49), (50, 96, 97), (98, 143, 144), (250, 289, 5)])
def test_reference_equals_oracle_decode(kv_lens):
    """Decode (T=1) for three sequences at once, each in its own DCA chunk (0..6), incl. first and last
    token of a chunk (p = 47, 48, 95, 96, 143, 288)."""
    kv_len = np.array(kv_lens)
    q_start = kv_len - 1
    S = int(kv_len.max()) + 3
    q, k, v = _inputs(int(kv_len.sum()), 3, 1, S)
    ref_out, ref_lse = _reference_dca(q, k, v, q_start, kv_len)
    orc_out, orc_lse = dca_oracle_attention(q, k, v, q_start=q_start, kv_len=kv_len, dca=DCA, theta=THETA)
    assert np.abs(ref_out - orc_out).max() <= TOL
    assert np.abs(ref_lse - orc_lse).max() <= TOL


def test_oracle_dca_differs_from_plain_rope_beyond_chunk_size():
    """Guards against a vacuous oracle: at L = 5s the DCA distances change the output visibly."""
    L = 5 * DCA.chunk_len
    q, k, v = _inputs(7, 1, 8, L)
    q_start, kv_len = np.array([L - 8]), np.array([L])
    dca_out, _ = dca_oracle_attention(q, k, v, q_start=q_start, kv_len=kv_len, dca=DCA, theta=THETA)
    plain_out, _ = dca_oracle_attention(q, k, v, q_start=q_start, kv_len=kv_len, dca=None, theta=THETA)
    assert np.abs(dca_out - plain_out).max() > 1e-2


@jax.jit
def _reference_plain(q, k, v, q_start, kv_len):
    """Plain RoPE: q and k rotated with their absolute positions."""
    q_pos = q_start[:, None] + jnp.arange(q.shape[1])[None, :]
    k_rot = rope(k, jnp.arange(k.shape[1])[None, :], THETA)
    return reference_attention_lse(rope(q, q_pos, THETA), k_rot, v, q_start=q_start, kv_len=kv_len)


@pytest.mark.parametrize("cached,new", [(0, 64), (40, 24), (63, 1)])
def test_dca_equals_plain_rope_within_chunk_size(cached, new):
    """L <= c: DCA (three-way rotation, chunk-local keys) == plain RoPE attention up to float rounding.

    Tolerance 1e-5 (float32): the absolute rotation angles differ (key 50 is rotated by 2 under DCA,
    by 50 under RoPE), so results agree to rounding, not bit for bit.
    """
    T, S = new, cached + new
    q, k, v = _inputs(cached + 3, 1, T, S)
    q_start, kv_len = np.array([cached]), np.array([S])
    dca_out, dca_lse = _reference_dca(q, k, v, q_start, kv_len)
    plain_out, plain_lse = _reference_plain(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                            jnp.asarray(q_start, jnp.int32), jnp.asarray(kv_len, jnp.int32))
    assert np.abs(dca_out - np.asarray(plain_out)).max() <= 1e-5
    assert np.abs(dca_lse - np.asarray(plain_lse)).max() <= 1e-5
