"""benchmarks/serve_load.py at CI size: concurrent clients (more than slots + queue can hold at once is
not the point here; the queue is sized for them), mixed short/long prompts, greedy and seeded sampling,
some streams cancelled midway. `run_load` asserts the guarantees itself (right token count, streams equal
to the same request alone, server idle afterwards, RSS flat between rounds); see its docstring."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("serve_load", ROOT / "benchmarks" / "serve_load.py")
serve_load = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve_load)


# the shapes of tests/test_serve.py's servers, so the session's compilation cache is reused
SHAPE_ARGS = ["--max-batch", "2", "--max-model-len", "1024", "--prefill-chunk", "16"]


@pytest.mark.slow
def test_serve_load_small(tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "zenjax-jax-cache"
    cache.mkdir(exist_ok=True)
    mport = serve_load.free_port()
    srv = serve_load.ServerProcess([*SHAPE_ARGS, "--max-queue", "16", "--metrics-port", str(mport)],
                                   env=serve_load.server_env(cache))
    try:
        report = serve_load.run_load(srv.target, clients=12, rounds=2, n_distinct=6, short_len=8, long_len=120,
                                     max_new_tokens=6, cancel_every=4, server_pid=srv.proc.pid,
                                     metrics_port=mport, timeout=120)
    finally:
        rc = srv.stop()
    assert rc == 0
    for r in report["rounds"]:
        assert r["completed"] == 9 and r["cancelled"] == 3       # clients 3, 7, 11 cancel after 2 tokens
        assert r["requests_per_s"] > 0 and r["ttft_p99_s"] >= r["ttft_p50_s"] > 0
    assert len(report["rss_bytes"]) == 2


@pytest.mark.slow
def test_serve_load_http_small(tmp_path_factory):
    """benchmarks/serve_load_http.py at CI size: the same guarantees over the OpenAI-compatible API
    (text equal to the request alone, usage, [DONE]; disconnecting clients cancelled; idle; RSS flat)."""
    spec = importlib.util.spec_from_file_location("serve_load_http", ROOT / "benchmarks" / "serve_load_http.py")
    load_http = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load_http)
    cache = tmp_path_factory.getbasetemp() / "zenjax-jax-cache"
    cache.mkdir(exist_ok=True)
    mport = serve_load.free_port()
    srv = serve_load.ServerProcess([*SHAPE_ARGS, "--max-queue", "16", "--metrics-port", str(mport),
                                    "--http-port", "0"], env=serve_load.server_env(cache))
    try:
        report = load_http.run_load_http(srv.http_url, clients=12, rounds=2, n_distinct=6, short_len=8,
                                         long_len=120, max_new_tokens=6, cancel_every=4, server_pid=srv.proc.pid,
                                         metrics_port=mport, timeout=120)
    finally:
        rc = srv.stop()
    assert rc == 0
    for r in report["rounds"]:
        assert r["completed"] == 9 and r["cancelled"] == 3       # clients 3, 7, 11 disconnect after 2 chunks
    assert len(report["rss_bytes"]) == 2
