"""Serving latency on one engine (issues #11, #12): inter-token latency of a chat during a long prefill,
prefix KV reuse, and server-level throughput / TTFT. Qwen2.5-7B-Instruct-1M shape, random bf16 weights,
DCA on; one model build and one warm-up shared by every part; JSON lines on stdout.

    PYTHONPATH=. python3 benchmarks/serve_latency.py                     # GPU, ~4-5 min with compile
    PYTHONPATH=. python3 benchmarks/serve_latency.py --tiny              # CPU check that it runs
    PYTHONPATH=. python3 benchmarks/serve_latency.py --long 131072 --parts itl,reuse,server

Parts (each drives zenjax.serve.scheduler.Scheduler in this process, with the engine's real steps):
  itl     a `--long`-token prompt alone (TTFT), then the same length alongside a chat (200-token prompt,
          generating until the long prompt's first token): the chat's inter-token gaps p50/p99/max while
          the long prompt prefilled and the long prompt's TTFT, with max_itl_ms = --max-itl-ms and = 0
          (unbounded: one full prefill piece per decode step), each with the piece and the chat's decode
          step in one call (`fused`, engine.prefill_and_decode) and as two; `pieces`: prefill steps by
          bucket (zenjax_prefill_pieces_total; alongside, the chat's one 256 piece is among them)
  reuse   a document of --long - 64 tokens + a 32-token question: cold TTFT, then the same document with
          another question: TTFT with prefix reuse, and the greedy tokens of both ways compared with a
          cold run of the second prompt (they must be equal)
  server  through zenjax.serve.service.Service (request preparation + scheduler, as both front ends use
          it): 4 streams x 256 tokens at once (tokens/s in all), and the TTFT of a 200-token prompt
          (median of 5)
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import threading
import time

import numpy as np

from zenjax.sampling import SamplingParams
from zenjax.serve.metrics import Metrics
from zenjax.serve.scheduler import Delta, Failed, Finished, Request, Scheduler


class Recorder:
    """A Request.events sink that timestamps every event (monotonic clock) as the scheduler puts it."""

    def __init__(self):
        self.items: list[tuple[float, object]] = []
        self.done = threading.Event()

    def put(self, ev) -> None:
        self.items.append((time.monotonic(), ev))
        if isinstance(ev, (Finished, Failed)):
            self.done.set()

    def token_times(self) -> list[float]:
        return [t for t, ev in self.items if isinstance(ev, Delta)]

    def tokens(self) -> list[int]:
        return [ev.token_ids[0] for _, ev in self.items if isinstance(ev, Delta)]

    def failed(self):
        return next((ev for _, ev in self.items if isinstance(ev, Failed)), None)


def build_engine(a):
    import jax.numpy as jnp

    from benchmarks.common import QWEN25_7B_1M, SMOKE, random_params
    from zenjax.config import engine_config
    from zenjax.engine import Engine
    cfg = SMOKE if a.tiny else QWEN25_7B_1M
    params = random_params(cfg, jnp.float32 if a.tiny else jnp.bfloat16)
    ec = engine_config(max_model_len=a.long + 1024, prefill_chunk=a.chunk, max_batch=4,
                       attention="reference" if a.tiny else a.attention,
                       dtype="float32" if a.tiny else "bfloat16", platform="any")
    return Engine(cfg, params, ec, verbose=False)


def ids_of(n: int, seed: int, vocab: int) -> list[int]:
    return [int(t) for t in np.random.RandomState(seed).randint(0, vocab, n)]


def submit(sch: Scheduler, name: str, ids, **sampling) -> tuple[Request, Recorder]:
    rec = Recorder()
    req = Request(name, ids, SamplingParams(**sampling), events=rec)
    sch.submit(req)
    return req, rec


def wait(rec: Recorder, timeout: float = 1800.0) -> None:
    if not rec.done.wait(timeout):
        raise TimeoutError("request did not finish")
    if rec.failed() is not None:
        raise RuntimeError(f"request failed: {rec.failed()}")


def pct(xs, q):
    return round(float(np.percentile(xs, q)) * 1000, 2) if xs else None


def run_scheduler(engine, **kw) -> Scheduler:
    sch = Scheduler(engine, max_queue=16, metrics=Metrics(), **kw)
    sch.start()
    return sch


ROWS: list[dict] = []


def emit(row: dict) -> None:
    ROWS.append(row)
    print(json.dumps(row), flush=True)


def part_itl(engine, a) -> None:
    V = engine.config.vocab_size
    long_ids = ids_of(a.long, 1, V)
    sch = run_scheduler(engine, max_itl_ms=a.max_itl_ms)
    t0 = time.monotonic()
    _, rec = submit(sch, "long-alone", long_ids, max_new_tokens=1, ignore_eos=True)
    wait(rec)
    alone = rec.token_times()[0] - t0
    sch.stop()
    emit(dict(part="itl", case="long_alone", prompt_tokens=a.long, ttft_s=round(alone, 3),
              pieces=sch.metrics.piece_counts()))
    cases = list(itertools.product((a.max_itl_ms, 0.0), (True, False)))
    for budget, fuse in cases[:1] if a.itl_fused_only else cases:
        sch = run_scheduler(engine, max_itl_ms=budget, fuse=fuse)
        pieces = record_pieces(sch)
        chat_req, chat = submit(sch, "chat", ids_of(200, 2, V), max_new_tokens=a.long, ignore_eos=True)
        while not chat.token_times():                 # the chat is decoding before the long prompt arrives
            time.sleep(0.001)
        t0 = time.monotonic()
        _, rec = submit(sch, "long", ids_of(a.long, 3, V), max_new_tokens=1, ignore_eos=True)
        wait(rec)
        t_first = rec.token_times()[0]
        chat_req.cancel()
        wait(chat)
        sch.stop()
        times = [t for t in chat.token_times() if t0 <= t <= t_first]
        gaps = [b - a_ for a_, b in zip(times, times[1:])]
        emit(dict(part="itl", case="long_with_chat", max_itl_ms=budget, fused=sch.fuse, prompt_tokens=a.long,
                  ttft_s=round(t_first - t0, 3), ttft_vs_alone=round((t_first - t0) / alone, 3),
                  chat_tokens_during_prefill=len(times), itl_p50_ms=pct(gaps, 50), itl_p99_ms=pct(gaps, 99),
                  itl_max_ms=round(max(gaps) * 1000, 2) if gaps else None,
                  gaps_over_budget=sum(g * 1000 > budget for g in gaps) if budget else None,
                  pieces=sch.metrics.piece_counts(), worst_piece_overruns=overruns(pieces)))


def record_pieces(sch: Scheduler) -> list[tuple]:
    """(bucket, end, seconds, the scheduler's estimate before it ran) of every dense prefill piece (fused
    with a decode step where the scheduler fuses)."""
    cost, log = (sch.fused_cost if sch.fuse else sch.prefill_cost)[False], []
    add = cost.add

    def logged(size, context, seconds):
        log.append((size, context, seconds, cost.bound(size, context)))
        add(size, context, seconds)
    cost.add = logged
    return log


def overruns(log: list[tuple], n: int = 5) -> list[dict]:
    """The n pieces that took longest relative to their estimate (where the ITL budget was missed)."""
    rows = [dict(bucket=b, end=e, ms=round(t * 1000, 1), est_ms=round(est * 1000, 1), ratio=round(t / est, 2))
            for b, e, t, est in log if est]
    return sorted(rows, key=lambda r: -r["ratio"])[:n]


def part_reuse(engine, a) -> None:
    V = engine.config.vocab_size
    doc = ids_of(a.long - 64, 4, V)
    q1, q2 = ids_of(32, 5, V), ids_of(32, 6, V)
    greedy = dict(max_new_tokens=8, ignore_eos=True)
    for slot in range(engine.max_batch):              # slots hold nothing of the document yet
        engine.release(slot, keep=False)
    sch = run_scheduler(engine, max_itl_ms=a.max_itl_ms, reuse_min=a.reuse_min)
    rows = {}
    for name, ids in (("cold", doc + q1), ("reused", doc + q2)):
        t0 = time.monotonic()
        req, rec = submit(sch, name, ids, **greedy)
        wait(rec)
        rows[name] = (rec.token_times()[0] - t0, req.reused, rec.tokens())
    sch.stop()
    sch = run_scheduler(engine, max_itl_ms=a.max_itl_ms, reuse_min=0)
    t0 = time.monotonic()
    req, rec = submit(sch, "check", doc + q2, **greedy)
    wait(rec)
    sch.stop()
    cold2 = (rec.token_times()[0] - t0, rec.tokens())
    emit(dict(part="reuse", document_tokens=len(doc), cold_ttft_s=round(rows["cold"][0], 3),
              reused_ttft_s=round(rows["reused"][0], 3), reused_tokens=rows["reused"][1],
              speedup=round(rows["cold"][0] / rows["reused"][0], 1), cold_second_ttft_s=round(cold2[0], 3),
              greedy_equal_to_cold=rows["reused"][2] == cold2[1], stats=engine.stats()))


def part_server(engine, a) -> None:
    from zenjax.serve.service import ServerConfig, Service
    V = engine.config.vocab_size
    svc = Service(ServerConfig(max_batch=engine.max_batch, max_itl_ms=a.max_itl_ms), engine=engine)
    engine.warmup = lambda: None                      # warmed up once in main()
    try:
        svc.load()
        recs = []
        t0 = time.monotonic()
        for i in range(4):
            rec = Recorder()
            req = svc.prepare(ids_of(128, 10 + i, V), dict(max_new_tokens=a.stream_tokens, ignore_eos=True),
                              f"s{i}", events=rec)
            svc.submit(req)
            recs.append(rec)
        for rec in recs:
            wait(rec)
        dt = max(rec.token_times()[-1] for rec in recs) - t0
        n = sum(len(rec.token_times()) for rec in recs)
        emit(dict(part="server", case="4_streams", tokens=n, seconds=round(dt, 3), tokens_per_s=round(n / dt, 1)))
        ttfts = []
        for i in range(5):
            rec = Recorder()
            t0 = time.monotonic()
            req = svc.prepare(ids_of(200, 20 + i, V), dict(max_new_tokens=1), f"t{i}", events=rec, arrival=t0)
            svc.submit(req)
            wait(rec)
            ttfts.append(rec.token_times()[0] - t0)
        emit(dict(part="server", case="ttft_200", ttft_ms_median=round(float(np.median(ttfts)) * 1000, 2),
                  ttft_ms=[round(t * 1000, 2) for t in ttfts]))
    finally:
        del engine.warmup
        svc.stop()


PARTS = {"itl": part_itl, "reuse": part_reuse, "server": part_server}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU (checks the script runs)")
    ap.add_argument("--long", type=int, default=None, help="long prompt tokens (default 131072; --tiny: 1500)")
    ap.add_argument("--chunk", type=int, default=None, help="prefill_chunk (default 8192; --tiny: 256)")
    ap.add_argument("--attention", default="pallas")
    ap.add_argument("--max-itl-ms", type=float, default=100.0)
    ap.add_argument("--reuse-min", type=int, default=256)
    ap.add_argument("--itl-fused-only", action="store_true",
                    help="itl: only the fused case at --max-itl-ms (not separate calls, not unbounded)")
    ap.add_argument("--stream-tokens", type=int, default=None, help="tokens per stream (default 256; --tiny 32)")
    ap.add_argument("--parts", default="itl,reuse,server")
    a = ap.parse_args(argv)
    bad = [p for p in a.parts.split(",") if p not in PARTS]
    if bad:
        ap.error(f"--parts: unknown {bad}; choose from {sorted(PARTS)}")
    a.long = a.long or (1500 if a.tiny else 131072)
    a.chunk = a.chunk or (256 if a.tiny else 8192)
    a.stream_tokens = a.stream_tokens or (32 if a.tiny else 256)
    if a.long < 300:
        ap.error(f"--long={a.long} must be >= 300")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    t = time.monotonic()
    engine = build_engine(a)
    emit(dict(part="setup", build_s=round(time.monotonic() - t, 1), cache_len=engine.cache_len,
              buckets=list(engine.prefill_buckets)))
    t = time.monotonic()
    engine.warmup()
    emit(dict(part="setup", warmup_s=round(time.monotonic() - t, 1)))
    for p in a.parts.split(","):
        PARTS[p](engine, a)
    out = os.environ.get("OUT")
    if out:                                           # the device runner's result folder
        with open(os.path.join(out, "serve_latency.json"), "w") as f:
            json.dump(ROWS, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
