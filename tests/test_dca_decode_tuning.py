"""Decode-kernel tuning knobs (pallas_kernels/dca_decode.py) and the GPU sweep script, on the CPU.

Layout: Qwen's heads (28 q / 4 kv, group 7), head_dim 16, DCA chunk_size 64 / local 16 -> s = 48, key
blocks of 16, a cache of S = 293 slots (not a multiple of the block: the last tile is read masked).
Decode contexts end in DCA chunks 0, 1 (just past 48), 2, 5 and inside the ragged last tile.

Tolerances: float32 inputs, max |diff| <= 2e-5 on outputs and LSE vs the float32 reference (the kernel
reassociates the softmax sums; observed ~1e-6).
"""
from __future__ import annotations

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dca_decode as D

N, K, H = 28, 4, 16
S_LEN = 48
SEQ = 6 * S_LEN + 5
TOL32 = 2e-5
KV_LEN = jnp.array([20, 49, 97, 260, 291], jnp.int32)


def _inputs(seed, B, T, dca):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(k1, ((3,) if dca else ()) + (B, T, N, H), jnp.float32)
    return q, jax.random.normal(k2, (B, SEQ, K, H)), jax.random.normal(k3, (B, SEQ, K, H))


def _max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


# "segments" with T=1 is the new static-uniform path; with T=3 it falls back to "cond" (covered by
# test_pallas_kernels). "single" is new for every T (queries straddling a chunk at kv_len 49, T=3).
@pytest.mark.parametrize("loop,T,dca", [("segments", 1, True), ("single", 1, True), ("single", 1, False),
                                        ("single", 3, True)],
                         ids=["segments-dca-T1", "single-dca-T1", "single-plain-T1", "single-dca-T3"])
def test_loops_match_reference(loop, T, dca):
    q, k, v = _inputs(3, 5, T, dca)
    q_start = KV_LEN - T
    cl = S_LEN if dca else None
    # 7 splits over at most 19 tiles: uneven shares, empty splits for the short rows (lse = -inf).
    out, lse = D.dca_decode(q, k, v, q_start, KV_LEN, chunk_len=cl, block_k=16, num_splits=7, loop=loop,
                            interpret=True)
    ref, ref_lse = D.dca_decode_reference(q, k, v, q_start, KV_LEN, chunk_len=cl)
    assert out.shape == (5, T, N, H) and lse.shape == (5, T, N)
    assert _max_diff(out, ref) <= TOL32
    assert _max_diff(lse, ref_lse) <= TOL32


def test_bad_loop_is_refused():
    q, k, v = _inputs(0, 1, 1, True)
    with pytest.raises(ValueError, match="loop='fast'"):
        D.dca_decode(q, k[:1], v[:1], KV_LEN[:1] - 1, KV_LEN[:1], chunk_len=S_LEN, block_k=16, loop="fast",
                     interpret=True)


def _modelled(s, programs_per_split, tiles, sms):
    slots = sms * D.CTAS_PER_SM
    return -(-s * programs_per_split // slots) * (-(-tiles // s) + D.START_COST_TILES)


@pytest.mark.parametrize("B,S,block,sms", [(1, 131072, 64, 132), (1, 1 << 20, 64, 132), (1, 131072, 64, 78),
                                           (8, 131072, 64, 132), (1, 1010000, 64, 132), (2, 100, 16, 132)])
def test_default_num_splits_is_the_modelled_best(B, S, block, sms):
    tiles = -(-S // block)
    s = D.default_num_splits(B, K, S, block, sms)
    assert 1 <= s <= tiles
    best = min(_modelled(x, B * K, tiles, sms) for x in range(1, tiles + 1))
    assert _modelled(s, B * K, tiles, sms) == best                      # no split count models faster
    assert D.default_num_splits(B, K, S, block, sms) == s               # deterministic


def test_default_num_splits_worked_example():
    # The docstring's example: H100 132 SMs, B=1, K=4, 128K keys in 64-key tiles -> 64 splits (ties with
    # 66 at 32 tiles per program; the smaller wins), i.e. 256 programs in one wave of 264 slots.
    assert D.default_num_splits(1, 4, 131072, 64, 132) == 64
    assert D.default_num_splits(1, 4, 1 << 20, 64, 132) == 66
    assert D.default_num_splits(1, 4, 100, 16, 132) == 7               # never more splits than tiles


def test_num_sms_from_core_count(monkeypatch):
    monkeypatch.setattr(jax, "devices", lambda *a: [types.SimpleNamespace(core_count=78)])
    assert D.device_num_sms() == 78
    assert D.default_num_splits(1, 4, 131072, 64) == D.default_num_splits(1, 4, 131072, 64, 78)
    monkeypatch.setattr(jax, "devices", lambda *a: [types.SimpleNamespace()])      # CPU: no core_count
    assert D.device_num_sms() == D.FALLBACK_NUM_SMS == 132


def test_default_num_splits_refuses_bad_input():
    with pytest.raises(ValueError, match="kv_heads=0"):
        D.default_num_splits(1, 0, 1024, 64, 132)
    with pytest.raises(ValueError, match="num_sms=0"):
        D.default_num_splits(1, 4, 1024, 64, 0)


def test_sweep_grid_is_wide_and_unique():
    from benchmarks.decode_sweep import LOOPS, grid_128k
    g = grid_128k(132)
    assert 40 <= len(g) <= 80 and len(set(g)) == len(g)
    assert {c.loop for c in g} == set(LOOPS)
    assert {33, 66, 99, 132, 264} <= {c.splits for c in g}               # whole waves of 132 SMs
    assert {c.block_k for c in g} == {32, 64, 128}


def test_sweep_smoke(tmp_path):
    """The sweep runs end to end (interpret mode): a block that does not divide s is reported as failed
    and skipped, the best per context passes its check vs the reference, and the JSON is written."""
    from benchmarks import decode_sweep
    out = tmp_path / "sweep.json"
    decode_sweep.main(["--smoke", "--out", str(out)])
    res = json.loads(out.read_text())
    failed = [r for r in res["rows"] if "error" in r]
    assert [r["block_k"] for r in failed] == [32] and "does not divide" in failed[0]["error"]
    for S in ("100", "70"):
        best = res["best"][S]
        assert best["us"] > 0 and best["pass"], best
        assert best["rel_full"] < 1e-2 and best["rel_ragged"] < 1e-2
