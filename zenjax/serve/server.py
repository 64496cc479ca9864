"""The gRPC server: `python -m zenjax.serve` (service zenjax.v1.Inference, see serve/zenjax/v1/zenjax.proto).

Walk of a server's life (`serve(config)`):
    1. bind host:port, start gRPC with Health = NOT_SERVING (Generate answers UNAVAILABLE meanwhile)
    2. load the engine (`zenjax.load`), warm it up: one tiny generation through the slot API compiles
       every step function the scheduler will call, so the first real request pays no compile time
    3. start the scheduler thread (zenjax/serve/scheduler.py), Health = SERVING
    4. wait for SIGTERM/SIGINT -> drain: Health = NOT_SERVING, stop admitting (queued requests get
       UNAVAILABLE), let running streams finish for --grace-seconds, then end the rest with finish
       reason CANCELLED, stop gRPC, exit 0.

Threads: gRPC handler threads validate and tokenize (host-only, the tokenizer is thread-safe) and then
only wait on their request's event queue; the scheduler thread is the only caller of the engine's slot
API (the engine is not thread-safe).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import queue
import signal
import threading
import time
import uuid
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from zenjax.sampling import SamplingError, SamplingParams
from zenjax.serve import zenjax_pb2 as pb
from zenjax.serve import zenjax_pb2_grpc as pb_grpc
from zenjax.serve.metrics import Metrics, log_event, setup_logging
from zenjax.serve.scheduler import (Delta, Failed, Finished, Progress, QueueFull, Request, Scheduler,
                                    ShuttingDown)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name   # "zenjax.v1.Inference"
DEFAULT_MAX_NEW_TOKENS = 256
MAX_MESSAGE_BYTES = 256 * 2**20       # a 1M-token prompt is ~4 MB as text or ids; gRPC's default is 4 MB
_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH,
           "cancelled": pb.FINISH_REASON_CANCELLED}


# ---------------------------------------------------------------- configuration
@dataclasses.dataclass(frozen=True)
class ServerConfig:
    checkpoint: str | None = None     # None: the embedded default model
    host: str = "127.0.0.1"
    port: int = 50051                 # 0: any free port (logged in the "listening" event)
    max_batch: int = 4
    max_model_len: int | None = None  # None: the engine's default for the checkpoint
    prefill_chunk: int | None = None  # None: 8192 on an accelerator, 256 on the CPU (see default_prefill_chunk)
    max_queue: int = 64
    metrics_port: int = 0             # 0: no metrics endpoint
    attention: str = "auto"
    grace_seconds: float = 30.0
    log_level: str = "INFO"
    dca: str = "auto"                 # auto (the checkpoint's), off, or "CHUNK,LOCAL,ORIGINAL_MAX"
    cache_dtype: str | None = None    # None: the model dtype; float8_e4m3fn halves the KV cache
    sparse: str = "auto"              # auto (the checkpoint's sparse_attention_config.json), off, or a PATH


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m zenjax.serve",
                                 description="Serve a zenjax model over gRPC (zenjax.v1.Inference).")
    d = ServerConfig()
    ap.add_argument("--checkpoint", default=None, help="converted checkpoint directory (default: embedded model)")
    ap.add_argument("--host", default=d.host, help="address to bind (default %(default)s)")
    ap.add_argument("--port", type=int, default=d.port, help="port (0: any free port; default %(default)s)")
    ap.add_argument("--max-batch", type=int, default=d.max_batch, help="decode slots (default %(default)s)")
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="prompt + generated tokens per request; each slot reserves this much KV cache")
    ap.add_argument("--prefill-chunk", type=int, default=None,
                    help="prompt tokens per prefill step (default: 8192 on GPU/TPU, 256 on CPU)")
    ap.add_argument("--max-queue", type=int, default=d.max_queue,
                    help="requests waiting for a slot before RESOURCE_EXHAUSTED (default %(default)s)")
    ap.add_argument("--metrics-port", type=int, default=d.metrics_port,
                    help="Prometheus /metrics on 127.0.0.1:PORT (0: off; default %(default)s)")
    ap.add_argument("--attention", default=d.attention, help="auto | reference | cudnn | pallas")
    ap.add_argument("--grace-seconds", type=float, default=d.grace_seconds,
                    help="on SIGTERM, how long running streams may finish (default %(default)s)")
    ap.add_argument("--log-level", default=d.log_level)
    ap.add_argument("--dca", default=d.dca,
                    help="Dual Chunk Attention: auto (as the checkpoint says), off, or CHUNK,LOCAL,ORIGINAL_MAX "
                         "to enable it on any Qwen2 checkpoint (e.g. 262144,8192,262144)")
    ap.add_argument("--cache-dtype", default=d.cache_dtype, help="KV cache dtype: bfloat16 | float8_e4m3fn")
    ap.add_argument("--sparse", default=d.sparse,
                    help="sparse vertical-slash prefill for prompts over the threshold: auto (the checkpoint's "
                         "sparse_attention_config.json if present and the attention implementation has a validated "
                         "sparse path), on (the checkpoint's file), off, or PATH to such a file")
    return ap


def config_from_args(argv=None) -> ServerConfig:
    """The one function that builds a ServerConfig; bad values exit with a usage error naming the flag."""
    ap = _parser()
    a = ap.parse_args(argv)
    checks = [("--port", 0 <= a.port <= 65535, "must be in [0, 65535]"),
              ("--max-batch", a.max_batch >= 1, "must be >= 1"),
              ("--max-model-len", a.max_model_len is None or a.max_model_len >= 2, "must be >= 2"),
              ("--prefill-chunk", a.prefill_chunk is None or a.prefill_chunk >= 1, "must be >= 1"),
              ("--max-queue", a.max_queue >= 0, "must be >= 0"),
              ("--metrics-port", 0 <= a.metrics_port <= 65535, "must be in [0, 65535]"),
              ("--grace-seconds", a.grace_seconds >= 0, "must be >= 0")]
    checks.append(("--dca", parse_dca(a.dca) is not None or a.dca in ("auto", "off"),
                   "must be auto, off or CHUNK,LOCAL,ORIGINAL_MAX (integers, LOCAL < CHUNK)"))
    checks.append(("--sparse", a.sparse in ("auto", "on", "off") or os.path.isfile(a.sparse),
                   "must be auto, on, off or an existing sparse_attention_config.json"))
    for flag, ok, why in checks:
        if not ok:
            ap.error(f"{flag}={getattr(a, flag[2:].replace('-', '_'))} {why}")
    return ServerConfig(checkpoint=a.checkpoint, host=a.host, port=a.port, max_batch=a.max_batch,
                        max_model_len=a.max_model_len, prefill_chunk=a.prefill_chunk, max_queue=a.max_queue,
                        metrics_port=a.metrics_port, attention=a.attention, grace_seconds=a.grace_seconds,
                        log_level=a.log_level, dca=a.dca, cache_dtype=a.cache_dtype, sparse=a.sparse)


def parse_dca(text: str):
    """"CHUNK,LOCAL,ORIGINAL_MAX" -> DCAConfig; None if it is not of that form."""
    from zenjax.config import ConfigError, DCAConfig
    try:
        return DCAConfig.parse(text)
    except ConfigError:
        return None


# ---------------------------------------------------------------- proto <-> engine
class BadRequest(ValueError):
    """INVALID_ARGUMENT; the message names the request field."""


def prompt_from_proto(msg, *, allow_ids: bool = True):
    """GenerateRequest/TokenizeRequest oneof `prompt` -> str | list[int] | list[dict] (engine form)."""
    which = msg.WhichOneof("prompt")
    if which is None:
        raise BadRequest("prompt: set one of text, token_ids or chat")
    if which == "text":
        if not msg.text:
            raise BadRequest("text: empty prompt")
        return msg.text
    if which == "token_ids":
        if not msg.token_ids.ids:
            raise BadRequest("token_ids.ids: empty prompt")
        return list(msg.token_ids.ids)
    if not msg.chat.messages:
        raise BadRequest("chat.messages: empty; a chat needs at least one message")
    return [{"role": m.role, "content": m.content} for m in msg.chat.messages]


def _field_error(prompt, e: Exception) -> str:
    """Prefix the engine's message with the proto field it refers to (chat.messages[i].role, ...)."""
    text = str(e)
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict) and text.startswith("messages"):
        return "chat." + text
    return text


def sampling_from_proto(sp, prompt_tokens: int, max_model_len: int) -> SamplingParams:
    """Proto SamplingParams -> engine SamplingParams; raises BadRequest naming `sampling.<field>`."""
    room = max_model_len - prompt_tokens
    kw = {}
    if sp.HasField("max_new_tokens"):
        n = sp.max_new_tokens
        if n < 1:
            raise BadRequest(f"sampling.max_new_tokens={n} must be >= 1")
        if n > room:
            raise BadRequest(f"sampling.max_new_tokens={n}: prompt tokens ({prompt_tokens}) + max_new_tokens "
                             f"exceed max_model_len={max_model_len} (at most {room} here)")
        kw["max_new_tokens"] = n
    else:
        kw["max_new_tokens"] = max(1, min(DEFAULT_MAX_NEW_TOKENS, room))
    for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed"):
        if sp.HasField(name):
            kw[name] = getattr(sp, name)
    kw["stop"] = tuple(sp.stop)
    kw["stop_token_ids"] = tuple(sp.stop_token_ids)
    kw["ignore_eos"] = sp.ignore_eos
    try:
        return SamplingParams(**kw)
    except SamplingError as e:
        raise BadRequest(f"sampling.{e}") from e


def model_info(engine, config: ServerConfig) -> pb.ModelInfoResponse:
    import jax.numpy as jnp
    import zenjax
    mc, ec = engine.config, engine.engine_config
    per_token = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * jnp.dtype(ec.cache_dtype).itemsize
    sparse = getattr(ec, "sparse", None) or getattr(engine, "sparse", None)
    info = pb.ModelInfoResponse(
        model=config.checkpoint or "embedded-default", zenjax_version=zenjax.__version__,
        architecture=pb.ModelArchitecture(
            name=mc.architecture, vocab_size=mc.vocab_size, hidden_size=mc.hidden_size,
            intermediate_size=mc.intermediate_size, num_layers=mc.num_layers, num_heads=mc.num_heads,
            num_kv_heads=mc.num_kv_heads, head_dim=mc.head_dim, rope_theta=mc.rope_theta,
            max_position_embeddings=mc.max_position_embeddings, tie_word_embeddings=mc.tie_word_embeddings),
        max_model_len=ec.max_model_len, prefill_chunk=ec.prefill_chunk, max_batch=ec.max_batch,
        max_queue=config.max_queue, attention=ec.attention,
        sparse_prefill=pb.SparsePrefill(enabled=bool(sparse), method=str(sparse) if sparse else ""),
        kv_cache=pb.KVCache(allocation="reservation", slots=ec.max_batch, tokens_per_slot=ec.max_model_len,
                            bytes_per_token=per_token, total_bytes=per_token * ec.max_batch * ec.max_model_len,
                            dtype=ec.cache_dtype),
        eos_token_ids=list(getattr(engine, "eos_token_ids", ()) or ()))
    if mc.dca is not None:
        info.dca.CopyFrom(pb.DualChunkAttention(
            chunk_size=mc.dca.chunk_size, local_size=mc.dca.local_size,
            original_max_position_embeddings=mc.dca.original_max_position_embeddings,
            chunk_len=mc.dca.chunk_len))
    return info


# ---------------------------------------------------------------- the service
class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, server: "Server"):
        self.s = server

    def _engine(self, context):
        if not self.s.ready.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, "model is loading / warming up; retry shortly")
        return self.s.engine

    def _reject(self, context, code, message, rid=""):
        log_event("request_rejected", logging.INFO, request_id=rid, status=code.name, message=message)
        self.s.metrics.finished("rejected", code.name)
        context.abort(code, message)

    def _prepare(self, engine, request):
        """Prompt -> ids and sampling -> SamplingParams (handler thread: host-only work)."""
        prompt = prompt_from_proto(request)
        try:
            ids = engine.encode_prompt(prompt)
        except ValueError as e:
            raise BadRequest(_field_error(prompt, e)) from e
        return ids, sampling_from_proto(request.sampling, len(ids), engine.engine_config.max_model_len)

    def Generate(self, request, context):
        arrival = time.monotonic()
        rid = request.request_id or uuid.uuid4().hex[:16]
        engine = self._engine(context)
        error = None
        try:
            ids, params = self._prepare(engine, request)
        except BadRequest as e:
            error = (grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Exception as e:   # e.g. a tokenizer failure: this request only
            log_event("request_error", logging.ERROR, request_id=rid, where="tokenize",
                      error=f"{type(e).__name__}: {e}")
            error = (grpc.StatusCode.INTERNAL, f"internal error while reading the prompt: {type(e).__name__}: {e}")
        if error is not None:
            self._reject(context, *error, rid)   # context.abort raises: nothing below runs
        req = Request(rid, ids, params, arrival=arrival)
        try:
            self.s.scheduler.submit(req)
        except QueueFull as e:
            self._reject(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(e), rid)
        except ShuttingDown as e:
            self._reject(context, grpc.StatusCode.UNAVAILABLE, str(e), rid)
        context.add_callback(req.cancel)      # client cancel / deadline / disconnect
        try:
            while True:
                try:
                    ev = req.events.get(timeout=1.0)
                except queue.Empty:
                    if not context.is_active():
                        return
                    continue
                if isinstance(ev, Progress):
                    yield pb.GenerateResponse(request_id=rid, progress=pb.PrefillProgress(
                        prefilled_tokens=ev.prefilled, prompt_tokens=ev.total))
                elif isinstance(ev, Delta):
                    yield pb.GenerateResponse(request_id=rid, delta=pb.TokenDelta(
                        text=ev.text, token_ids=list(ev.token_ids)))
                elif isinstance(ev, Finished):
                    u = ev.usage
                    yield pb.GenerateResponse(request_id=rid, finished=pb.Finished(
                        reason=_FINISH[ev.reason], usage=pb.Usage(
                            prompt_tokens=u.prompt_tokens, generated_tokens=u.generated_tokens,
                            time_to_first_token_s=u.ttft_s, queue_time_s=u.queue_s, total_time_s=u.total_s)))
                    return
                elif isinstance(ev, Failed):
                    context.abort(getattr(grpc.StatusCode, ev.code), ev.message)
        finally:
            req.cancel()                      # no-op when finished; frees the slot when the stream broke

    def Tokenize(self, request, context):
        engine = self._engine(context)
        tok = engine.tokenizer
        if tok is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this checkpoint has no tokenizer")
        which = request.WhichOneof("prompt")
        try:
            if which is None:
                raise BadRequest("prompt: set one of text or chat")
            if which == "text":
                ids = tok.encode(request.text)
            else:
                msgs = [{"role": m.role, "content": m.content} for m in request.chat.messages]
                try:
                    ids = tok.apply_chat_template(msgs, add_generation_prompt=True)
                except ValueError as e:
                    raise BadRequest("chat." + str(e) if str(e).startswith("messages") else str(e)) from e
        except BadRequest as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return pb.TokenizeResponse(token_ids=ids)

    def Detokenize(self, request, context):
        engine = self._engine(context)
        if engine.tokenizer is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this checkpoint has no tokenizer")
        V = engine.config.vocab_size
        bad = [i for i in request.token_ids if not 0 <= i < V]
        if bad:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"token_ids: {bad[:5]} outside [0, {V})")
        return pb.DetokenizeResponse(text=engine.tokenizer.decode(list(request.token_ids)))

    def ModelInfo(self, request, context):
        self._engine(context)
        return self.s.info


# ---------------------------------------------------------------- lifecycle
class Server:
    """One server instance; `serve()` drives it from the main thread, tests may drive it directly."""

    def __init__(self, config: ServerConfig, engine=None):
        self.config = config
        self.engine = engine
        self.scheduler: Scheduler | None = None
        self.info: pb.ModelInfoResponse | None = None
        self.metrics = Metrics()
        self.ready = threading.Event()
        self.port: int | None = None
        self.metrics_port: int | None = None
        workers = config.max_batch + config.max_queue + 16   # every streaming Generate holds one thread
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="zenjax-rpc"),
                                 options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                          ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
        self.health = health.HealthServicer()
        pb_grpc.add_InferenceServicer_to_server(InferenceServicer(self), self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._grpc)
        self._set_health(False)

    def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set("", status)
        self.health.set(SERVICE_NAME, status)

    def start(self) -> None:
        """Bind and start answering (NOT_SERVING), then load, warm up and go SERVING."""
        c = self.config
        address = f"{c.host}:{c.port}"
        self.port = self._grpc.add_insecure_port(address)
        if not self.port:
            raise OSError(f"cannot bind {address}")
        self._grpc.start()
        log_event("listening", address=f"{c.host}:{self.port}", pid=os.getpid())
        if c.metrics_port:
            self.metrics_port = self.metrics.start_http(c.metrics_port)
            log_event("metrics", address=f"127.0.0.1:{self.metrics_port}")
        t0 = time.monotonic()
        if self.engine is None:
            import zenjax
            kw = dict(max_batch=c.max_batch, attention=c.attention,
                      prefill_chunk=c.prefill_chunk or default_prefill_chunk())
            if c.max_model_len is not None:
                kw["max_model_len"] = c.max_model_len
            if c.dca != "auto":
                kw["dca"] = False if c.dca == "off" else parse_dca(c.dca)
            if c.cache_dtype:
                kw["cache_dtype"] = c.cache_dtype
            from zenjax.config import parse_sparse_choice
            kw["sparse"] = parse_sparse_choice(c.sparse)
            self.engine = zenjax.load(c.checkpoint, **kw)
        t1 = time.monotonic()
        warmup(self.engine)
        t2 = time.monotonic()
        self.info = model_info(self.engine, c)
        self.scheduler = Scheduler(self.engine, max_queue=c.max_queue, metrics=self.metrics,
                                   on_finish=_log_request)
        self.scheduler.start()
        self.ready.set()
        self._set_health(True)
        ec = self.engine.engine_config
        log_event("ready", load_s=round(t1 - t0, 3), warmup_s=round(t2 - t1, 3), max_batch=ec.max_batch,
                  max_model_len=ec.max_model_len, prefill_chunk=ec.prefill_chunk, attention=ec.attention,
                  kv_cache_bytes=self.info.kv_cache.total_bytes)

    def drain(self, grace_s: float) -> None:
        """Stop admitting, give running streams grace_s to finish, cancel the rest, stop gRPC."""
        log_event("draining", grace_s=grace_s)
        self._set_health(False)
        if self.scheduler is not None:
            self.scheduler.stop_admitting()
            deadline = time.monotonic() + grace_s
            while not self.scheduler.idle() and time.monotonic() < deadline:
                time.sleep(0.02)
            if not self.scheduler.idle():
                left = self.scheduler.snapshot()["running"]
                log_event("grace_expired", cancelling=left)
                self.scheduler.cancel_running()
                # each cancelled sequence stops within one engine step; bound the wait anyway
                deadline = time.monotonic() + 60
                while not self.scheduler.idle() and time.monotonic() < deadline:
                    time.sleep(0.02)
        # handlers return right after their Finished event; give them a moment to flush it
        self._grpc.stop(grace=5).wait()
        if self.scheduler is not None:
            self.scheduler.stop()
        self.metrics.stop_http()
        log_event("stopped")


def default_prefill_chunk() -> int:
    """Every prefill step is padded to the chunk size, so the chunk is a prompt's minimum cost. On the
    CPU a padded 8192-token step costs seconds (a 38-token chat waited 3.2 s for its first token with
    chunk 2048 on the embedded model, 0.4 s with 256); accelerators want large chunks for throughput."""
    import jax
    return 256 if jax.default_backend() == "cpu" else 8192


def warmup(engine) -> None:
    """One tiny generation through the slot API (start, prefill_next, decode, release) compiles every step
    the scheduler calls, so the first real request pays no compile time (the engine compiles each step
    shape once; see its compiled_shapes)."""
    params = SamplingParams(max_new_tokens=2, temperature=0.0, ignore_eos=True)
    ids = [min(i + 1, engine.config.vocab_size - 1) for i in range(3)]
    seq = engine.start(0, ids, params)
    try:
        token = None
        while token is None:
            token = engine.prefill_next(0)
        seq.append(token)
        seq.append(engine.decode([0])[0])
    finally:
        engine.release(0)


def _log_request(req: Request, reason: str, status: str) -> None:
    now = time.monotonic()
    fields = dict(request_id=req.id, status=status, finish_reason=reason, prompt_tokens=len(req.prompt_ids),
                  generated_tokens=req.generated, queue_s=None, ttft_s=None, tokens_per_s=None,
                  total_s=round(now - req.t_arrival, 4))
    if req.t_admitted is not None:
        fields["queue_s"] = round(req.t_admitted - req.t_arrival, 4)
    if req.t_first is not None:
        fields["ttft_s"] = round(req.t_first - req.t_arrival, 4)
        if req.generated > 1 and req.t_last > req.t_first:
            fields["tokens_per_s"] = round((req.generated - 1) / (req.t_last - req.t_first), 2)
    log_event("request", **fields)


def serve(config: ServerConfig, engine=None) -> int:
    """Run a server until SIGTERM/SIGINT, then drain; returns the exit code (0)."""
    setup_logging(config.log_level)
    stop = threading.Event()
    signals = {"n": 0}

    def on_signal(signum, _frame):
        signals["n"] += 1
        log_event("signal", signal=signal.Signals(signum).name)
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
    return serve(config_from_args(argv))
