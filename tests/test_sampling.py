"""The on-device sampler against Hugging Face's logits processors (fixture from
scripts/make_sampling_fixtures.py), plus SamplingParams validation and seeded reproducibility."""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zenjax.sampling import (NEG_INF, SamplerState, SamplingError, SamplingParams, apply_repetition_penalty,
                             filter_logits, sample, slot_values)

FIX = np.load(Path(__file__).parent / "fixtures" / "sampling" / "hf_warpers.npz")


@pytest.mark.parametrize("case", range(len(FIX["cases"])))
def test_filtering_matches_hf(case):
    t, k, p, m, r = FIX["cases"][case]
    logits, prompt = FIX["logits"], FIX["prompt"]
    B, V = logits.shape
    seen = np.zeros((B, V), bool)
    for b in range(B):
        seen[b, prompt[b]] = True
    full = lambda v, dt=jnp.float32: jnp.full((B,), v, dt)
    x = apply_repetition_penalty(jnp.asarray(logits), jnp.asarray(seen), full(r))
    x = np.asarray(filter_logits(x, full(t), full(int(k), jnp.int32), full(p), full(m)))
    ref = FIX[f"scores_{case}"]
    kept_ref, kept = np.isfinite(ref), x > NEG_INF / 2
    np.testing.assert_array_equal(kept, kept_ref)           # exactly the same tokens survive
    np.testing.assert_allclose(x[kept], ref[kept_ref], rtol=1e-6, atol=1e-6)   # float32 rounding only


def _state(params_list, vocab):
    rows = [slot_values(p, [1, 2, 3], vocab, p.seed or 0) for p in params_list]
    return SamplerState(**{k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]})


def test_greedy_is_argmax_and_seeded_sampling_reproducible():
    sample_j = jax.jit(sample)      # eager lax.cond would recompile its branches on every call
    V = 64
    row = jax.random.normal(jax.random.key(0), (V,)) * 2
    logits = jnp.stack([row, row, row])
    greedy = SamplingParams(temperature=0.0)
    hot = SamplingParams(temperature=1.0, top_k=10, seed=7)
    st = _state([greedy, hot, hot], V)
    tok1, st1 = sample_j(logits, st)
    assert int(tok1[0]) == int(jnp.argmax(apply_repetition_penalty(logits, st.seen, st.rep_penalty)[0]))
    assert int(tok1[1]) == int(tok1[2])                         # same seed, same logits -> same draw
    tok2, _ = sample_j(logits, _state([greedy, hot, hot], V))
    np.testing.assert_array_equal(np.asarray(tok1), np.asarray(tok2))
    assert bool(st1.seen[1, int(tok1[1])])                      # generated tokens join the penalty set
    # the key advances: 20 draws from the same logits are not all equal
    draws, s = [], st
    for _ in range(20):
        t, s = sample_j(logits, s)
        draws.append(int(t[1]))
    assert len(set(draws)) > 1


@pytest.mark.parametrize("field,value", [("max_new_tokens", 0), ("temperature", -1.0), ("top_k", -2),
                                         ("top_p", 0.0), ("top_p", 1.5), ("min_p", 2.0),
                                         ("repetition_penalty", 0.0), ("temperature", float("nan"))])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(SamplingError, match=field):
        SamplingParams(**{field: value})
