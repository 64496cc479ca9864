"""Prefix KV reuse (Engine.start(..., reuse_min=...), sequence.reusable_prefix) on a tiny random model
with Qwen's head layout (28 q / 4 kv heads), float32, DCA on with small chunks (c = 32, w = 8 -> s = 24)
so a 60-token document spans three DCA chunks and every DCA region (intra, succ, inter) is exercised.

A reused run must equal a cold run: the same greedy tokens, and logits within the float32 rounding
bound of test_engine.rounding_bound (the two runs compute the same function; only the summation order
differs: other piece boundaries, and decode-path K/V for tokens that a cold run prefills).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from test_engine import rounding_bound, rel
from zenjax.config import DCAConfig, ModelConfig, engine_config
from zenjax.engine import Engine
from zenjax.model import init_params
from zenjax.sampling import SamplingParams
from zenjax.sequence import HeldPrefix, prefill_plan, reusable_prefix

L0 = 64        # original_max_position_embeddings: m(L) = 1 up to 64 tokens, > 1 beyond
CFG = ModelConfig(vocab_size=300, hidden_size=224, intermediate_size=64, num_layers=2, num_heads=28,
                  num_kv_heads=4, head_dim=8, rope_theta=1e4, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  max_position_embeddings=4096, dca=DCAConfig(chunk_size=32, local_size=8,
                                                              original_max_position_embeddings=L0))
PARAMS = init_params(CFG, jax.random.key(0), jnp.float32, scale=0.2)
RNG = np.random.RandomState(3)
DOC = [int(t) for t in RNG.randint(0, 300, 60)]
Q1, Q2, Q3 = ([int(t) for t in RNG.randint(0, 300, k)] for k in (3, 2, 2))
Q2[0] = (Q1[0] + 1) % 300                       # the questions differ from their first token
MIN = 8


def make(max_batch=1):
    ec = engine_config(max_model_len=160, prefill_chunk=16, max_batch=max_batch, attention="reference",
                       dtype="float32")
    return Engine(CFG, PARAMS, ec, verbose=False)


WARM, COLD = make(), make()


def run(e, ids, n=8, reuse=MIN, slot=0):
    """Greedy generation through the slot API in `slot`; returns (tokens, tokens reused)."""
    seq = e.start(slot, ids, SamplingParams(max_new_tokens=n, ignore_eos=True), reuse_min=reuse)
    reused = seq.reused
    tok = None
    while tok is None:
        tok = e.prefill_next(slot)
    out = [tok]
    e.append_token(slot, tok)
    while len(out) < n:
        got = e.decode_steps([slot], 4)[slot]
        for t in got:
            e.append_token(slot, t)
        out += got
    e.release(slot)
    return out, reused


def suffix_logits(e, ids, reuse=MIN, slot=0):
    """Start ids with reuse and return (all-row logits of the prefilled rows [r, n), r)."""
    r = e.start(slot, ids, SamplingParams(max_new_tokens=1), reuse_min=reuse).reused
    rows = [e.runner.prefill_all_logits(slot, ids, a, b)
            for a, b in prefill_plan(len(ids), 16, CFG.dca.chunk_len, r)]
    e.release(slot, keep=False)
    return np.concatenate(rows, axis=0), r


def check_equal_to_cold(prev, ids, expect_reused):
    """prev: the request that leaves its K/V in WARM's slot 0; ids: the new prompt."""
    run(WARM, prev)
    got, r = suffix_logits(WARM, ids)
    assert r == expect_reused, (r, expect_reused)
    cold = COLD.logits(ids)[r:]
    assert rel(got, cold) <= rounding_bound(PARAMS, cold), (rel(got, cold), rounding_bound(PARAMS, cold))
    run(WARM, prev)
    warm_tokens, r2 = run(WARM, ids)
    assert r2 == expect_reused
    assert warm_tokens == run(COLD, ids, reuse=0)[0]


def test_second_question_on_a_document_reuses_it_and_equals_a_cold_run():
    before = WARM.stats()["reused_prompt_tokens"]
    check_equal_to_cold(DOC + Q1, DOC + Q2, expect_reused=len(DOC))      # 62 tokens <= L0: m = 1 throughout
    assert WARM.stats()["reused_prompt_tokens"] - before == 2 * len(DOC)


def test_follow_up_turn_reuses_generated_tokens():
    # the next turn = previous prompt + its answer (K/V written by decode) + a new question, below L0
    out, _ = run(WARM, DOC[:40] + Q1)
    follow = DOC[:40] + Q1 + out[:7] + Q3                 # 52 tokens: the answer's 7 fed tokens are cached
    check_equal_to_cold(DOC[:40] + Q1, follow, expect_reused=40 + len(Q1) + 7)


def test_held_prefix_survives_another_slot_decoding():
    """Every decode step also writes a throwaway K/V at each idle slot's own first free position
    (runner.decode: the write is unconditional). A slot holding a finished turn for reuse must come
    through another slot's 16 decode steps intact: the follow-up turn still equals a cold run."""
    e = make(max_batch=2)
    out, _ = run(e, DOC[:40] + Q1, slot=0)                 # slot 0 now holds prompt + 7 fed answer tokens
    run(e, DOC[40:] + Q2, n=17, reuse=0, slot=1)           # 16 decode steps with slot 0 idle
    follow = DOC[:40] + Q1 + out[:7] + Q3
    got, r = suffix_logits(e, follow, slot=0)
    assert r == 40 + len(Q1) + 7
    cold = COLD.logits(follow)[r:]
    assert rel(got, cold) <= rounding_bound(PARAMS, cold), (rel(got, cold), rounding_bound(PARAMS, cold))


def test_no_reuse_when_the_prompt_crosses_original_max_position_embeddings(monkeypatch):
    # the held prefix was written with m = 1 (prompt 63 <= L0); the new prompt has 70 > L0 tokens, so a
    # cold run uses m(70) > 1 for every token: nothing is reusable, and the result is the cold one
    out, _ = run(WARM, DOC + Q1)
    long = DOC + Q1 + out[:5] + Q3
    assert len(long) > L0 and WARM.temperature(len(long)) > 1.0
    check_equal_to_cold(DOC + Q1, long, expect_reused=0)
    # the rule is needed: reusing that prefix anyway (temperatures ignored) is far off the cold run
    import zenjax.engine
    monkeypatch.setattr(zenjax.engine, "reusable_prefix",
                        lambda held, ids, temps, **kw: reusable_prefix(held, ids, np.ones_like(temps), **kw))
    run(WARM, DOC + Q1)
    got, r = suffix_logits(WARM, long)
    cold = COLD.logits(long)[r:]
    assert r == len(DOC + Q1) + 5 and rel(got, cold) > 10 * rounding_bound(PARAMS, cold)


def test_same_prompt_above_original_max_reuses_all_but_the_last_token():
    ids = DOC + Q1 + DOC[:10]                             # 73 > L0: m(73) for both runs
    check_equal_to_cold(ids, ids, expect_reused=len(ids) - 1)


def test_different_prefix_is_never_reused():
    run(WARM, DOC + Q1)
    other = [(t + 1) % 300 for t in DOC[:MIN]] + DOC[MIN:] + Q2     # differs in the first tokens
    assert run(WARM, other)[1] == 0
    assert WARM.reusable(0, DOC + Q1, MIN) == 0                     # slot 0 now holds `other`'s tokens
    # below the minimum: no reuse either
    run(WARM, DOC + Q1)
    assert run(WARM, DOC[: MIN - 1] + Q2 + DOC[:20], reuse=MIN)[1] == 0
    # a refused start (bad input) changes nothing, not even when the scheduler releases the slot after it
    import pytest
    run(WARM, DOC + Q1)
    with pytest.raises(ValueError, match="prompt"):
        WARM.start(0, [1] * 200, SamplingParams(), reuse_min=MIN)
    WARM.release(0)
    assert WARM.reusable(0, DOC + Q2, MIN) == len(DOC)
    # a failed or foreign write forgets the row: logits() overwrites slot 0
    run(WARM, DOC + Q1)
    WARM.logits(DOC[:20])
    assert WARM.reusable(0, DOC + Q2, MIN) == 0


def test_reuse_rule_compares_the_temperature_as_the_model_applies_it():
    """bfloat16 models apply m in bfloat16 (steps of 2^-7 near 1.1): prompts of different lengths above
    L0 share it over ~8% ranges of L, so a 1M document reused with another question qualifies."""
    L = np.arange(2_000_000, dtype=np.float64)
    m = np.maximum(1.0, 0.1 * np.log(np.maximum(L, 1) / 262_144) + 1.0).astype(np.float32)
    ids = np.arange(1_000_100, dtype=np.int32) % 1000
    held = HeldPrefix(ids[:1_000_000], 1_000_000, sparse=False)
    bf16 = m.astype(jnp.bfloat16)
    assert bf16[1_000_000] == bf16[1_000_100] and m[1_000_000] != m[1_000_100]
    assert reusable_prefix(held, ids, bf16, sparse=False, min_tokens=256) == 1_000_000
    assert reusable_prefix(held, ids, m, sparse=False, min_tokens=256) == 0          # float32: m differs
    # a bf16 step boundary between the two lengths (m = 1.13671875 at L ~ 1,028,800): no reuse
    far = np.arange(1_040_000, dtype=np.int32) % 1000
    assert bf16[1_000_000] != bf16[1_040_000]
    assert reusable_prefix(held, far, bf16, sparse=False, min_tokens=256) == 0
    # the prefix must have been prefilled the way a cold run prefills it
    assert reusable_prefix(dataclasses.replace(held, sparse=True), ids, bf16, sparse=False, min_tokens=256) == 0


def test_scheduler_reuses_through_the_real_engine():
    """The server path: the scheduler picks the slot holding the document and the stream equals a cold
    run's; a prompt that shares nothing gets the other slot and no reuse."""
    import queue

    from zenjax.serve.metrics import Metrics
    from zenjax.serve.scheduler import Delta, Finished, Request, Scheduler
    eng = make(max_batch=2)
    metrics = Metrics()
    sch = Scheduler(eng, max_queue=4, reuse_min=MIN, max_itl_ms=100, metrics=metrics)
    greedy = SamplingParams(max_new_tokens=6, ignore_eos=True)

    def serve(*prompts):
        reqs = [Request(f"r{i}", p, greedy) for i, p in enumerate(prompts)]
        for r in reqs:
            sch.submit(r)
        while not all(r.done for r in reqs):
            sch.step()
        out = []
        for r in reqs:
            evs = []
            while True:
                try:
                    evs.append(r.events.get_nowait())
                except queue.Empty:
                    break
            fin = evs[-1]
            assert isinstance(fin, Finished), evs
            out.append(([e.token_ids[0] for e in evs if isinstance(e, Delta)], fin.usage.reused_tokens, r.slot))
        return out

    serve(DOC + Q1)                                         # slot 0 holds the document
    other = [(t + 7) % 300 for t in DOC[:30]]
    (tokens, reused, slot), (_, reused_other, slot_other) = serve(DOC + Q2, other)
    assert (reused, slot) == (len(DOC), 0) and (reused_other, slot_other) == (0, 1)
    assert tokens == run(COLD, DOC + Q2, n=6, reuse=0)[0]
    assert metrics.registry.get_sample_value("zenjax_reused_prompt_tokens_total") == len(DOC)
    assert eng.stats()["reused_prompt_tokens"] == len(DOC)
