"""The split-K decode kernel reading an e4m3 cache and its float32 scales directly (interpret mode, CPU).

Error model: the kernel applies the per-key scales to the scores and probabilities ((q . x8) * s_k and
p * s_v, `_flash_dca.Fp8Ref`) where the dequantized cache applies them to the values (q . (x8 * s_k));
in float32 (interpret mode keeps q's float32) the two differ by reassociation only: a few ulps of each
logit (|logit| <~ 30 here -> ~1e-5 absolute) and of each output, so max |diff| <= 2e-5 (as
tests/test_pallas_kernels.py). Qwen's head layout (28 q / 4 kv), DCA s = 48 with keys in chunks 0..5,
and contexts that do not fill a key tile. The Triton prefill kernel shares the tile code and is checked
the same way (several query rows per program, rows straddling a DCA chunk).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.dca_decode import dca_decode
from pallas_kernels.dca_prefill import dca_prefill
from zenjax.config import DCAConfig
from zenjax.model import FP8, dequantize_fp8, quantize_fp8

N, K, H = 28, 4, 16
DCA = DCAConfig(chunk_size=64, local_size=16, original_max_position_embeddings=64)      # s = 48
S = 6 * 48 + 48                        # a multiple of the 16-key block (the engine's cache always is)


# (kernel, q [.., B, T, N, H] shape, q_start, its keyword arguments): decode reads T = 1 query per row at
# chunks 0, 2 and 6; prefill 21 rows (not a whole 16-row query tile) that straddle s = 48 (rows 40..60)
KERNELS = {
    "decode": (dca_decode, (3, 1), [7, 100, 290], dict(block_k=16, num_splits=3)),
    "prefill": (dca_prefill, (2, 21), [40, 130], dict(block_q=16, block_k=16)),
}


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("dca", [True, False], ids=["dca", "plain"])
def test_fp8_kernel_equals_kernel_on_dequantized_cache(kernel, dca):
    fn, (B, T), starts, kw = KERNELS[kernel]
    k1, k2, k3 = jax.random.split(jax.random.key(7 + T), 3)
    q = jax.random.normal(k1, ((3,) if dca else ()) + (B, T, N, H), jnp.float32)
    (k8, ks), (v8, vs) = (quantize_fp8(3.0 * jax.random.normal(kk, (B, S, K, H), jnp.float32)) for kk in (k2, k3))
    assert k8.dtype == FP8 and ks.shape == (B, S, K)
    q_start = jnp.array(starts, jnp.int32)
    kv_len = q_start + T
    kw = dict(kw, chunk_len=DCA.chunk_len if dca else None, interpret=True)
    got, lse = fn(q, k8, v8, q_start, kv_len, k_scale=ks, v_scale=vs, **kw)
    ref, ref_lse = fn(q, dequantize_fp8(k8, ks, jnp.float32), dequantize_fp8(v8, vs, jnp.float32),
                      q_start, kv_len, **kw)
    assert float(jnp.abs(got - ref).max()) <= 2e-5 and float(jnp.abs(lse - ref_lse).max()) <= 2e-5
    # the scales matter (a kernel that ignored them would be far off)
    raw, _ = fn(q, k8.astype(jnp.float32), v8.astype(jnp.float32), q_start, kv_len, **kw)
    assert float(jnp.abs(raw - ref).max()) > 1e-1


def test_fp8_decode_kernel_refuses_bad_scales():
    q = jnp.zeros((1, 1, N, H), jnp.float32)
    k8 = jnp.zeros((1, S, K, H), FP8)
    with pytest.raises(ValueError, match="both"):
        dca_decode(q, k8, k8, jnp.zeros((1,), jnp.int32), jnp.ones((1,), jnp.int32),
                   k_scale=jnp.ones((1, S, K)), interpret=True, block_k=16)
    with pytest.raises(ValueError, match=r"\[B, S, K\]"):
        dca_decode(q, k8, k8, jnp.zeros((1,), jnp.int32), jnp.ones((1,), jnp.int32),
                   k_scale=jnp.ones((1, S)), v_scale=jnp.ones((1, S)), interpret=True, block_k=16)


def test_fp8_engine_pallas_decode_matches_reference_path():
    """The engine with an e4m3 cache: pallas (the decode kernel reads e4m3 + scales; prefill dequantizes) against the reference path (dequantized cache everywhere), float32 model. Same
    values enter attention on both paths, so greedy tokens must agree exactly: the token margins of this
    random model (~1e-1) dwarf float32 reassociation (~1e-6)."""
    import dataclasses
    from zenjax.config import ModelConfig, engine_config
    from zenjax.engine import Engine
    from zenjax.model import init_params
    from zenjax.sampling import SamplingParams
    cfg = ModelConfig(vocab_size=300, hidden_size=224, intermediate_size=64, num_layers=2, num_heads=28,
                      num_kv_heads=4, head_dim=16, rope_theta=1e4, rms_norm_eps=1e-6,
                      tie_word_embeddings=False, max_position_embeddings=4096)
    params = init_params(cfg, jax.random.key(0), jnp.float32, scale=0.2)
    ids = [int(t) for t in np.random.RandomState(3).randint(0, 300, 37)]
    out = {}
    for impl in ("reference", "pallas"):
        ec = engine_config(max_model_len=100, prefill_chunk=32, max_batch=1, attention=impl, dtype="float32",
                           cache_dtype="float8_e4m3fn")
        e = Engine(cfg, params, ec, verbose=False)
        assert e.runner.cache.k[0].dtype == FP8
        out[impl] = e.generate(ids, SamplingParams(max_new_tokens=10, ignore_eos=True)).token_ids
    assert out["pallas"] == out["reference"] and len(out["pallas"]) == 10
