"""Several decode steps per device call (zenjax/runner.py) and prefill buckets, on a tiny random model
with Qwen's 7B head layout (28 q / 4 kv heads), float32.

The reference is one step per device call (n = 1: the device loop runs its body once, exactly what the
one-step decode did, and the host checks every token before the next step). Blocks of 5 and 16 steps
must give the very same tokens for greedy and seeded sampling, with stop ids and max_new_tokens hit in
the middle of a block, stop strings found by the host after a block, and three slots of different
prompt lengths decoding together. Exact equality is the right check: each slot's step computes the same
function of the same inputs in every variant (same compiled step body, same batch shape), so not even
rounding may differ.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zenjax.config import DCAConfig, ModelConfig, engine_config
from zenjax.engine import Engine
from zenjax.model import init_params
from zenjax.runner import prefill_buckets
from zenjax.sampling import SamplingParams

CFG = ModelConfig(vocab_size=300, hidden_size=224, intermediate_size=64, num_layers=2, num_heads=28,
                  num_kv_heads=4, head_dim=8, rope_theta=1e4, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  max_position_embeddings=4096,
                  dca=DCAConfig(chunk_size=32, local_size=8, original_max_position_embeddings=32))  # s = 24
PARAMS = init_params(CFG, jax.random.key(0), jnp.float32, scale=0.2)
IDS = [int(t) for t in np.random.RandomState(0).randint(0, 300, 100)]


class CharTokenizer:
    """Token t -> one letter; enough for TextStream (it only calls decode)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + int(t) % 26) for t in ids)


def make(chunk=16, max_batch=3, max_len=160, tokenizer=None):
    ec = engine_config(max_model_len=max_len, prefill_chunk=chunk, max_batch=max_batch,
                       attention="reference", dtype="float32")
    return Engine(CFG, PARAMS, ec, tokenizer=tokenizer, verbose=False)


# three requests: greedy with a repetition penalty, seeded top-k, seeded top-p + min-p; prompt lengths
# 5 / 40 / 70 (the last two cross the DCA chunk length 24, so the decode temperature varies per slot)
REQUESTS = [(IDS[:5], dict(max_new_tokens=7, repetition_penalty=1.3)),
            (IDS[:40], dict(max_new_tokens=23, temperature=0.8, top_k=20, seed=11)),
            (IDS[:70], dict(max_new_tokens=30, temperature=1.1, top_p=0.9, min_p=0.05, seed=5))]


def run(engine, n, requests, **extra):
    """Drive the slot API as the scheduler does: prefill each slot, then calls of n steps for every slot
    still running; the host appends each token and drops what a call produced past a finish."""
    seqs = {}
    for slot, (ids, kw) in enumerate(requests):
        seqs[slot] = engine.start(slot, ids, SamplingParams(**kw, **extra))
        tok = None
        while tok is None:
            tok = engine.prefill_next(slot)
        seqs[slot].append(tok)
    running = [s for s, q in seqs.items() if q.finish_reason is None]
    while running:
        got = engine.decode_steps(running, n)
        for s in running:
            for i, t in enumerate(got[s]):
                _, reason = seqs[s].append(t)
                if reason is not None:
                    # the device stops a slot on a stop id or max_new_tokens: nothing follows in the block
                    if reason == "length" or t in seqs[s].params.stop_token_ids:
                        assert i == len(got[s]) - 1, (s, reason, got[s])
                    break
        running = [s for s in running if seqs[s].finish_reason is None]
    out = {s: (q.output_ids, q.finish_reason, q.text) for s, q in seqs.items()}
    for s in seqs:
        engine.release(s)
    return out


def test_blocks_equal_one_step_per_call_greedy_and_seeded():
    e = make()
    one = run(e, 1, REQUESTS)
    assert [len(one[s][0]) for s in range(3)] == [7, 23, 30] and all(r == "length" for _, r, _ in one.values())
    for n in (5, 16):                       # 7, 23, 30 tokens: max_new_tokens ends mid-block for both
        assert run(e, n, REQUESTS) == one, n
    # the sampled slots really sample (else "seeded" would test nothing)
    greedy = run(e, 16, [(ids, dict(max_new_tokens=kw["max_new_tokens"])) for ids, kw in REQUESTS])
    assert greedy[1][0] != one[1][0] and greedy[2][0] != one[2][0]
    # one compiled decode step served n = 1, 5, 16 for all slot sets
    assert e.trace_counts["decode"] == 1


def test_greedy_blocks_match_full_recompute():
    """An independent reference: each greedy token is the argmax of a full-sequence forward pass."""
    e = make(chunk=128, max_batch=1)
    out = e.generate(IDS[:30], SamplingParams(max_new_tokens=12)).token_ids
    ids = list(IDS[:30])
    for t in out:
        assert int(np.argmax(e.logits(ids)[-1])) == t
        ids.append(t)


def test_stop_ids_end_mid_block():
    e = make()
    free = run(e, 1, REQUESTS)
    # a stop id for each slot: a token first sampled at an index that is not the last of a block of 5/16
    stops = []
    for s in range(3):
        toks = free[s][0]
        i = next(i for i in range(2, len(toks)) if toks[i] not in toks[:i] and (i + 1) % 5 and (i + 1) % 16)
        stops.append((toks[i], i))
    reqs = [(ids, dict(kw, stop_token_ids=(tok,))) for (ids, kw), (tok, _) in zip(REQUESTS, stops)]
    one = run(e, 1, reqs)
    for s, (tok, i) in enumerate(stops):
        assert one[s][0] == free[s][0][: i + 1] and one[s][1] == "stop"
    for n in (5, 16):
        assert run(e, n, reqs) == one, n


def test_stop_strings_roll_back_after_a_block():
    """A stop string is found by the host after a block: the tokens after it are dropped, the text ends
    before it, exactly as with one step per call."""
    e = make(tokenizer=CharTokenizer())
    free = run(e, 1, REQUESTS[1:2])[0]
    text = free[2]
    stop = text[9:11]                                      # two letters starting at letter 9
    cut = text.find(stop)
    one = run(e, 1, REQUESTS[1:2], stop=(stop,))[0]
    assert one[1] == "stop" and one[2] == text[:cut] and len(one[0]) < len(free[0])
    assert run(e, 16, REQUESTS[1:2], stop=(stop,))[0] == one
    # generate() pipelines its calls (the next one is dispatched before the previous is read): same result
    g = e.generate(REQUESTS[1][0], SamplingParams(**REQUESTS[1][1], stop=(stop,)))
    assert (g.token_ids, g.finish_reason, g.text) == one


def test_decode_donates_its_buffers():
    e = make(max_batch=1)
    e.start(0, IDS[:5], SamplingParams(max_new_tokens=8))
    while e.prefill_next(0) is None:
        pass
    before = (e.runner.cache.k[0], e.runner.sampler.seen, e.runner.decode_state.stop)
    e.decode_steps([0], 4)
    assert all(b.is_deleted() for b in before)     # reused in place, not copied per call


def test_bad_step_counts_and_finished_slots_are_refused():
    e = make(max_batch=2)
    with pytest.raises(ValueError, match="not finished prefill"):
        e.decode_steps([0], 4)
    e.start(0, IDS[:5], SamplingParams(max_new_tokens=2))
    while e.prefill_next(0) is None:
        pass
    with pytest.raises(ValueError, match="decode steps n=17"):
        e.decode_steps([0], 17)
    assert len(e.decode_steps([0], 16)[0]) == 1          # max_new_tokens 2: the prefill's token + one
    e.sequence(0).finish_reason = "length"
    with pytest.raises(ValueError, match="finished"):
        e.decode_steps([0], 1)


def test_prefill_buckets():
    assert prefill_buckets(8192, None) == (256, 512, 768, 1024, 1536, 2048, 3072, 4096, 8192)
    assert prefill_buckets(512, None) == (256, 512)
    assert prefill_buckets(2048, 1000) == (256, 512, 768, 1000)  # DCA: no piece is longer than s
    assert prefill_buckets(100, None) == (100,)
    plain = dataclasses.replace(CFG, dca=None)
    ec = engine_config(max_model_len=700, prefill_chunk=512, max_batch=1, attention="reference", dtype="float32")
    e = Engine(plain, PARAMS, ec, verbose=False)
    assert e.compiled_shapes()["prefill"] == ((1, 256), (1, 512))
    ids = [int(t) for t in np.random.RandomState(1).randint(0, 300, 600)]
    got = e.logits(ids)                                     # pieces (0,512) (512,600): steps of 512 and 256
    e.logits(ids[:5])                                       # a 256 step again: no new compile
    assert e.trace_counts["prefill_all_logits"] == 2
    one = Engine(plain, PARAMS, dataclasses.replace(ec, prefill_chunk=700), verbose=False).logits(ids)
    # warmup() compiles every bucket's prefill step and the decode step; later prompts compile nothing
    w = Engine(plain, PARAMS, ec, verbose=False)
    w.warmup()
    assert (w.trace_counts["prefill"], w.trace_counts["decode"]) == (2, 1)
    w.generate(ids[:300], SamplingParams(max_new_tokens=3))
    assert (w.trace_counts["prefill"], w.trace_counts["decode"]) == (2, 1)
    assert float(np.abs(got - one).max() / np.abs(one).max()) < 1e-5    # float32: summation order only
