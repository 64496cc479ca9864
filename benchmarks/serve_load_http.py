"""Load test of the OpenAI-compatible HTTP API: many concurrent clients, mixed prompts, some
disconnecting midway. The HTTP twin of benchmarks/serve_load.py (same requests, same checks).

    .venv/bin/python benchmarks/serve_load_http.py                 # starts a server on the embedded model
    .venv/bin/python benchmarks/serve_load_http.py --clients 64 --server-args "--max-batch 4"

What it does (`run_load_http`), all on loopback:
    1. reference: each distinct request (token-id prompt x sampling, ignore_eos so the length is known)
       alone through POST /v1/completions, streaming; its text is what it must produce under load;
    2. rounds: `clients` threads start together; client i sends distinct request i % n_distinct (neighbours
       differ, so a mixed-up stream cannot match); every `cancel_every`-th client closes its connection
       after two text chunks (the server must cancel it and free the slot);
    3. checks: every other stream ends with finish_reason "length", usage.completion_tokens ==
       max_tokens, `data: [DONE]`, and exactly its reference text; no request fails; the server is idle
       after each round (metrics) and still answers; its RSS after the last round is within `rss_margin`
       of its RSS after round 1;
    4. reports requests/s and client-side p50/p99 time to first text chunk per round.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import threading
import time

import httpx
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.serve_load import (ServerProcess, _wait_idle, add_load_args, free_port, load_kwargs,  # noqa: E402
                                   make_requests, rss_of_pid, server_env, write_report)


def _body(model, ids, sampling) -> dict:
    b = {"model": model, "prompt": ids, "max_tokens": sampling["max_new_tokens"], "stream": True,
         "stream_options": {"include_usage": True}, "ignore_eos": True}
    for k in ("temperature", "top_p", "seed"):
        if k in sampling:
            b[k] = sampling[k]
    return b


def _one(http: httpx.Client, url: str, model: str, ids, sampling, cancel_after: int | None, barrier,
         timeout: float) -> dict:
    if barrier is not None:
        barrier.wait()
    t0 = time.monotonic()
    out = {"text": "", "chunks": 0, "ttft_s": None, "reason": None, "tokens": None, "done": False,
           "error": None, "cancelled": False}
    with http.stream("POST", url, json=_body(model, ids, sampling), timeout=timeout) as r:
        if r.status_code != 200:
            out["error"] = f"HTTP {r.status_code}: {r.read().decode()[:300]}"
            return out
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                out["done"] = True
                break
            ev = json.loads(data)
            if "error" in ev:
                out["error"] = ev["error"]["message"]
                break
            if ev.get("usage"):
                out["tokens"] = ev["usage"]["completion_tokens"]
            for c in ev.get("choices") or ():
                if c.get("text"):
                    if out["ttft_s"] is None:
                        out["ttft_s"] = time.monotonic() - t0
                    out["text"] += c["text"]
                    out["chunks"] += 1
                if c.get("finish_reason"):
                    out["reason"] = c["finish_reason"]
            if cancel_after is not None and out["chunks"] >= cancel_after:
                out["cancelled"] = True
                break                       # leaving the block closes the connection mid-stream
    out["total_s"] = time.monotonic() - t0
    return out


def run_load_http(base_url: str, *, clients: int = 64, rounds: int = 2, n_distinct: int = 16, short_len: int = 24,
                  long_len: int = 400, max_new_tokens: int = 16, cancel_every: int = 8, seed: int = 0,
                  timeout: float = 600.0, server_pid: int | None = None, metrics_port: int | None = None,
                  rss_margin: float = 0.10, rss_slack_bytes: int = 32 * 2**20) -> dict:
    """base_url: http://HOST:PORT/v1. Returns a report dict; raises AssertionError on a broken guarantee."""
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    with httpx.Client(limits=limits) as http:
        model = http.get(base_url + "/models", timeout=timeout).json()["data"][0]
        assert long_len + max_new_tokens <= model["max_model_len"], "long_len + max_new_tokens > max_model_len"
        url = base_url + "/completions"
        # token-id prompts below 1000 are valid for any Qwen2 tokenizer, the embedded one included
        reqs = make_requests(min(n_distinct, clients), 1000, short_len, long_len, max_new_tokens, seed)
        refs = []
        for ids, sampling in reqs:
            r = _one(http, url, model["id"], ids, sampling, None, None, timeout)
            assert r["error"] is None and r["reason"] == "length" and r["done"], f"reference failed: {r}"
            refs.append(r["text"])
        report = {"transport": "http", "clients": clients, "distinct_requests": len(reqs),
                  "max_new_tokens": max_new_tokens, "cancel_every": cancel_every, "rounds": []}
        rss = []
        for _ in range(rounds):
            barrier = threading.Barrier(clients)
            results: list[dict | None] = [None] * clients

            def worker(i):
                ids, sampling = reqs[i % len(reqs)]
                cancel = 2 if cancel_every and i % cancel_every == cancel_every - 1 else None
                try:
                    results[i] = _one(http, url, model["id"], ids, sampling, cancel, barrier, timeout)
                except Exception as e:  # a harness bug must show, not hang
                    results[i] = {"error": f"{type(e).__name__}: {e}", "cancelled": False}

            threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
            t0 = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout + 60)
            wall = time.monotonic() - t0
            completed = cancelled = 0
            ttfts = []
            for i, r in enumerate(results):
                assert r is not None, f"client {i}: never finished (stream lost)"
                assert r["error"] is None, f"client {i}: {r['error']}"
                if r["cancelled"]:
                    cancelled += 1
                    continue
                assert r["done"] and r["reason"] == "length", f"client {i}: {r}"
                assert r["tokens"] == max_new_tokens, f"client {i}: {r['tokens']} tokens, expected {max_new_tokens}"
                assert r["text"] == refs[i % len(reqs)], \
                    f"client {i}: text differs from the same request alone (mixed streams?)\n" \
                    f"  got  {r['text']!r}\n  want {refs[i % len(reqs)]!r}"
                completed += 1
                ttfts.append(r["ttft_s"])
            _wait_idle(metrics_port, timeout=60)
            if server_pid is not None:
                rss.append(rss_of_pid(server_pid))
            report["rounds"].append({
                "completed": completed, "cancelled": cancelled, "wall_s": round(wall, 3),
                "requests_per_s": round(completed / wall, 3),
                "ttft_p50_s": round(float(np.percentile(ttfts, 50)), 4),
                "ttft_p99_s": round(float(np.percentile(ttfts, 99)), 4)})
        after = _one(http, url, model["id"], *reqs[0], None, None, timeout)
        assert after["text"] == refs[0], "server output changed after the load"
    if len(rss) >= 2:
        report["rss_bytes"] = rss
        limit = rss[0] * (1 + rss_margin) + rss_slack_bytes
        report["rss_limit_bytes"] = int(limit)
        assert rss[-1] <= limit, f"server RSS grew from {rss[0] / 2**20:.1f} to {rss[-1] / 2**20:.1f} MiB"
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_load_args(ap)
    a = ap.parse_args(argv)
    mport = free_port()
    server = ServerProcess([*shlex.split(a.server_args), "--metrics-port", str(mport), "--http-port", "0",
                            "--max-queue", str(max(64, a.clients))], env=server_env(platform=None))
    try:
        report = run_load_http(server.http_url, **load_kwargs(a), server_pid=server.proc.pid, metrics_port=mport)
    finally:
        rc = server.stop()
        print(f"server exit code after SIGTERM: {rc}", file=sys.stderr)
    write_report(report, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
