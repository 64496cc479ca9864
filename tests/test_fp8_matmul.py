"""The Pallas fp8 weight matmul (pallas_kernels/fp8_matmul.py) in interpret mode, and the `linear` seam
routing decode-sized fp8 matmuls through it.

Error model: float32 operands in interpret mode, so kernel and reference differ only by the order of the
Kd-term sums (split partials, tile partials): |diff| <= 2 * Kd * eps32 * sum_k |x_k| |w_k| per output
(eps32 = 2^-24 unit roundoff, x2 for the partial sums' own rounding), computed per case below.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.fp8_matmul import default_splits, fp8_matmul, fp8_matmul_reference, supported
from zenjax import layers
from zenjax.fp8 import Fp8Weight

EPS32 = 2.0 ** -24


def _w8(key, shape_in, shape_out):
    w = jax.random.normal(key, shape_in + shape_out, jnp.float32)
    axes = tuple(range(len(shape_in)))
    scale = jnp.max(jnp.abs(w), axis=axes) / 448.0
    return (w / scale).astype(jnp.float8_e4m3fn), scale


def _bound(x, w8, scale):
    mag = (jnp.abs(x.astype(jnp.float32)) @ jnp.abs(w8.astype(jnp.float32))) * scale[None, :]
    return 2 * x.shape[1] * EPS32 * mag + 1e-30


@pytest.mark.parametrize("M, Kd, Nd, splits", [(1, 256, 384, None), (7, 384, 128, 2), (16, 128, 256, 3)])
def test_kernel_equals_reference(M, Kd, Nd, splits):
    k1, k2 = jax.random.split(jax.random.key(M + Kd))
    x = jax.random.normal(k1, (M, Kd), jnp.float32)
    w8, scale = _w8(k2, (Kd,), (Nd,))
    got = fp8_matmul(x, w8, scale, splits=splits, interpret=True)            # splits=3 over 1 tile: 2 empty
    want = fp8_matmul_reference(x, w8, scale)
    assert got.shape == (M, Nd) and got.dtype == x.dtype
    assert bool(jnp.all(jnp.abs(got - want) <= _bound(x, w8, scale)))
    # the scale matters: a kernel that dropped it would be off by ~1/scale
    assert float(jnp.abs(got - x @ w8.astype(jnp.float32)).max()) > 1.0


def test_split_heuristic_and_refusals():
    assert default_splits(3584, 3584) == 10 and default_splits(3584, 152064) == 1
    assert default_splits(128, 128) == 1                                     # never more than the key tiles
    assert supported(8, 3584, 18944) and not supported(17, 3584, 512) and not supported(1, 100, 128)
    x, (w8, s) = jnp.ones((2, 128)), _w8(jax.random.key(0), (128,), (128,))
    with pytest.raises(ValueError, match="rows"):
        fp8_matmul(jnp.ones((17, 128)), w8, s, interpret=True)
    with pytest.raises(ValueError, match="whole number"):
        fp8_matmul(jnp.ones((2, 100)), w8[:100], s, interpret=True)
    with pytest.raises(ValueError, match="e4m3"):
        fp8_matmul(x, w8.astype(jnp.float32), s, interpret=True)


@pytest.mark.parametrize("eq, xshape, win, wout", [
    ("btd,dnh->btnh", (1, 1, 128), (128,), (28, 32)),         # wq at Qwen's 28 heads (head dim 32 here)
    ("btd,dkh->btkh", (2, 1, 128), (128,), (4, 32)),           # wk: 4 kv heads
    ("btnh,nhd->btd", (1, 1, 28, 32), (28, 32), (128,)),       # wo: two contracted dims
    ("...d,df->...f", (3, 1, 256), (256,), (384,)),            # w_gate / w_up, ellipsis
])
def test_linear_routes_decode_matmuls_through_the_kernel(eq, xshape, win, wout, monkeypatch):
    k1, k2 = jax.random.split(jax.random.key(len(eq)))
    x = jax.random.normal(k1, xshape, jnp.float32)
    w8, scale = _w8(k2, win, wout)
    w = Fp8Weight(values=w8, scale=scale)
    calls = []
    import pallas_kernels.fp8_matmul as mod
    real = mod.fp8_matmul
    monkeypatch.setattr(mod, "fp8_matmul", lambda *a, **k: calls.append(1) or real(*a, interpret=True, **k))
    monkeypatch.setattr(layers, "FP8_MATMUL", "kernel")
    got = layers.linear(eq, x, w)
    monkeypatch.setattr(layers, "FP8_MATMUL", "xla")
    want = layers.linear(eq, x, w)
    assert calls == [1] and got.shape == want.shape
    Kd = int(np.prod(win))
    xf, wf = x.reshape(-1, Kd), w8.reshape(Kd, -1)
    assert bool(jnp.all(jnp.abs(got - want).reshape(xf.shape[0], -1) <= _bound(xf, wf, scale.reshape(-1))))


def test_linear_keeps_prefill_sized_and_unmatched_shapes_on_xla(monkeypatch):
    monkeypatch.setattr(layers, "FP8_MATMUL", "kernel")
    w8, scale = _w8(jax.random.key(1), (128,), (128,))
    w = Fp8Weight(values=w8, scale=scale)
    assert layers._fp8_kernel_linear("btd,df->btf", jnp.ones((1, 32, 128)), w, None) is None   # 32 rows
    assert layers._fp8_kernel_linear("md,d->m", jnp.ones((2, 128)), Fp8Weight(w8[:, 0], scale[:1]), None) is None
    assert layers._flat_matmul_dims("...d,vd->...v", 2, 2) is None                             # w [out, in]
