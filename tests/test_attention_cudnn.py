"""The cuDNN path's decomposition (partials + LSE merge) against the dispatcher's reference.

cuDNN does not run on the CPU, so these tests run the identical decomposition with XLA's attention
(`_implementation="xla"`); benchmarks/check_cudnn.py runs the real cuDNN path on a GPU. Qwen's head layout
(28 q / 4 kv heads), head_dim 16, float32; DCA config c=64, w=16 (s=48). Tolerance: max |diff| <= 2e-5 on
output and lse over valid rows (float32 reassociation of a merge of up to four partials).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zenjax.attention import cudnn as attention_cudnn
from zenjax.attention import reference_attention_lse
from zenjax.config import DCAConfig

DCA = DCAConfig(chunk_size=64, local_size=16, original_max_position_embeddings=64)   # s = 48
N, K, H = 28, 4, 16
TOL = 2e-5


def _inputs(seed, B, T, S, dca):
    """Random (already rotated) q, k, v; rotation itself is tested in test_dca_oracle.py."""
    rng = np.random.default_rng(seed)
    qshape = (3, B, T, N, H) if dca else (B, T, N, H)
    q = jnp.asarray(rng.standard_normal(qshape), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, S, K, H)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, S, K, H)), jnp.float32)
    return q, k, v


@functools.partial(jax.jit, static_argnames=("dca", "lse_dtype"))
def _both(q, k, v, q_start, kv_len, dca, lse_dtype=None):
    got = attention_cudnn.attention_lse(q, k, v, q_start=q_start, kv_len=kv_len, dca=dca,
                                        _implementation="xla", _lse_dtype=lse_dtype)
    want = reference_attention_lse(q, k, v, q_start=q_start, kv_len=kv_len, dca=dca)
    return got, want


def _check(q_start, kv_len, T, S, dca, seed=0):
    B = len(q_start)
    q, k, v = _inputs(seed, B, T, S, dca)
    qs, kl = jnp.asarray(q_start, jnp.int32), jnp.asarray(kv_len, jnp.int32)
    (out, lse), (ref_out, ref_lse) = _both(q, k, v, qs, kl, dca)
    valid = (np.asarray(q_start)[:, None] + np.arange(T)[None, :]) < np.asarray(kv_len)[:, None]
    out, lse = np.asarray(out), np.asarray(lse)
    assert np.isfinite(out).all() and not np.isnan(lse).any()        # padding rows included
    assert np.abs(out - np.asarray(ref_out))[valid].max() <= TOL
    assert np.abs(lse - np.asarray(ref_lse))[valid].max() <= TOL
    return out


# (q_start, kv_len, T, S): q_start 0 (no prefix), mid-cache, padded rows, and a chunk whose padded rows
# run past the end of the cache (q_start + T > S: the window gather must not shift the keys).
PLAIN_PREFILL = [(0, 20, 20, 40), (0, 13, 20, 40), (17, 37, 20, 40), (25, 40, 20, 40), (1, 9, 8, 9)]


@pytest.mark.parametrize("q_start,kv_len,T,S", PLAIN_PREFILL)
def test_plain_prefill(q_start, kv_len, T, S):
    _check([q_start], [kv_len], T, S, None)


# DCA prefill steps, each inside one DCA chunk n = q_start // 48 (the engine's guarantee). Most share
# T=32, S=300 so they share one compile.
DCA_PREFILL = [
    (0, 30, 32, 40),       # n = 0, S <= s: no succ/inter partials at all
    (0, 30, 32, 300),      # n = 0 in a long cache: succ/inter run but are absent (weight 0)
    (20, 48, 32, 300),     # n = 0, cached prefix, valid rows end exactly at the boundary
    (48, 60, 32, 300),     # n = 1, first row of the chunk: empty intra prefix, succ present
    (60, 92, 32, 300),     # n = 1, intra prefix [48, 60) + own + succ, no padding rows
    (100, 120, 32, 300),   # n = 2: intra prefix [96, 100), succ [48, 96), inter [0, 48)
    (250, 282, 32, 300),   # n = 5, all four partials
    (270, 280, 32, 300),   # n = 5, padded rows run past the chunk's end (288) and are ignored
    (280, 286, 32, 290),   # n = 5, q_start + T > S
]


@pytest.mark.parametrize("q_start,kv_len,T,S", DCA_PREFILL)
def test_dca_prefill(q_start, kv_len, T, S):
    _check([q_start], [kv_len], T, S, DCA, seed=q_start)


@pytest.mark.parametrize("dca", [None, DCA], ids=["plain", "dca"])
def test_decode_batch(dca):
    """B=5 decode slots in DCA chunks 0, 1 (at its first token), 2, 5, plus an idle slot (kv_len 0)
    whose output must be exactly 0, not NaN."""
    kv_len = np.array([30, 49, 100, 270, 0])
    out = _check(np.maximum(kv_len - 1, 0), kv_len, 1, 290, dca, seed=5)
    assert np.all(out[4] == 0)


def test_attention_returns_q_dtype():
    q, k, v = _inputs(2, 1, 8, 20, None)
    fn = jax.jit(functools.partial(attention_cudnn.attention, _implementation="xla"))
    out = fn(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16),
             q_start=jnp.array([4]), kv_len=jnp.array([12]))
    assert out.dtype == jnp.bfloat16 and out.shape == q.shape
    ref, _ = reference_attention_lse(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16),
                                     q_start=jnp.array([4]), kv_len=jnp.array([12]))
    # bf16 inputs; XLA's attention casts probabilities to bf16: 2e-2 absolute on O(0.5) outputs.
    assert np.abs(np.asarray(out, np.float32) - np.asarray(ref))[0, :8].max() <= 2e-2


@pytest.mark.parametrize("q_start,kv_len,T", [(0, 150, 150), (30, 100, 70)])
def test_dca_prefill_crossing_chunks_with_concrete_positions(q_start, kv_len, T):
    """A step whose rows cross DCA boundaries (a whole prompt spanning chunks 0..3; a chunk of 70 starting
    at 30) works when q_start/kv_len are concrete: it is cut at multiples of s, absent partials are
    skipped statically. (Closing over numpy constants keeps them concrete inside jit.)"""
    S = 150
    q, k, v = _inputs(11, 1, T, S, DCA)
    qs, kl = np.array([q_start], np.int32), np.array([kv_len], np.int32)

    @jax.jit
    def run(q, k, v):
        got = attention_cudnn.attention_lse(q, k, v, q_start=qs, kv_len=kl, dca=DCA, _implementation="xla")
        return got, reference_attention_lse(q, k, v, q_start=jnp.asarray(qs), kv_len=jnp.asarray(kl), dca=DCA)

    (out, lse), (ref_out, ref_lse) = run(q, k, v)
    assert np.abs(np.asarray(out) - np.asarray(ref_out)).max() <= TOL
    assert np.abs(np.asarray(lse) - np.asarray(ref_lse)).max() <= TOL


def test_dca_segments():
    assert attention_cudnn._dca_segments(np.array([30]), np.array([100]), 70, 48) == [(0, 18), (18, 66), (66, 70)]
    assert attention_cudnn._dca_segments(np.array([40]), np.array([48]), 16, 48) is None   # padding crosses
    assert attention_cudnn._dca_segments(None, None, 70, 48) is None                       # traced


def test_rejects_bad_input():
    q, k, v = _inputs(3, 2, 16, 150, DCA)
    kw = dict(_implementation="xla")
    with pytest.raises(ValueError, match="cross a DCA chunk boundary"):   # B=2, different q_start, crossing
        attention_cudnn.attention_lse(q, k, v, q_start=np.array([40, 0]), kv_len=np.array([56, 16]), dca=DCA,
                                      **kw)
    with pytest.raises(ValueError, match=r"\[3, B, T, N, H\]"):
        attention_cudnn.attention_lse(q[0], k, v, q_start=jnp.array([0, 0]), kv_len=jnp.array([16, 16]),
                                      dca=DCA, **kw)
    with pytest.raises(ValueError, match="must be \\[B\\]"):
        attention_cudnn.attention_lse(q, k, v, q_start=jnp.array([0]), kv_len=jnp.array([16, 16]), dca=DCA, **kw)
    with pytest.raises(ValueError, match="_implementation"):
        attention_cudnn.attention_lse(q, k, v, q_start=jnp.array([0, 0]), kv_len=jnp.array([16, 16]), dca=DCA,
                                      _implementation="flash")
    # Concrete inputs with every slot idle: nothing to attend to, zeros (no computation at all).
    out, lse = attention_cudnn.attention_lse(q[:, :, :1], k, v, q_start=np.array([0, 0]), kv_len=np.array([0, 0]),
                                             dca=DCA, **kw)
    assert np.all(np.asarray(out) == 0) and np.all(np.isneginf(np.asarray(lse)))


def test_bf16_lse_cost():
    """What cuDNN's public API costs the merge: it returns lse in bf16 for bf16 inputs.

    Same fp32 partials, merged once with fp32 lse and once with lse rounded to bf16, against the fp32
    reference, at a DCA step with all four partials (n = 5). Measured on CPU (seed 0): fp32-lse merge
    3.3e-7 max error; bf16-lse merge 8.3e-3, about 6x the 1.4e-3 of rounding the output itself to bf16
    (outputs are O(0.5), lse ~5 here; larger lse at long context rounds coarser). Hence the module's
    fp32-stats path.
    """
    q, k, v = _inputs(0, 1, 32, 300, DCA)
    qs, kl = jnp.array([245], jnp.int32), jnp.array([277], jnp.int32)
    (o32, _), (ref, _) = _both(q, k, v, qs, kl, DCA)
    (o16, _), _ = _both(q, k, v, qs, kl, DCA, lse_dtype=jnp.bfloat16)
    err32 = float(np.abs(np.asarray(o32) - np.asarray(ref)).max())
    err16 = float(np.abs(np.asarray(o16) - np.asarray(ref)).max())
    bf16_out = float(np.abs(np.asarray(ref.astype(jnp.bfloat16).astype(jnp.float32)) - np.asarray(ref)).max())
    print(f"merge max|err|: fp32 lse {err32:.2e}, bf16 lse {err16:.2e}; bf16 rounding of output {bf16_out:.2e}")
    assert err32 <= TOL
    assert err16 > 10 * err32          # the bf16 lse is a measurable error source, not noise
