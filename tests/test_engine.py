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


def make(chunk, cfg=CFG, max_batch=2, max_len=160):
    ec = engine_config(max_model_len=max_len, prefill_chunk=chunk, max_batch=max_batch,
                       attention="reference", dtype="float32")
    return Engine(cfg, PARAMS, ec, verbose=False)


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_prefill_plan_never_crosses_dca_boundaries():
    e = make(8, dataclasses.replace(CFG, dca=DCAConfig(14, 2, 14)))           # s = 12
    assert e.prefill_plan(30) == [(0, 8), (8, 12), (12, 20), (20, 24), (24, 30)]
    assert make(8).prefill_plan(17) == [(0, 8), (8, 16), (16, 17)]


@pytest.mark.parametrize("dca", [None, DCA], ids=["plain", "dca"])
def test_chunked_prefill_equals_one_shot(dca):
    cfg = dataclasses.replace(CFG, dca=dca)
    one = make(128, cfg).logits(IDS)
    for chunk in (7, 20, 25):      # does not divide 100; 20 divides it; 25 straddles DCA boundaries (s=24)
        got = make(chunk, cfg).logits(IDS)
        assert rel(got, one) < 1e-5, chunk     # float32: only summation order differs


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
    assert rel(a, b) < 1e-5                    # float32 rounding of different absolute rotation angles
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
