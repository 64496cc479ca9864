"""Sparse vertical-slash prefill: config loading, the estimator against brute-force numpy, the mask.

Small DCA (c=64, w=16 -> s=48) so a few hundred keys reach the succ and inter stages; Qwen's head
layout (28 q / 4 kv heads), head_dim 16 (the estimator's math does not depend on H), lengths that do not
fill a 128-block.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zenjax.attention import AttentionMeta, attention_lse, sparse
from zenjax.config import (ConfigError, DCAConfig, ModelConfig, SparseConfig, SparseLayer, resolve_sparse,
                           sparse_config_from_json)
from zenjax.dca import rotate_for_dca

QWEN_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "data"
QWEN7B = QWEN_DIR / "Qwen2.5-7B-Instruct-1M.sparse_attention_config.json"
DCA = DCAConfig(64, 16, 64)           # s = 48
THETA = 10000.0
N, K, H = 28, 4, 16


def _cfg(layers=28, heads=28, kv=4) -> ModelConfig:
    return ModelConfig(vocab_size=64, hidden_size=heads * 128, intermediate_size=64, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv, head_dim=128, rope_theta=1e7, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, max_position_embeddings=1010000, dca=None)


# ------------------------------------------------------------------ configuration

def test_qwen_7b_file_loads_and_slices_for_tp():
    entries = json.loads(QWEN7B.read_text())
    sc = sparse_config_from_json(entries, _cfg(), source=str(QWEN7B))
    assert (sc.num_layers, sc.num_heads, sc.threshold, sc.last_q, sc.sink, sc.local) == (28, 28, 32768, 64, 30, 100)
    assert sc.budgets[0][0] == tuple(entries[0]["0"][1:3])
    for tp in (1, 2, 4):
        per = 28 // tp
        for rank in range(tp):
            sh = sc.shard(rank, tp)
            assert sh.num_heads == per and sh.head_offset == rank * per
            for l in (0, 13, 27):
                want = [tuple(entries[l][str(h)][1:3]) for h in range(rank * per, (rank + 1) * per)]
                assert list(sh.budgets[l]) == want
    with pytest.raises(ConfigError, match="tensor_parallel=3"):
        sc.shard(0, 3)
    # the 30 -> 130 quirk, applied per layer
    l, h = next((l, int(h)) for l, d in enumerate(entries) for h, e in d.items() if e[1] == 30)
    assert sc.layer(l, 1e7).vertical[h] == 130


@pytest.mark.parametrize("mutate, match", [
    (lambda e: e.pop(), "27 layers, the model has 28"),
    (lambda e: e[3].pop("5"), "layer 3: expected heads"),
    (lambda e: e[2]["7"].__setitem__(0, "block_sparse"), r"layer 2, head '7': pattern 'block_sparse'"),
    (lambda e: e[1]["0"].__setitem__(2, -4), r"layer 1, head '0': slash budget -4"),
    (lambda e: e[0]["1"].__setitem__(1, 12.5), r"layer 0, head '1': vertical budget 12.5"),
])
def test_bad_files_are_refused_naming_file_and_entry(mutate, match, tmp_path):
    entries = json.loads(QWEN7B.read_text())
    mutate(entries)
    f = tmp_path / "sparse_attention_config.json"
    f.write_text(json.dumps(entries))
    with pytest.raises(ConfigError, match=match) as e:
        resolve_sparse(f, _cfg())
    assert str(f) in str(e.value)


def test_resolve_choices(tmp_path):
    cfg = _cfg(layers=2, heads=4, kv=2)
    entries = [{str(h): ["vertical_and_slash", 100, 800, 0.9] for h in range(4)} for _ in range(2)]
    assert resolve_sparse(True, cfg, checkpoint_dir=tmp_path, meta={}) is None          # no file: dense
    assert resolve_sparse(False, cfg, checkpoint_dir=tmp_path, meta={"sparse_attention_config": entries}) is None
    knobs = {"source": {"hf_config": {"dual_chunk_attention_config": {"sparse_attention_threshold": 1000}}},
             "sparse_attention_config": entries}
    sc = resolve_sparse(True, cfg, checkpoint_dir=tmp_path, meta=knobs)
    assert sc.threshold == 1000 and sc.budgets[1][3] == (100, 800)
    off = {"source": {"hf_config": {"dual_chunk_attention_config": {"sparse_attention_enabled": False}}},
           "sparse_attention_config": entries}
    assert resolve_sparse(True, cfg, checkpoint_dir=tmp_path, meta=off) is None
    with pytest.raises(ConfigError, match="2 layers x 4 heads, the model 28 x 28"):
        resolve_sparse(sc, _cfg())


# ------------------------------------------------------------------ estimator vs brute force

def _np_rope(x, pos, theta=THETA):
    """numpy float64 RoPE (rotate-half), x [..., H], pos broadcastable to x[..., 0]."""
    Hh = x.shape[-1]
    inv = 1.0 / (theta ** (np.arange(0, Hh, 2) / Hh))
    ang = np.asarray(pos, np.float64)[..., None] * inv
    cos, sin = np.concatenate([np.cos(ang)] * 2, -1), np.concatenate([np.sin(ang)] * 2, -1)
    rot = np.concatenate([-x[..., Hh // 2:], x[..., :Hh // 2]], -1)
    return x * cos + rot * sin


def _np_estimate(q_raw, k_raw, q_start, kv_len, vb, sb, *, dca, last_q=64, sink=30, local=100):
    """Brute force (float64, loops) of spec 3.5 steps 1-5 with the module's fallback rule.

    Returns per head (columns, diagonals, vert scores, slash scores) as python sets / arrays."""
    T = q_raw.shape[0]
    n = min(last_q, T)
    valid = kv_len - q_start
    r0 = int(np.clip(valid - n, 0, T - n))
    rows = [r for r in range(r0, r0 + n) if r < valid]
    s, c = dca.chunk_len, dca.chunk_size
    P = (q_start // s) * s
    G = N // K
    res = []
    for h in range(N):
        vert = np.zeros(kv_len)
        slash = np.zeros(kv_len)
        kk = _np_rope(k_raw[:kv_len, h // G], np.arange(kv_len) % s)
        for r in rows:
            p = q_start + r
            logits = np.full(kv_len, -np.inf)
            qv = [_np_rope(q_raw[r, h], pos) for pos in (p % s, p % s + s, p % s + c)]   # intra, *_crit
            for j in range(p + 1):
                logits[j] = qv[0 if j >= P else (1 if j >= P - s else 2)] @ kk[j] / np.sqrt(H)
            a = np.exp(logits - logits.max())
            a /= a.sum()
            vert += a
            for j in range(p + 1):
                slash[p - j] += a[j]
        vert[:sink] = np.inf
        slash[:local] = np.inf
        kv = min(vb[h], kv_len)
        ks = min(sb[h], kv_len)
        cols = set(np.argsort(-vert, kind="stable")[:kv].tolist())
        diags = set(np.argsort(-slash, kind="stable")[:ks].tolist())
        for lo, hi, present, needs_slash in ((P, kv_len, True, False), (P - s, P, P >= s, True),
                                             (0, P - s, P >= 2 * s, True)):
            if not present:
                continue
            has_v = any(lo <= x < hi for x in cols)
            has_s = any(q_start - hi + 1 <= d <= kv_len - 1 - lo for d in diags) if needs_slash else True
            if not (has_v and has_s):
                cols |= {lo + (i * (hi - lo)) // 5 for i in range(5)}
        res.append((cols, diags, vert, slash, kv, ks))
    return res


def _same_topk(got: set, want: set, scores, k: int, tol=1e-4):
    """Equal sets, except entries whose brute-force score ties the k-th score within tol (float32 sums of
    <= 64 probabilities, each rounded to ~6e-8 relative: |error| << 1e-4)."""
    if got == want:
        return True
    kth = np.sort(scores)[::-1][k - 1]
    return all(abs(scores[x] - kth) <= tol for x in got ^ want if x < len(scores))


CASES = [  # (q_start, kv_len, T): chunk 0; chunk 1 (succ present); chunk 2 (succ + inter), rows < last_q
    (0, 37, 40),
    (50, 90, 40),
    (100, 141, 64),
    (96, 200, 110),      # more rows than last_q: only the last 64 score
]


@pytest.mark.parametrize("q_start, kv_len, T", CASES)
def test_estimator_equals_brute_force(q_start, kv_len, T):
    rng = np.random.default_rng(q_start + kv_len)
    S = 208                                    # cache longer than kv_len, not a multiple of 128
    q_raw = rng.normal(size=(T, N, H))
    k_raw = rng.normal(size=(S, K, H))
    vb = rng.integers(30, 90, N).tolist()
    sb = rng.integers(100, 160, N).tolist()
    vb[0], sb[0] = 0, 0                        # a head with no budget: sinks / local still capped at 0
    layer = SparseLayer(vertical=tuple(vb), slash=tuple(sb), last_q=64, sink=30, local=100, rope_theta=THETA)
    pos = q_start + jnp.arange(T)[None]
    q3, k_rot = rotate_for_dca(jnp.asarray(q_raw[None], jnp.float32), jnp.asarray(k_raw[None], jnp.float32),
                               pos, jnp.arange(S)[None], DCA, THETA)
    meta = AttentionMeta.of([q_start], [kv_len], DCA, sparse=layer)
    ind = jax.jit(sparse.estimate)(q3, k_rot, meta)
    want = _np_estimate(q_raw, k_raw, q_start, kv_len, vb, sb, dca=DCA)
    v, d = np.asarray(ind.vertical[0]), np.asarray(ind.slash[0])
    assert np.all(np.diff(v, axis=-1) >= 0) and np.all(np.diff(d, axis=-1) >= 0)     # ascending
    for h, (cols, diags, vert, slash, kv, ks) in enumerate(want):
        got_c = set(v[h][v[h] < sparse.SENTINEL].tolist())
        got_d = set(d[h][d[h] < sparse.SENTINEL].tolist())
        assert len(got_d) == ks, h
        assert _same_topk(got_d, diags, slash, ks), (h, got_d ^ diags)
        assert _same_topk(got_c, cols, vert, max(kv, 1)), (h, got_c ^ cols)


@pytest.mark.parametrize("q_start, kv_len, T", CASES[1:3])
def test_radix_topk_equals_sort_topk(q_start, kv_len, T):
    """The two `_topk` implementations select the same ids (exact: both are exact top-k with ties at the
    cut broken lowest id first), here through the whole estimator."""
    rng = np.random.default_rng(7 + q_start)
    S = 208
    q3, k_rot = rotate_for_dca(jnp.asarray(rng.normal(size=(1, T, N, H)), jnp.float32),
                               jnp.asarray(rng.normal(size=(1, S, K, H)), jnp.float32),
                               q_start + jnp.arange(T)[None], jnp.arange(S)[None], DCA, THETA)
    vb, sb = rng.integers(0, 90, N).tolist(), rng.integers(0, 160, N).tolist()
    layer = SparseLayer(vertical=tuple(vb), slash=tuple(sb), last_q=64, sink=30, local=100, rope_theta=THETA)
    meta = AttentionMeta.of([q_start], [kv_len], DCA, sparse=layer)
    out = {}
    for impl in ("sort", "radix"):
        sparse.TOPK_IMPL = impl
        try:
            out[impl] = jax.jit(sparse.estimate)(q3, k_rot, meta)
        finally:
            sparse.TOPK_IMPL = "sort"
    np.testing.assert_array_equal(out["radix"].vertical, out["sort"].vertical)
    np.testing.assert_array_equal(out["radix"].slash, out["sort"].slash)
    # ties: all-equal scores keep the lowest ids; -inf never selected
    sc = jnp.array([[1.0, 1.0, 1.0, -jnp.inf, 1.0], [3.0, -jnp.inf, -jnp.inf, -jnp.inf, 2.0]])
    for impl in ("sort", "radix"):
        got = sparse._topk(sc, 4, jnp.array([3, 4]), 5, impl=impl)
        assert got.tolist() == [[0, 1, 2, sparse.SENTINEL], [0, 4, sparse.SENTINEL, sparse.SENTINEL]], impl


def test_a_shape_heads_keep_sinks_and_nearest_diagonals(tmp_path):
    """An "a_shape" entry [n_init, n_local] (spec 3.1, no estimation): the head's columns are keys
    0..n_init-1 and its diagonals 0..n_local-1 (no 30 -> 130 quirk); vertical-slash heads beside it are
    estimated as before; TP slicing keeps the patterns."""
    entries = json.loads(QWEN7B.read_text())
    entries[0]["3"] = ["a_shape", 30, 64, 1.0]
    f = tmp_path / "sparse_attention_config.json"
    f.write_text(json.dumps(entries))
    sc = resolve_sparse(f, _cfg())
    assert sc.patterns[0][3] == "a_shape" and sc.shard(0, 4).patterns[0][3] == "a_shape"
    layer = sc.layer(0, THETA)
    assert layer.vertical[3] == 30 and layer.static_heads()[3] and not layer.static_heads()[2]
    small = dataclasses.replace(layer, vertical=tuple(min(v, 40) for v in layer.vertical),
                                slash=tuple(min(x, 120) for x in layer.slash))
    rng = np.random.default_rng(3)
    q_start, kv_len, T, S = 100, 141, 64, 208
    q3, k_rot = rotate_for_dca(jnp.asarray(rng.normal(size=(1, T, N, H)), jnp.float32),
                               jnp.asarray(rng.normal(size=(1, S, K, H)), jnp.float32),
                               q_start + jnp.arange(T)[None], jnp.arange(S)[None], DCA, THETA)
    ind = sparse.estimate(q3, k_rot, AttentionMeta.of([q_start], [kv_len], DCA, sparse=small))
    v, d = np.asarray(ind.vertical[0, 3]), np.asarray(ind.slash[0, 3])
    assert set(d[d < sparse.SENTINEL].tolist()) == set(range(64))
    cols = set(v[v < sparse.SENTINEL].tolist())
    assert set(range(30)) <= cols and cols - set(range(30)) <= set(range(141))   # + DCA fallback columns only


def test_stage_offsets_hit_the_true_key():
    """Spec 3.5's per-stage offsets: with 3.3's row -> key map (key = r + delta - o, r = stage-local row,
    delta = Lk - Lq causal or Lk non-causal) every offset lands on key p - d of the stage."""
    q_start, kv_len, s = 100, 141, DCA.chunk_len
    d = jnp.arange(kv_len, dtype=jnp.int32)[None, None]
    ind = sparse.SparseIndices(vertical=jnp.arange(kv_len, dtype=jnp.int32)[None, None], slash=d)
    st = sparse.stage_offsets(ind, jnp.array([q_start]), jnp.array([kv_len]), DCA)
    P = 96
    for name, lo, hi, causal in (("intra", P, kv_len, True), ("succ", P - s, P, False), ("inter", 0, P - s, False)):
        cols, offs = (np.asarray(x[0, 0]) for x in st[name])
        assert set(cols[cols < sparse.SENTINEL] + lo) == set(range(lo, hi))
        Lk, Lq = hi - lo, kv_len - q_start
        delta = Lk - Lq if causal else Lk
        for dd, o in zip(np.asarray(d[0, 0]), offs):
            if o == sparse.SENTINEL:
                continue
            hits = [p - dd for p in range(q_start, kv_len) if lo <= p - dd < hi]
            assert hits, (name, dd)
            for p in range(q_start, kv_len):
                if lo <= p - dd < hi:
                    assert lo + (p - q_start) + delta - o == p - dd, (name, dd, p)


# ------------------------------------------------------------------ the mask and the reference path

def _np_mask(vert, slash, q_start, kv_len, T, S):
    """The module docstring's mask, written per (row, key) with loops."""
    m = np.zeros((T, S), bool)
    cols = set(vert.tolist())
    ds = [d for d in slash.tolist() if d < sparse.SENTINEL]
    for t in range(T):
        p = q_start + t
        a = q_start + (t // 128) * 128
        for j in range(min(p + 1, kv_len, S)):
            kb = j // 128
            band = any(a - d <= kb * 128 + 127 and a + 127 - d >= kb * 128 for d in ds)
            m[t, j] = j in cols or band
    return m


def test_mask_equals_its_definition():
    rng = np.random.default_rng(0)
    q_start, kv_len, T, S = 300, 561, 261, 600
    vert = np.sort(np.concatenate([rng.choice(kv_len, 40, replace=False), [sparse.SENTINEL] * 3]))
    slash = np.sort(np.concatenate([np.arange(5), rng.choice(np.arange(5, kv_len), 6, replace=False),
                                    [sparse.SENTINEL] * 2]))
    ind = sparse.SparseIndices(jnp.asarray(vert[None, None], jnp.int32), jnp.asarray(slash[None, None], jnp.int32))
    got = np.asarray(sparse.sparse_mask(ind, jnp.array([q_start]), jnp.array([kv_len]), T, S))[0, 0]
    want = _np_mask(vert, slash, q_start, kv_len, T, S)
    assert (got == want).all()
    assert 0 < want.sum() < np.tril(np.ones((T, S), bool), q_start).sum()      # really sparse, not empty


def _qkv(q_start, T, S, seed=0):
    rng = np.random.default_rng(seed)
    q_raw = jnp.asarray(rng.normal(size=(1, T, N, H)), jnp.float32)
    k_raw = jnp.asarray(rng.normal(size=(1, S, K, H)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(1, S, K, H)), jnp.float32)
    q3, k = rotate_for_dca(q_raw, k_raw, q_start + jnp.arange(T)[None], jnp.arange(S)[None], DCA, THETA)
    return q3, k, v


@pytest.mark.parametrize("q_start, kv_len, T", [(0, 37, 40), (100, 141, 64), (96, 200, 110)])
def test_full_budgets_equal_dense_dca(q_start, kv_len, T):
    """Budgets >= kv_len select every column and diagonal: the sparse step IS dense DCA (same float32
    reference with an all-true extra mask -> identical up to reassociation, tol 1e-6)."""
    S = 208
    q3, k, v = _qkv(q_start, T, S)
    full = SparseLayer(vertical=(S,) * N, slash=(S,) * N, last_q=64, sink=30, local=100, rope_theta=THETA)
    dense = attention_lse(q3, k, v, AttentionMeta.of([q_start], [kv_len], DCA), impl="reference")
    sp = attention_lse(q3, k, v, AttentionMeta.of([q_start], [kv_len], DCA, sparse=full), impl="reference")
    rows = slice(0, kv_len - q_start)
    assert np.abs(np.asarray(sp[0] - dense[0])[:, rows]).max() <= 1e-6
    assert np.abs(np.asarray(sp[1] - dense[1])[:, rows]).max() <= 1e-6


def test_small_budgets_are_sparse_and_differ():
    """Small budgets mask keys: the output changes (so the sparse path is really taken), stays finite."""
    q_start, kv_len, T, S = 400, 550, 150, 600      # keys 0..399 lie in blocks the diagonals skip
    q3, k, v = _qkv(q_start, T, S, seed=1)
    small = SparseLayer(vertical=(2,) * N, slash=(3,) * N, last_q=64, sink=1, local=1, rope_theta=THETA)
    meta = AttentionMeta.of([q_start], [kv_len], DCA, sparse=small)
    ind = sparse.estimate(q3, k, meta)
    mask = np.asarray(sparse.sparse_mask(ind, meta.q_start, meta.kv_len, T, S))
    assert mask[0, :, : kv_len - q_start].sum() < np.tril(np.ones((T, S), bool), q_start)[: kv_len - q_start].sum() * N
    dense, _ = attention_lse(q3, k, v, AttentionMeta.of([q_start], [kv_len], DCA), impl="reference")
    sp, _ = attention_lse(q3, k, v, meta, impl="reference")
    rows = slice(0, kv_len - q_start)
    assert np.isfinite(np.asarray(sp)).all()
    assert np.abs(np.asarray(sp - dense)[:, rows]).max() > 1e-3


# ------------------------------------------------------------------ the engine

def _engine(sparse_cfg, chunk=32, max_batch=1):
    import dataclasses as dc
    from zenjax.config import engine_config
    from zenjax.engine import Engine
    from zenjax.model import init_params
    cfg = dc.replace(_cfg(layers=2, heads=28, kv=4), hidden_size=224, head_dim=8, vocab_size=300,
                     rope_theta=1e4, dca=DCAConfig(32, 8, 32))                             # s = 24
    params = init_params(cfg, jax.random.key(0), jnp.float32, scale=0.2)
    ec = engine_config(max_model_len=400, prefill_chunk=chunk, attention="reference", dtype="float32",
                       max_batch=max_batch)
    return Engine(cfg, params, ec, verbose=False, sparse=sparse_cfg)


def test_engine_sparse_just_over_threshold_and_counts():
    """threshold 40: a 41-token prompt prefills sparse (every piece, 2 DCA chunks back), a 40-token one
    dense. With full budgets the sparse tokens equal dense ones exactly (same float32 math, all-true mask)."""
    from zenjax.sampling import SamplingParams
    ids = [int(t) for t in np.random.RandomState(0).randint(0, 300, 90)]
    full = SparseConfig(budgets=(((400, 400),) * 28,) * 2, threshold=40)
    sp, dense = _engine(full), _engine(None)
    p = SamplingParams(max_new_tokens=4)
    assert sp.generate(ids[:41], p).token_ids == dense.generate(ids[:41], p).token_ids
    assert sp.stats() == {"sparse_prefill_tokens": 41, "dense_prefill_tokens": 0, "reused_prompt_tokens": 0}
    sp.generate(ids[:40], p)
    assert sp.stats() == {"sparse_prefill_tokens": 41, "dense_prefill_tokens": 40, "reused_prompt_tokens": 0}
    assert sp.generate(ids, p).token_ids == dense.generate(ids, p).token_ids           # pieces in chunk 3
    assert sp.trace_counts["prefill_sparse"] == 1 and "prefill_sparse" in sp.compiled_shapes()
    assert "prefill_sparse" not in dense.compiled_shapes()


def test_sparse_piece_fused_with_a_decode_step_equals_the_two_calls():
    """A sparse prompt (small budgets: really sparse) prefilled in slot 1 while slot 0 decodes: the fused
    call (engine.prefill_and_decode, the prefill_decode_sparse step) gives the tokens of prefill_next +
    decode_steps. The indices are estimated from the same piece's queries either way; only float32
    rounding of the shared matmul may differ (tests/test_prefill_decode.py), too little to change a
    top-k or a token here."""
    from zenjax.sampling import SamplingParams
    ids = [int(t) for t in np.random.RandomState(1).randint(0, 300, 120)]
    budgets = SparseConfig(budgets=(((6, 6),) * 28,) * 2, threshold=40)

    def run(fused):
        eng = _engine(budgets, chunk=32, max_batch=2)
        eng.start(0, ids[:7], SamplingParams(max_new_tokens=30))
        out0 = [eng.prefill_next(0)]
        eng.start(1, ids[7:], SamplingParams(max_new_tokens=3))
        first = None
        while first is None:
            if fused:
                first, got = eng.prefill_and_decode(1, [0], 20)
            else:
                first, got = eng.prefill_next(1, 20), eng.decode_steps([0], 1)
            out0 += got[0]
        assert eng.stats()["sparse_prefill_tokens"] == 113
        return out0, first, eng

    (a0, a1, _), (b0, b1, eng) = run(False), run(True)
    # 113 tokens in 9 pieces of <= 20 that never cross a DCA boundary (s = 24): 0-20, 20-24, 24-44, ...
    assert (b0, b1) == (a0, a1) and len(a0) == 1 + 9
    assert eng.trace_counts["prefill_decode_sparse"] == 1 and "prefill_decode_sparse" in eng.compiled_shapes()


def test_load_reads_refuses_and_turns_off(tmp_path):
    import zenjax
    good = [{str(h): ["vertical_and_slash", 100, 800, 0.9] for h in range(4)} for _ in range(4)]
    f = tmp_path / "sparse_attention_config.json"
    f.write_text(json.dumps(good))
    e = zenjax.load(None, sparse=f, max_model_len=256, verbose=False)
    assert e.sparse.budgets[3][2] == (100, 800) and str(f) in str(e.sparse)
    assert zenjax.load(None, sparse=False, max_model_len=256, verbose=False).sparse is None
    assert zenjax.load(None, max_model_len=256, verbose=False).sparse is None     # the demo ships none
    good[2]["3"][0] = "block_sparse"
    f.write_text(json.dumps(good))
    with pytest.raises(ConfigError, match=r"sparse_attention_config.json: layer 2, head '3': pattern"):
        zenjax.load(None, sparse=f, max_model_len=256, verbose=False)


def test_cli_sparse_flags(tmp_path, capsys):
    from zenjax.eval.__main__ import main
    from zenjax.serve.server import config_from_args
    assert config_from_args([]).sparse == "auto"
    assert config_from_args(["--sparse", "off"]).sparse == "off"
    with pytest.raises(SystemExit):
        config_from_args(["--sparse", str(tmp_path / "missing.json")])
    assert "--sparse" in capsys.readouterr().err
    assert main(["passkey", "--lengths", "384", "--sparse", str(tmp_path / "missing.json")]) == 2
    assert "--sparse" in capsys.readouterr().err


def test_auto_keeps_sparse_off_without_a_validated_sparse_path(tmp_path, capsys):
    """sparse="auto" (the default) turns sparse prefill on only for implementations whose sparse path is
    validated here: the reference (CPU); not cudnn (none) nor pallas off a Hopper GPU (its sparse path there
    would be the O(T*S) reference)."""
    import shutil
    import zenjax
    from zenjax.attention import sparse_ready
    from zenjax.engine import DEFAULT_CHECKPOINT
    assert sparse_ready("reference") and not sparse_ready("cudnn") and not sparse_ready("pallas")
    ck = tmp_path / "ck"
    shutil.copytree(DEFAULT_CHECKPOINT, ck)
    (ck / "sparse_attention_config.json").write_text(json.dumps(
        [{str(h): ["vertical_and_slash", 100, 800, 0.9] for h in range(4)} for _ in range(4)]))
    assert zenjax.load(ck, max_model_len=256, verbose=False).sparse is not None            # reference
    assert zenjax.load(ck, max_model_len=256, attention="cudnn").sparse is None
    assert "sparse prefill stays off with attention=cudnn" in capsys.readouterr().err
    assert zenjax.load(ck, max_model_len=256, attention="cudnn", sparse=True, verbose=False).sparse is not None
