"""Engine behaviour on tiny random models with Qwen's 7B head layout (28 q / 4 kv heads, group 7):
chunked prefill == one-shot, DCA through chunked prefill == one-shot, DCA == plain RoPE within the
chunk size, slot isolation, bounded compilation, and prompt errors."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zenjax.config import DCAConfig, ModelConfig, engine_config
from zenjax.engine import Engine, PromptError
from zenjax.model import init_params
from zenjax.sampling import SamplingParams

CFG = ModelConfig(vocab_size=300, hidden_size=224, intermediate_size=64, num_layers=2, num_heads=28,
                  num_kv_heads=4, head_dim=8, rope_theta=1e4, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  max_position_embeddings=4096)
DCA = DCAConfig(chunk_size=32, local_size=8, original_max_position_embeddings=32)   # s = 24
PARAMS = init_params(CFG, jax.random.key(0), jnp.float32, scale=0.2)
IDS = [int(t) for t in np.random.RandomState(0).randint(0, 300, 100)]


def make(chunk, cfg=CFG, max_batch=2, max_len=160, params=None):
    ec = engine_config(max_model_len=max_len, prefill_chunk=chunk, max_batch=max_batch,
                       attention="reference", dtype="float32")
    return Engine(cfg, PARAMS if params is None else params, ec, verbose=False)


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


U32 = 2.0 ** -24      # float32 unit roundoff


def rounding_bound(params, logits, cfg=CFG, extra_terms: float = 0.0) -> float:
    """Worst-case relative difference (max |a - b| / max |logits|) between two float32 evaluations of the
    same logits that differ only in rounding (summation order, rotation angles).

    Error model: a float32 dot product of n terms carries |error| <= n u sum_i |x_i w_i| (Higham, Accuracy
    and Stability of Numerical Algorithms, eq. 3.5, u = 2^-24). The longest reductions in the network have
    n = max(D, N*H, F) = 224 terms; `extra_terms` adds other error sources counted in units of u (e.g.
    rotation angles). The relative error of a logit is then amplified by the cancellation factor
    A = max_v sum_d |x_d W[v, d]| / max |logits| <= sqrt(D) max_v ||W[v]|| / max |logits| (Cauchy-Schwarz;
    after the final RMSNorm with unit weights ||x|| = sqrt(D)). Each side of the comparison carries its own
    rounding, hence the 2. For this model (weights scale 0.2): A ~ 4, bound ~ 2 * 224 * 6e-8 * 4 = 1.1e-4;
    observed differences are 5e-6..1.2e-5 over seeds and chunk sizes, and a real DCA error (a 0.3%
    temperature error, see below) gives 1e-3 or more."""
    n = max(cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.intermediate_size)
    w = np.asarray(params["lm_head"])                                             # [V, D]
    A = np.sqrt(cfg.hidden_size) * np.linalg.norm(w, axis=-1).max() / np.abs(logits).max()
    return 2 * (n + extra_terms) * U32 * A


def test_prefill_plan_never_crosses_dca_boundaries():
    e = make(8, dataclasses.replace(CFG, dca=DCAConfig(14, 2, 14)))           # s = 12
    assert e.prefill_plan(30) == [(0, 8), (8, 12), (12, 20), (20, 24), (24, 30)]
    assert make(8).prefill_plan(17) == [(0, 8), (8, 16), (16, 17)]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dca", [None, DCA], ids=["plain", "dca"])
def test_chunked_prefill_equals_one_shot(dca, seed):
    cfg = dataclasses.replace(CFG, dca=dca)
    params = PARAMS if seed == 0 else init_params(CFG, jax.random.key(seed), jnp.float32, scale=0.2)
    ids = [int(t) for t in np.random.RandomState(seed).randint(0, 300, 100)]
    one = make(128, cfg, params=params).logits(ids)
    tol = rounding_bound(params, one)
    for chunk in (7, 20, 25):      # does not divide 100; 20 divides it; 25 straddles DCA boundaries (s=24)
        got = make(chunk, cfg, params=params).logits(ids)
        assert rel(got, one) <= tol, (chunk, rel(got, one), tol)    # float32: only summation order differs
    if dca is not None:
        # the bound is tight enough to see a real DCA error: L0 32 -> 33 changes m(100) by 0.3%
        off = make(128, dataclasses.replace(cfg, dca=dataclasses.replace(DCA, original_max_position_embeddings=33)),
                   params=params).logits(ids)
        assert rel(off, one) > 5 * tol


def test_dca_generation_chunked_equals_one_shot():
    cfg = dataclasses.replace(CFG, dca=DCA)
    p = SamplingParams(max_new_tokens=20)
    a = make(128, cfg).generate(IDS, p).token_ids
    b = make(7, cfg).generate(IDS, p).token_ids
    assert a == b and len(a) == 20


def test_dca_equals_plain_rope_within_chunk_size():
    # L <= chunk_size: no key is two chunks back and succ positions equal true distances (spec 2.2);
    # the temperature is 1 because L <= original_max_position_embeddings.
    short = IDS[:32]
    a = make(128, dataclasses.replace(CFG, dca=DCA)).logits(short)
    b = make(128).logits(short)
    # float32 rounding of different absolute rotation angles on top of summation order: an angle
    # theta = p * inv_freq (|theta| <= 31 here) is rounded to u |theta|, which moves cos/sin by as much,
    # for q and for k: 2 * 31 more units of u in the bound.
    assert rel(a, b) <= rounding_bound(PARAMS, b, extra_terms=2 * 31)
    # ... and beyond it they really differ (the test above is not vacuous)
    assert rel(make(128, dataclasses.replace(CFG, dca=DCA)).logits(IDS), make(128).logits(IDS)) > 1e-2


def test_slots_are_isolated_and_compile_once():
    e = make(16, max_batch=3)
    p = SamplingParams(max_new_tokens=6)
    alone = [make(16, max_batch=1).generate(IDS[:n], p).token_ids for n in (5, 40)]
    s0, s2 = e.start(0, IDS[:5], p), e.start(2, IDS[:40], p)
    firsts = {}
    for slot, seq in ((0, s0), (2, s2)):
        tok = None
        while tok is None:
            tok = e.prefill_next(slot)
        firsts[slot] = [tok]
    for _ in range(5):
        a, b = e.decode([0, 2])
        firsts[0].append(a)
        firsts[2].append(b)
    assert firsts[0] == alone[0] and firsts[2] == alone[1]
    # prompts of 5 and 40 tokens and 5 decode steps: one compiled prefill shape, one decode shape
    assert e.trace_counts["prefill"] == 1 and e.trace_counts["decode"] == 1


def test_prompt_errors_name_the_problem():
    e = make(16)
    with pytest.raises(PromptError, match="zero tokens|empty"):
        e.encode_prompt([])
    with pytest.raises(PromptError, match="outside"):
        e.encode_prompt([1, 2, 300])
    with pytest.raises(PromptError, match="max_model_len"):
        e.encode_prompt([1] * 160)
    with pytest.raises(PromptError, match="tokenizer"):
        e.encode_prompt("hello")
    with pytest.raises(ValueError, match="in use"):
        e.start(0, [1, 2], SamplingParams())
        e.start(0, [1, 2], SamplingParams())


def test_auto_attention_picks_the_measured_fastest_path():
    from zenjax.config import ConfigError, resolve_attention
    assert resolve_attention("auto", "cpu") == "reference"
    assert resolve_attention("auto", "gpu", "NVIDIA H100 80GB HBM3") == "pallas"     # Mosaic GPU kernels
    assert resolve_attention("auto", "gpu", "NVIDIA H200") == "pallas"
    assert resolve_attention("auto", "gpu", "NVIDIA A100-SXM4-80GB") == "cudnn"     # no wgmma: cuDNN
    assert resolve_attention("cudnn", "gpu", "NVIDIA H100 80GB HBM3") == "cudnn"     # explicit wins
    with pytest.raises(ConfigError, match="attention='flash'"):
        resolve_attention("flash", "gpu")


def test_cache_is_rounded_to_the_kernel_tile_but_the_limit_is_max_model_len():
    """max_model_len 160 -> 256 cache slots (the Hopper prefill kernel's 128-key tiles, no per-step pad);
    the limit users see stays 160 and a sequence that fills it still generates correctly."""
    e = make(64, max_batch=1)
    assert e.cache_len == 256 and e._cache.k[0].shape[1] == 256
    with pytest.raises(PromptError, match="max_model_len"):
        e.encode_prompt([1] * 160)
    ids = IDS + IDS[:55]                                      # 155 tokens: 4 decode steps reach 159
    out = e.generate(ids, SamplingParams(max_new_tokens=10, ignore_eos=True))
    assert out.finish_reason == "length" and len(out.token_ids) == 160 - len(ids)
    ref = make(64, max_batch=1, max_len=256)                 # cache already aligned: same tokens
    assert ref.generate(ids, SamplingParams(max_new_tokens=5, ignore_eos=True)).token_ids == out.token_ids
