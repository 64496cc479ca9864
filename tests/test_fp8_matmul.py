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

import pallas_kernels.fp8_matmul as fp8k
from pallas_kernels.fp8_matmul import default_splits, fp8_matmul, fp8_matmul_reference, supported
from zenjax import layers
from zenjax.fp8 import Fp8Weight

EPS32 = 2.0 ** -24


def _w8(key, shape_in, shape_out):
    w = jax.random.normal(key, shape_in + shape_out, jnp.float32)
    axes = tuple(range(len(shape_in)))
    scale = jnp.max(jnp.abs(w), axis=axes) / 448.0
    return (w / scale).astype(jnp.float8_e4m3fn), scale


def _out_major(w8, n_in):
    """[in..., out...] -> the stored fp8 layout [out..., in...]."""
    return jnp.transpose(w8, tuple(range(n_in, w8.ndim)) + tuple(range(n_in)))


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


@pytest.mark.parametrize("M, w_nk, fma", [(1, True, False), (3, False, True), (1, True, True), (8, True, False)])
def test_layout_and_fma_variants_equal_reference(M, w_nk, fma):
    """The [N, K] weight layout (HF's [out, in]) and the CUDA-core path compute the same product: M=3 on
    the FMA path pads to 4 rows, so a padded row leaking into the result would show."""
    Kd, Nd = 256, 384
    k1, k2 = jax.random.split(jax.random.key(M + 7 * w_nk + fma))
    x = jax.random.normal(k1, (M, Kd), jnp.float32)
    w8, scale = _w8(k2, (Kd,), (Nd,))
    got = fp8_matmul(x, w8.T if w_nk else w8, scale, w_nk=w_nk, fma=fma, splits=2, block_n=128, block_k=128,
                     interpret=True)
    assert got.shape == (M, Nd)
    assert bool(jnp.all(jnp.abs(got - fp8_matmul_reference(x, w8, scale)) <= _bound(x, w8, scale)))
    with pytest.raises(ValueError, match=r"\[N, K\]" if w_nk else r"\[K, N\]"):
        fp8_matmul(x, w8 if w_nk else w8.T, scale, w_nk=w_nk, interpret=True)     # the other layout: refused


def test_tuned_configs_load_and_pick_the_nearest_row_count(tmp_path, monkeypatch):
    import json
    monkeypatch.setattr(fp8k, "TUNED", {})
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"configs": [
        dict(rows=1, K=3584, N=512, w_nk=False, fma=True, block_k=128, block_n=64, num_warps=4, num_stages=4, splits=7),
        dict(rows=8, K=3584, N=512, w_nk=False, fma=False, block_k=256, block_n=128, num_warps=8, num_stages=4, splits=3),
        dict(rows=8, K=3584, N=512, w_nk=True, fma=False, block_k=512, block_n=64, num_warps=8, num_stages=3, splits=2)]}))
    assert fp8k.load_tuned(str(path)) == 3
    assert fp8k.config_for(1, 3584, 512)["fma"] is True
    assert fp8k.config_for(2, 3584, 512)["splits"] == 3 and fp8k.config_for(8, 3584, 512)["block_k"] == 256
    assert fp8k.config_for(8, 3584, 512, w_nk=True)["block_k"] == 512
    assert fp8k.config_for(9, 3584, 512) == {} and fp8k.config_for(1, 3584, 3584) == {}


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
    w = Fp8Weight(values=_out_major(w8, len(win)), scale=scale)
    calls = []
    import pallas_kernels.fp8_matmul as mod
    real = mod.fp8_matmul
    monkeypatch.setattr(mod, "fp8_matmul", lambda *a, **k: calls.append(k["w_nk"]) or real(*a, interpret=True, **k))
    monkeypatch.setattr(layers, "FP8_MATMUL", "kernel")
    got = layers.linear(eq, x, w)
    monkeypatch.setattr(layers, "FP8_MATMUL", "xla")
    want = layers.linear(eq, x, w)
    assert calls == [True] and got.shape == want.shape              # the kernel reads the [N, K] values
    Kd = int(np.prod(win))
    xf, wf = x.reshape(-1, Kd), w8.reshape(Kd, -1)
    assert bool(jnp.all(jnp.abs(got - want).reshape(xf.shape[0], -1) <= _bound(xf, wf, scale.reshape(-1))))


def test_linear_keeps_prefill_sized_and_unmatched_shapes_on_xla(monkeypatch):
    monkeypatch.setattr(layers, "FP8_MATMUL", "kernel")
    w8, scale = _w8(jax.random.key(1), (128,), (128,))
    w = Fp8Weight(values=w8.T, scale=scale)
    assert layers._fp8_kernel_linear("btd,df->btf", jnp.ones((1, 32, 128)), w, None) is None   # 32 rows
    assert layers._fp8_kernel_linear("md,d->m", jnp.ones((2, 128)), Fp8Weight(w8[:, 0], scale[:1]), None) is None
    assert layers._flat_matmul_dims("...d,vd->...v", 2, 2) is None                             # w [out, in]
