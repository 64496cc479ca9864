"""The sparsity refinement tool (zenjax/refine, spec 3.6) on the embedded demo model (4 layers, 4 q / 2 kv
heads, DCA s = 896) at 1100 tokens: pieces straddle the DCA boundary and the last one does not fill a
128-key block."""
from __future__ import annotations

import json

import numpy as np
import pytest

from zenjax.config import SparseConfig, resolve_sparse
from zenjax.refine import (BINS, RecallStats, aggregate, calibration_sequences, main, raise_budgets, refine,
                           refine_config)

LENGTH = 1100
F32_U = 2.0 ** -24      # float32 unit roundoff


@pytest.fixture(scope="module")
def engine():
    import zenjax
    # prefill_chunk 256: one prefill bucket, so each budget set compiles one probe step (~5 s on 2 cores)
    return zenjax.load(None, max_model_len=LENGTH, prefill_chunk=256, attention="reference", sparse=False,
                       verbose=False)


def _small_start(path, cfg, v=30, s=50):
    path.write_text(json.dumps([{str(h): ["vertical_and_slash", v, s, 0.0] for h in range(cfg.num_heads)}
                                for _ in range(cfg.num_layers)]))
    return str(path)


def test_full_budgets_recall_is_one(engine, tmp_path):
    """Budgets >= every key: the sparse mask is the causal mask, so the sparse LSE is the dense one over
    the same float32 logits. The only difference XLA may introduce is the order of the softmax sum of
    <= S positive terms, whose relative error is <= (S - 1) u in each of the two sums, so
    |log recall| <= 2 (S - 1) u (S = keys of the longest row)."""
    rc = refine_config(None, "passkey", [LENGTH], tmp_path / "o.json")
    ids = calibration_sequences(rc, engine.tokenizer)[0][1]
    S = len(ids)
    full = SparseConfig(budgets=(((S, S),) * engine.config.num_heads,) * engine.config.num_layers)
    stats = RecallStats.zeros(engine.config.num_layers, engine.config.num_heads)
    pieces = []
    for start, end in engine.prefill_plan(S):
        lr = np.asarray(engine.runner.prefill_probe(0, ids, start, end, full))[:, : end - start]
        pieces.append(lr)
        stats.add(lr)
    assert engine.prefill_plan(S)[-2:] == [(768, 896), (896, S)] and S % 128 != 0   # across s = 896
    log_recall = np.concatenate(pieces, axis=1)                     # [L, S, N]
    assert np.abs(log_recall).max() <= 2 * (S - 1) * F32_U         # float32 summation-order bound
    assert np.abs(aggregate(stats, "mean") - 1).max() <= 2 * (S - 1) * F32_U
    assert (aggregate(stats, "q0.05") == 1.0).all()                # every row in the top (== 1) bin
    assert stats.counts.min() == S


def test_refine_raises_low_heads_and_leaves_high_ones(engine, tmp_path):
    """Threshold between the heads' round-0 recalls (measured here, not hard-coded): exactly the heads
    below it gain one step (30 -> 130 + step, the quirk's effective budget), the others keep their
    budgets and score, raised heads gain recall, and the file loads through the SparseConfig loader."""
    cfg = engine.config
    start = _small_start(tmp_path / "start.json", cfg)
    rc0 = refine_config(None, "passkey", [LENGTH], tmp_path / "r0.json", start=start, max_rounds=1)
    rep0 = refine(rc0, progress=False, engine=engine)
    before = np.asarray(rep0["rounds"][0]["recall"])
    assert before.max() < 0.99                                     # the probe really took the sparse path
    assert before.max() - before.min() > 0.02                      # the heads differ: the test can tell
    thr = float(np.median(before))
    low = before < thr
    assert 0 < low.sum() < low.size
    rc = refine_config(None, "passkey", [LENGTH], tmp_path / "sparse_attention_config.json", start=start,
                       max_rounds=2, threshold=thr, step_vertical=64, step_slash=96)
    rep = refine(rc, progress=False, engine=engine)
    assert np.array_equal(np.asarray(rep["rounds"][0]["recall"]), before)
    after = np.asarray(rep["rounds"][1]["recall"])
    entries = json.loads(rc.out.read_text())
    for l in range(cfg.num_layers):
        for h in range(cfg.num_heads):
            pattern, v, s, score = entries[l][str(h)]
            assert pattern == "vertical_and_slash"
            assert (v, s) == ((130 + 64, 50 + 96) if low[l, h] else (30, 50))
            assert score == round(float(after[l, h]), 4)
            if low[l, h]:
                assert after[l, h] > before[l, h]
            else:                                                  # unchanged budgets: same recall
                assert after[l, h] == pytest.approx(before[l, h], abs=1e-9)
    loaded = resolve_sparse(rc.out, cfg)
    assert loaded.budgets[0] == tuple((v, s) for _, v, s, _ in entries[0].values())
    assert not rc.state_path.exists() and rc.report_path.is_file()


class _Interrupt(Exception):
    pass


def test_interrupted_run_resumes_to_the_same_result(engine, tmp_path):
    """2 rounds x 2 passkey prompts of 600 tokens: kill after unit (round 1, prompt 0); the rerun continues
    from the saved state and writes the same file and report as an uninterrupted run."""
    cfg = engine.config
    start = _small_start(tmp_path / "start.json", cfg)
    kw = dict(start=start, max_rounds=2, threshold=0.999, samples=2, step_vertical=64, step_slash=64)
    ref = refine_config(None, "passkey", [600], tmp_path / "ref.json", **kw)
    ref_report = refine(ref, progress=False, engine=engine)
    assert len(ref_report["rounds"]) == 2

    rc = refine_config(None, "passkey", [600], tmp_path / "cut.json", **kw)
    seen = []

    def cut(r, i):
        seen.append((r, i))
        if (r, i) == (1, 0):
            raise _Interrupt
    with pytest.raises(_Interrupt):
        refine(rc, progress=False, engine=engine, on_unit=cut)
    assert rc.state_path.is_file() and not rc.out.exists()
    saved = json.loads(rc.state_path.read_text())
    assert (saved["round"], saved["next_unit"]) == (1, 1)
    seen.clear()
    report = refine(rc, progress=False, engine=engine, on_unit=lambda r, i: seen.append((r, i)))
    assert seen == [(1, 1)]                                        # only the missing unit ran
    assert rc.out.read_text() == ref.out.read_text()
    assert report["rounds"] == ref_report["rounds"]
    assert not rc.state_path.exists()


def test_state_of_other_arguments_is_refused(tmp_path, capsys):
    out = tmp_path / "o.json"
    state = tmp_path / "o.json.partial.json"
    state.write_text(json.dumps({"fingerprint": {"threshold": 0.5}}))
    assert main(["default", "--calibration", "passkey", "--lengths", "300", "--out", str(out),
                 "--no-progress"]) == 2
    assert "other arguments" in capsys.readouterr().err
    assert state.read_text() == json.dumps({"fingerprint": {"threshold": 0.5}})     # left as it was


@pytest.mark.parametrize("argv, names", [
    (["/nonexistent/ck", "--calibration", "passkey", "--lengths", "4k"], "CHECKPOINT"),
    (["default", "--calibration", "passkey", "--lengths", "4x"], "--lengths"),
    (["default", "--calibration", "passkey", "--lengths", "1"], "--lengths"),
    (["default", "--calibration", "passkey", "--lengths", "40"], "--lengths 40"),   # too short for a prompt
    (["default", "--calibration", "/nonexistent.txt", "--lengths", "4k"], "--calibration"),
    (["default", "--calibration", "passkey", "--lengths", "4k", "--threshold", "1.5"], "--threshold"),
    (["default", "--calibration", "passkey", "--lengths", "4k", "--threshold", "0"], "--threshold"),
    (["default", "--calibration", "passkey", "--lengths", "4k", "--max-rounds", "0"], "--max-rounds"),
    (["default", "--calibration", "passkey", "--lengths", "4k", "--step-vertical", "-1"], "--step-vertical"),
    (["default", "--calibration", "passkey", "--lengths", "4k", "--step-vertical", "0", "--step-slash", "0"],
     "--step-vertical"),
    (["default", "--calibration", "passkey", "--lengths", "4k", "--start", "/nonexistent.json"], "--start"),
    (["default", "--calibration", "passkey", "--lengths", "4k", "--aggregate", "median"], "--aggregate"),
    (["default", "--calibration", "passkey", "--lengths", "4k", "--out", "/nonexistent/dir/x.json"], "--out"),
])
def test_bad_arguments_exit_2_naming_them(argv, names, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv + ["--no-progress"]) == 2
    assert names in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []                          # nothing written


def test_bad_start_file_and_short_calibration_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"0": ["vertical_and_slash", -1, 5, 0]}]))
    assert main(["default", "--calibration", "passkey", "--lengths", "300", "--start", str(bad),
                 "--no-progress"]) == 2
    assert "--start" in capsys.readouterr().err
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps(list(range(100))))
    assert main(["default", "--calibration", str(ids), "--lengths", "300", "--no-progress"]) == 2
    assert "100 tokens" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:                           # argparse: a required option missing
        main(["default", "--lengths", "300"])
    assert e.value.code == 2


def test_recall_stats_aggregate_and_round_trip():
    """Mean = numpy's mean; the quantile is the lower edge of the bin holding numpy's quantile (so
    within 1/BINS below it); the JSON round trip is exact (the resume relies on it)."""
    rng = np.random.default_rng(0)
    r = rng.uniform(0.2, 1.0, size=(2, 501, 3))
    r[1, :, 2] = 1.0
    st = RecallStats.zeros(2, 3)
    st.add(np.log(r[:, :200]))
    st.add(np.log(r[:, 200:]))
    assert np.allclose(aggregate(st, "mean"), r.mean(axis=1), rtol=0, atol=1e-12)   # float64 sums
    q = aggregate(st, "q0.1")
    # numpy's "inverted_cdf" quantile is the smallest value whose CDF reaches 0.1, as the histogram's
    want = np.quantile(r, 0.1, axis=1, method="inverted_cdf")
    assert (q <= want + 1e-12).all() and (want - q < 1.0 / BINS + 1e-12).all()
    assert q[1, 2] == 1.0
    back = RecallStats.from_json(json.loads(json.dumps(st.to_json())))
    assert np.array_equal(back.sums, st.sums) and np.array_equal(back.hist, st.hist)


def test_raise_budgets_steps_quirk_and_cap():
    budgets = (((30, 800), (1000, 6096), (5000, 5000)),)
    scores = np.array([[0.5, 0.99, 0.1]])
    new, raised = raise_budgets(budgets, scores, 0.95, 2048, 2048, cap=4096)
    assert new == (((130 + 2048, 2848), (1000, 6096), (5000, 5000)),)       # capped head cannot gain
    assert raised.tolist() == [[True, False, False]]
    # an A-shape head keeps n_init = 30 as given (no quirk) and raises it by the step
    new, _ = raise_budgets(budgets, scores, 0.95, 2048, 2048, cap=4096,
                           patterns=(("a_shape", "vertical_and_slash", "vertical_and_slash"),))
    assert new[0][0] == (30 + 2048, 2848)


def test_prometheus_counts_sparse_and_dense_prefill_tokens():
    """zenjax_prefill_tokens_by_mode_total{mode} follows Engine.stats() from watch_engine on (the server
    calls it after its warm-up, whose dense tokens are not requests'), read at scrape time."""
    from prometheus_client import generate_latest
    from zenjax.serve.metrics import Metrics

    class _Engine:                                  # Engine.stats()'s contract: the two token counts
        counts = {"sparse_prefill_tokens": 0, "dense_prefill_tokens": 2304}       # 2304: the warm-up

        def stats(self):
            return dict(self.counts)

    def scrape(m):
        text = generate_latest(m.registry).decode()
        return {mode: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() for mode in ("sparse", "dense")
                if line.startswith(f'zenjax_prefill_tokens_by_mode_total{{mode="{mode}"}}')}

    m, e = Metrics(), _Engine()
    assert scrape(m) == {"sparse": 0.0, "dense": 0.0}
    m.watch_engine(e)
    e.counts = {"sparse_prefill_tokens": 40000, "dense_prefill_tokens": 2304 + 300}
    assert scrape(m) == {"sparse": 40000.0, "dense": 300.0}


def test_server_metrics_endpoint_counts_prefill_modes():
    """Through the server: its /metrics shows the engine's sparse / dense prompt tokens of requests (a
    paced engine double that prefills prompts longer than 4 tokens 'sparse'), not its warm-up's."""
    import socket

    import httpx
    from serve_doubles import PacedEngine
    from zenjax.serve.server import Server, ServerConfig

    class _Counting(PacedEngine):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.counts = {"sparse_prefill_tokens": 0, "dense_prefill_tokens": 0}

        def warmup(self):
            self.counts["dense_prefill_tokens"] += 256

        def prefill_next(self, slot):
            seq = self.seqs[slot]
            before = seq.prefilled
            out = super().prefill_next(slot)
            self.counts["sparse_prefill_tokens" if seq.prompt_len > 4 else "dense_prefill_tokens"] += \
                seq.prefilled - before
            return out

        def stats(self):
            return dict(self.counts)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        mport = s.getsockname()[1]
    server = Server(ServerConfig(port=0, http_port=0, max_batch=2, max_queue=2, metrics_port=mport),
                    engine=_Counting())
    server.start()
    try:
        for prompt in ([5, 6, 7], list(range(10, 110))):
            r = httpx.post(f"http://127.0.0.1:{server.http_port}/v1/completions",
                           json={"model": "embedded-default", "prompt": prompt, "max_tokens": 2})
            assert r.status_code == 200
        text = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics").text
        assert 'zenjax_prefill_tokens_by_mode_total{mode="sparse"} 100.0' in text
        assert 'zenjax_prefill_tokens_by_mode_total{mode="dense"} 3.0' in text
    finally:
        server.drain(0)


def test_per_head_recall_at_qwen_head_layout(tmp_path):
    """28 q / 4 kv heads (GQA 7), random weights, 600 tokens (DCA s = 224; the last piece does not fill a
    block): a head's recall depends only on its own budget. The two heads given budgets beyond every
    key have recall 1 within float32 summation rounding (2 (S - 1) u, as above); every small-budget head
    loses mass; the written file keeps each global head id's pattern, budgets and score."""

    import jax
    import jax.numpy as jnp
    from zenjax.config import DCAConfig, ModelConfig, engine_config
    from zenjax.engine import Engine
    from zenjax.model import init_params

    cfg = ModelConfig(vocab_size=300, hidden_size=224, intermediate_size=64, num_layers=2, num_heads=28,
                      num_kv_heads=4, head_dim=8, rope_theta=1e4, rms_norm_eps=1e-6, tie_word_embeddings=True,
                      max_position_embeddings=4096, dca=DCAConfig(256, 32, 256))
    params = init_params(cfg, jax.random.key(0), jnp.float32, scale=0.2)
    ec = engine_config(max_model_len=600, prefill_chunk=128, attention="reference", dtype="float32")
    engine = Engine(cfg, params, ec, verbose=False)
    S = 600
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([int(t) for t in np.random.RandomState(1).randint(0, 300, S)]))
    full = {(0, 27), (1, 13)}
    start = [{str(h): ["vertical_and_slash", *((1000, 1000) if (l, h) in full else (8, 8)), 0.0]
              for h in range(28)} for l in range(2)]
    start[0]["3"][0] = "a_shape"                                  # patterns pass through (spec 3.1)
    (tmp_path / "start.json").write_text(json.dumps(start))
    rc = refine_config(None, str(ids), [S], tmp_path / "out.json", start=str(tmp_path / "start.json"),
                       max_rounds=1)
    rep = refine(rc, progress=False, engine=engine)
    rec = np.asarray(rep["rounds"][0]["recall"])                   # [2, 28]
    assert engine.prefill_plan(S)[-1] == (576, 600)
    for l, h in full:
        assert abs(rec[l, h] - 1) <= 2 * (S - 1) * F32_U
    small = np.ones_like(rec, bool)
    small[tuple(zip(*full))] = False
    assert rec[small].max() < 0.999
    entries = json.loads(rc.out.read_text())
    assert [sorted(map(int, e)) for e in entries] == [list(range(28))] * 2
    assert entries[1]["13"][1:3] == [1000, 1000] and entries[0]["5"][1:3] == [8, 8]
    assert entries[0]["3"][0] == "a_shape" and entries[0]["4"][0] == "vertical_and_slash"
