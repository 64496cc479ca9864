"""The server process: `python -m zenjax.serve` = one Service (zenjax/serve/service.py) behind gRPC
(zenjax/serve/grpc_api.py) and/or OpenAI-compatible HTTP (zenjax/serve/http_api.py), on one engine.

Walk of a server's life (`serve(config)`):
    1. bind the front ends: gRPC with Health = NOT_SERVING, HTTP with /health = 503 (requests answer
       UNAVAILABLE / 503 meanwhile)
    2. load the engine (`zenjax.load`) and warm it up: one tiny generation through the slot API compiles
       every step function the scheduler will call, so the first real request pays no compile time
    3. start the scheduler thread (zenjax/serve/scheduler.py); Health = SERVING, /health = 200
    4. SIGTERM/SIGINT -> drain: health NOT_SERVING / 503, stop admitting (queued requests get
       UNAVAILABLE / 503), let running streams finish for --grace-seconds, then end the rest with finish
       reason cancelled, stop the front ends, exit 0. A second signal during the drain exits at once
       with status 1 (an operator who signals twice wants it gone).

Threads: gRPC handler threads and the HTTP event loop only decode, wait and encode; tokenization runs
in the Service's prep pool; the scheduler thread is the only caller of the engine's slot API (the
engine is not thread-safe).
"""
from __future__ import annotations

import os
import signal
import threading

from zenjax.serve.grpc_api import BadRequest, GrpcFrontend, sampling_from_proto  # noqa: F401 (re-exported)
from zenjax.serve.metrics import log_event, setup_logging
from zenjax.serve.service import ServerConfig, Service, config_from_args, parse_dca  # noqa: F401


class Server:
    """One server instance; `serve()` drives it from the main thread, tests may drive it directly."""

    def __init__(self, config: ServerConfig, engine=None):
        self.config = config
        self.service = Service(config, engine)
        self.grpc = GrpcFrontend(self.service) if config.grpc else None
        self.http = None
        if config.http_port is not None:
            from zenjax.serve.http_api import HttpFrontend
            self.http = HttpFrontend(self.service)
        self.metrics_port: int | None = None

    @property
    def engine(self):
        return self.service.engine

    @property
    def port(self) -> int | None:
        return self.grpc.port if self.grpc is not None else None

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http is not None else None

    def start(self) -> None:
        """Bind and start answering (not ready), then load, warm up and go ready."""
        c = self.config
        if self.grpc is not None:
            self.grpc.start()
        if self.http is not None:
            self.http.start()
        if c.metrics_port:
            self.metrics_port = self.service.metrics.start_http(c.metrics_port)
            log_event("metrics", address=f"127.0.0.1:{self.metrics_port}")
        s = self.service
        s.load()
        if self.grpc is not None:
            self.grpc.serving()
        ec = s.engine.engine_config
        log_event("ready", load_s=s.load_s, warmup_s=s.warmup_s, max_batch=ec.max_batch,
                  max_model_len=ec.max_model_len, prefill_chunk=ec.prefill_chunk, attention=ec.attention,
                  kv_cache_bytes=self.grpc.info.kv_cache.total_bytes if self.grpc is not None else None,
                  model=s.model_name)

    def drain(self, grace_s: float) -> None:
        """Stop admitting, give running streams grace_s to finish, cancel the rest, stop the front ends."""
        log_event("draining", grace_s=grace_s)
        if self.grpc is not None:
            self.grpc.not_serving()
        self.service.drain(grace_s)
        # handlers return right after their Finished event; give them a moment to flush it
        if self.grpc is not None:
            self.grpc.stop(grace=5)
        if self.http is not None:
            self.http.stop()
        self.service.stop()
        self.service.metrics.stop_http()
        log_event("stopped")


def serve(config: ServerConfig, engine=None) -> int:
    """Run a server until SIGTERM/SIGINT, then drain; returns the exit code (0). A second signal during
    the drain ends the process at once with status 1."""
    setup_logging(config.log_level)
    stop = threading.Event()

    def on_signal(signum, _frame):
        log_event("signal", signal=signal.Signals(signum).name)
        if stop.is_set():
            log_event("forced_exit", reason="second signal during drain", exit_code=1)
            os._exit(1)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    server = Server(config, engine)
    server.start()
    while not stop.wait(0.5):
        pass
    server.drain(config.grace_seconds)
    return 0


def main(argv=None) -> int:
    config = config_from_args(argv)
    if config.distributed.enabled:            # several processes: 0 serves, the others follow its steps
        from zenjax.distributed import follow_server, initialize
        initialize(config.distributed)
        if not config.distributed.is_leader:
            return follow_server(config)
    return serve(config)
