"""Logits and greedy-generation parity with Hugging Face transformers (float32), through the whole path:
convert -> zenjax.load -> chunked prefill -> decode. References: scripts/make_hf_fixtures.py."""
import numpy as np
import pytest

import zenjax
from zenjax.sampling import SamplingParams

TOL = 1e-4          # max |delta| / max |ref| on float32 logits (the bound)


def _lengths(ref):
    return sorted(int(k.split("_")[1]) for k in ref.files if k.startswith("logits_"))


@pytest.mark.parametrize("name", ["gqa7", "mha_tied", "odd_head_dim", "deep"])
def test_logits_and_greedy_match_transformers(name, hf_fixture, converted):
    ref = np.load(hf_fixture(name) / "reference.npz")
    # prefill_chunk 16: prompts of 33 and 70 tokens go through several chunks, the last one padded
    engine = zenjax.load(converted(name), max_model_len=128, prefill_chunk=16, attention="reference",
                         dtype="float32", verbose=False)
    for T in _lengths(ref):
        got = engine.logits(ref[f"ids_{T}"].tolist())
        want = ref[f"logits_{T}"]
        assert got.shape == want.shape
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err <= TOL, (name, T, err)
    res = engine.generate(ref["greedy_prompt"].tolist(), SamplingParams(max_new_tokens=24, ignore_eos=True))
    assert res.token_ids == ref["greedy_ids"].tolist()


def test_dca_checkpoint_equals_transformers_within_chunk_size(hf_fixture, converted):
    """transformers ignores dual_chunk_attention_config (plain RoPE); for L <= chunk_size (64) DCA is
    the same function, so logits must agree; beyond it they must not (DCA is really on)."""
    ref = np.load(hf_fixture("dca") / "reference.npz")
    engine = zenjax.load(converted("dca"), max_model_len=128, prefill_chunk=16, attention="reference",
                         dtype="float32", verbose=False)
    assert engine.config.dca is not None and engine.config.dca.chunk_size == 64
    for T in _lengths(ref):
        got, want = engine.logits(ref[f"ids_{T}"].tolist()), ref[f"logits_{T}"]
        err = np.abs(got - want).max() / np.abs(want).max()
        if T <= 64:
            assert err <= TOL, (T, err)
        else:
            assert err > 1e-3, (T, err)


def test_dca_override_on_and_off(hf_fixture, converted):
    """zenjax.load(dca=False) turns the checkpoint's DCA off (then it is plain RoPE like transformers at
    every length); dca=DCAConfig(...) turns DCA on for a checkpoint that has none."""
    from zenjax.config import DCAConfig
    kw = dict(max_model_len=128, prefill_chunk=16, attention="reference", dtype="float32", verbose=False)
    ref = np.load(hf_fixture("dca") / "reference.npz")
    off = zenjax.load(converted("dca"), dca=False, **kw)
    assert off.config.dca is None
    got, want = off.logits(ref["ids_70"].tolist()), ref["logits_70"]
    assert np.abs(got - want).max() / np.abs(want).max() <= TOL
    ref = np.load(hf_fixture("gqa7") / "reference.npz")
    on = zenjax.load(converted("gqa7"), dca=DCAConfig(32, 8, 32), **kw)
    assert on.config.dca == DCAConfig(32, 8, 32)
    err = np.abs(on.logits(ref["ids_70"].tolist()) - ref["logits_70"]).max() / np.abs(ref["logits_70"]).max()
    assert err > 1e-3          # 70 tokens > chunk_size 32: DCA really changes the function
