"""One device call for a prefill piece and a decode step (runner.prefill_decode, engine.prefill_and_decode),
on the tiny random model with Qwen's 7B head layout (28 q / 4 kv heads), DCA on, float32.

The reference is the two calls one after the other (engine.prefill_next, then engine.decode_steps(., 1)):
the fused call must give the same tokens (greedy with a penalty, seeded top-k and top-p), the same first
token after the prompt, and the same cache. Only rounding may differ: the fused call multiplies the
piece's rows and the decode rows in one matmul ([1, 16 + 3, D] instead of [1, 16, D] and [3, 1, D]), and a
backend may sum a row's inner product in another order for another row count. Error model: every value
is the same float32 function of the same inputs up to reassociation of sums of length <= 224 (the model
width), about 224 * 2**-24 = 1.3e-5 relative per product; through two layers and the residual adds the
cache and logits stay within RTOL = 1e-4 relative to their scale (and the tokens, which depend on them
through argmax / seeded draws with no near-ties at this scale, are equal).
"""
import dataclasses

import numpy as np
import pytest

from zenjax.config import engine_config
from zenjax.engine import Engine
from zenjax.sampling import SamplingParams
from tests.test_decode_block import CFG, IDS, PARAMS, make

RTOL = 1e-4          # see the module docstring: float32 reassociation through a 2-layer model

DECODERS = {0: (IDS[:5], dict(max_new_tokens=12, repetition_penalty=1.3)),
            2: (IDS[10:50], dict(max_new_tokens=12, temperature=0.8, top_k=20, seed=11))}
LONG = (IDS[20:90], dict(max_new_tokens=6, temperature=1.1, top_p=0.9, min_p=0.05, seed=5))   # 70 tokens
PIECE = 13           # pieces that do not fill the 16-row bucket; 70 = 5 x 13 + 5, crossing DCA chunk s = 24


def run(fused: bool):
    """Slots 0 and 2 decode while slot 1 prefills LONG in pieces of PIECE tokens; each piece goes with one
    decode step of the decoders, fused into one call or as two calls. Then everything decodes to the end."""
    eng = make(chunk=16, max_batch=3, max_len=160)
    seqs = {}
    for slot, (ids, kw) in DECODERS.items():
        seqs[slot] = eng.start(slot, ids, SamplingParams(**kw))
        tok = None
        while tok is None:
            tok = eng.prefill_next(slot)
        seqs[slot].append(tok)
    seqs[1] = eng.start(1, LONG[0], SamplingParams(**LONG[1]))
    first = None
    while first is None:
        decoding = [s for s in DECODERS if seqs[s].finish_reason is None]
        if fused:
            first, got = eng.prefill_and_decode(1, decoding, PIECE)
        else:
            first = eng.prefill_next(1, PIECE)
            got = eng.decode_steps(decoding, 1)
        for s in decoding:
            assert len(got[s]) == 1
            seqs[s].append(got[s][0])
    seqs[1].append(first)
    running = [s for s in seqs if seqs[s].finish_reason is None]
    while running:
        got = eng.decode_steps(running, 4)
        for s in running:
            for t in got[s]:
                if seqs[s].append(t)[1] is not None:
                    break
        running = [s for s in running if seqs[s].finish_reason is None]
    tokens = {s: q.output_ids for s, q in seqs.items()}
    cache = [np.asarray(a) for a in eng.runner.cache.k + eng.runner.cache.v]
    return tokens, cache, eng


def test_fused_piece_and_decode_step_equal_the_two_calls():
    sep_tokens, sep_cache, _ = run(fused=False)
    fused_tokens, fused_cache, eng = run(fused=True)
    assert fused_tokens == sep_tokens
    assert all(len(t) == 12 for s, t in sep_tokens.items() if s in DECODERS) and len(sep_tokens[1]) == 6
    for a, b in zip(sep_cache, fused_cache):
        np.testing.assert_allclose(b, a, rtol=0, atol=RTOL * np.abs(a).max())     # tolerance: module docstring
    # one compiled fused step (bucket 16), no recompile per call
    assert eng.trace_counts["prefill_decode"] == 1
    assert eng.compiled_shapes()["prefill_decode"] == (((1, 16), (3, 1)),)


def test_fused_call_refuses_a_slot_that_is_not_decoding_and_changes_nothing():
    eng = make(chunk=16, max_batch=3, max_len=160)
    eng.start(0, IDS[:5], SamplingParams(max_new_tokens=4))
    eng.start(1, IDS[:30], SamplingParams(max_new_tokens=4))
    with pytest.raises(ValueError, match="slot 0 has not finished prefill"):
        eng.prefill_and_decode(1, [0], PIECE)
    with pytest.raises(ValueError, match="slot 1 is prefilling"):
        eng.prefill_and_decode(1, [1], PIECE)
    assert eng.slot_state(1).prefilled == 0 and eng.slot_state(0).prefilled == 0
    assert eng.trace_counts["prefill_decode"] == 0


def test_warmup_compiles_the_fused_step_for_every_bucket():
    ec = engine_config(max_model_len=600, prefill_chunk=512, max_batch=2, attention="reference", dtype="float32")
    eng = Engine(dataclasses.replace(CFG, dca=None), PARAMS, ec, verbose=False)   # no DCA cap on the pieces
    eng.warmup()
    assert eng.prefill_buckets == (256, 512)
    assert eng.trace_counts["prefill_decode"] == 2
    traced = dict(eng.trace_counts)
    eng.start(1, IDS[:5], SamplingParams(max_new_tokens=3, ignore_eos=True))
    while eng.prefill_next(1) is None:
        pass
    eng.start(0, IDS * 3, SamplingParams(max_new_tokens=2))          # 300 tokens: buckets 256 then 256
    while eng.prefill_and_decode(0, [1], 256)[0] is None:
        pass
    assert dict(eng.trace_counts) == traced                          # nothing compiled after warmup
