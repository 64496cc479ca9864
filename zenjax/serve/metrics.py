"""Observability of the server: Prometheus metrics and structured (JSON lines) logs.

Metrics live in a registry of their own (not prometheus_client's global one), so several servers in
one process (tests) do not collide; `start_http(port)` exposes it on 127.0.0.1 only.

    zenjax_queue_depth                 requests waiting for a batch slot
    zenjax_running_sequences           requests holding a batch slot (prefilling or decoding)
    zenjax_kv_cache_reserved_ratio     slots reserved / max_batch (reservation: a slot owns max_model_len)
    zenjax_kv_cache_used_ratio         tokens in the cache / (max_batch * max_model_len)
    zenjax_time_to_first_token_seconds histogram, from receipt (queue included) to the first token
    zenjax_inter_token_latency_seconds histogram, between consecutive tokens of one request
    zenjax_prefill_tokens_per_second   throughput of the last prefill chunk
    zenjax_prefill_tokens_total        counter
    zenjax_prefill_pieces_total{bucket}  prefill steps by padded size (bucket): how the scheduler cut prompts
                                       to keep running streams within --max-itl-ms
    zenjax_reused_prompt_tokens_total  prompt tokens taken from a slot's cache instead of prefilled (prefix reuse)
    zenjax_generated_tokens_total      counter
    zenjax_requests_total{reason,status}  finished requests (reason: stop|length|cancelled|error|rejected;
                                       status: OK, CANCELLED, DEADLINE_EXCEEDED, INVALID_REQUEST, QUEUE_FULL,
                                       UNAVAILABLE, UNAUTHENTICATED, INTERNAL)
    zenjax_malformed_requests_total{transport}  bodies that are not a valid message (bad protobuf/UTF-8/JSON)
    zenjax_prefill_tokens_by_mode_total{mode}  prompt tokens prefilled sparse (vertical-slash) or dense: the
                                       engine's stats() read at scrape time, less its warm-up (watch_engine)
"""
from __future__ import annotations

import json
import logging
import sys
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.queue_depth = Gauge("zenjax_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.running = Gauge("zenjax_running_sequences", "Requests holding a batch slot", registry=r)
        self.kv_reserved = Gauge("zenjax_kv_cache_reserved_ratio",
                                 "Fraction of KV cache slots reserved by admitted requests", registry=r)
        self.kv_used = Gauge("zenjax_kv_cache_used_ratio",
                             "Fraction of KV cache token rows holding prompt or generated tokens", registry=r)
        self.ttft_hist = Histogram("zenjax_time_to_first_token_seconds",
                                   "Time from request receipt to its first token", buckets=_LATENCY_BUCKETS,
                                   registry=r)
        self.itl_hist = Histogram("zenjax_inter_token_latency_seconds",
                                  "Time between consecutive tokens of one request", buckets=_LATENCY_BUCKETS,
                                  registry=r)
        self.prefill_tps = Gauge("zenjax_prefill_tokens_per_second",
                                 "Prompt tokens per second of the last prefill chunk", registry=r)
        self.prefill_tokens = Counter("zenjax_prefill_tokens", "Prompt tokens prefilled", registry=r)
        self.prefill_pieces = Counter("zenjax_prefill_pieces", "Prefill steps, by padded step size",
                                      ["bucket"], registry=r)
        self.reused_tokens = Counter("zenjax_reused_prompt_tokens",
                                     "Prompt tokens whose KV cache was reused from a slot's previous sequence",
                                     registry=r)
        self.generated_tokens = Counter("zenjax_generated_tokens", "Tokens generated", registry=r)
        self.requests = Counter("zenjax_requests", "Finished requests", ["reason", "status"], registry=r)
        self.malformed = Counter("zenjax_malformed_requests", "Requests whose body is not a valid message",
                                 ["transport"], registry=r)
        self._prefill_modes = _PrefillModes()
        r.register(self._prefill_modes)
        self._http = None

    def watch_engine(self, engine) -> None:
        """Export engine.stats()' sparse / dense prefill tokens from now on (call after the warm-up)."""
        if hasattr(engine, "stats"):
            self._prefill_modes.base, self._prefill_modes.stats = dict(engine.stats()), engine.stats

    # called by the scheduler thread
    def prefill(self, tokens: int, seconds: float, bucket: int | None = None) -> None:
        self.prefill_tokens.inc(tokens)
        if bucket is not None:
            self.prefill_pieces.labels(bucket=str(int(bucket))).inc()
        if seconds > 0:
            self.prefill_tps.set(tokens / seconds)

    def piece_counts(self) -> dict[int, int]:
        """zenjax_prefill_pieces_total as {bucket: steps} (benchmarks read it in-process)."""
        return {int(smp.labels["bucket"]): int(smp.value) for fam in self.prefill_pieces.collect()
                for smp in fam.samples if smp.name.endswith("_total")}

    def reused(self, tokens: int) -> None:
        self.reused_tokens.inc(tokens)

    def ttft(self, seconds: float) -> None:
        self.ttft_hist.observe(seconds)

    def token(self, gap_s: float | None) -> None:
        self.generated_tokens.inc()
        if gap_s is not None:
            self.itl_hist.observe(gap_s)

    def finished(self, reason: str, status: str) -> None:
        self.requests.labels(reason=reason, status=status).inc()

    def gauges(self, *, waiting: int, running: int, reserved_slots: int, used_tokens: int, max_batch: int,
               max_model_len: int) -> None:
        self.queue_depth.set(waiting)
        self.running.set(running)
        self.kv_reserved.set(reserved_slots / max_batch)
        self.kv_used.set(used_tokens / (max_batch * max_model_len))

    def start_http(self, port: int) -> int:
        """Serve /metrics on 127.0.0.1:port; returns the bound port."""
        server, _thread = start_http_server(port, addr="127.0.0.1", registry=self.registry)
        self._http = server
        return server.server_port

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _PrefillModes:
    """Collector of zenjax_prefill_tokens_by_mode_total: Engine.stats() counts, so the engine stays the one
    place that knows which prompts were prefilled sparse."""

    def __init__(self):
        self.stats, self.base = None, {}

    def collect(self):
        fam = CounterMetricFamily("zenjax_prefill_tokens_by_mode", "Prompt tokens prefilled, by attention "
                                  "mode (sparse: vertical-slash sparse prefill)", labels=["mode"])
        now = self.stats() if self.stats is not None else {}
        for mode in ("sparse", "dense"):
            key = f"{mode}_prefill_tokens"
            fam.add_metric([mode], now.get(key, 0) - self.base.get(key, 0))
        yield fam


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, event, plus the record's `fields` (see `log_event`)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(time.time(), 3), "level": record.levelname.lower()}
        fields = getattr(record, "fields", None)
        if fields:
            out.update(fields)
        else:
            out["event"] = "message"
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "INFO", stream=None) -> None:
    """JSON lines on stderr for the `zenjax.serve` logger, and for grpc's and uvicorn's own loggers so no
    plain-text traceback lands in the log (idempotent)."""
    for name, lvl in (("zenjax.serve", level.upper()), ("grpc", "WARNING"), ("uvicorn", "WARNING"),
                      ("uvicorn.error", "WARNING")):
        logger = logging.getLogger(name)
        logger.setLevel(lvl)
        logger.propagate = False
        for h in list(logger.handlers):
            if getattr(h, "_zenjax", False):
                logger.removeHandler(h)
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.setFormatter(JsonFormatter())
        handler._zenjax = True
        logger.addHandler(handler)


def log_event(event: str, level: int = logging.INFO, **fields) -> None:
    logging.getLogger("zenjax.serve").log(level, event, extra={"fields": {"event": event, **fields}})
