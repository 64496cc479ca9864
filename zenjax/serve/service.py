"""The transport-neutral serving layer: settings, runtime setup, request preparation and limits.

Both front ends (zenjax/serve/grpc_api.py, zenjax/serve/http_api.py) are thin adapters over `Service`:

    front end: decode its message -> (prompt, sampling dict, request_id)
      -> Service.prepare  (prep thread pool, off the scheduler and the health path):
           check request_id / stop-list limits, bound the prompt by size BEFORE tokenizing
           (text: <= TEXT_BYTES_PER_TOKEN * max_model_len bytes), tokenize (chat content: control-token
           text stays plain unless --allow-special-tokens-in-content), check the ids against
           max_model_len, build SamplingParams -> scheduler.Request   | InvalidRequest(param=...)
      -> Service.submit   -> the scheduler's waiting queue          | QueueFull / Unavailable
      -> the front end reads Request.events and encodes them in its protocol.

Errors are errors.ServiceError subclasses; each front end maps them to its own status codes. Every
refused generation request is logged (JSON) and counted (zenjax_requests_total{reason="rejected"}) by
`reject`.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from zenjax.distributed import DistributedConfig, DistributedError, add_arguments as add_distributed_arguments
from zenjax.distributed import distributed_config
from zenjax.sampling import SamplingError, SamplingParams
from zenjax.serve.errors import InvalidRequest, ServiceError, Unavailable
from zenjax.serve.metrics import Metrics, log_event
from zenjax.serve.scheduler import Request, Scheduler

DEFAULT_MAX_NEW_TOKENS = 256
# Text is refused before tokenizing when it has more than this many UTF-8 bytes per token of max_model_len.
# Qwen2's tokenizer averages ~4 bytes/token on English, ~3 on Chinese and code, so 8 leaves 2x headroom
# for real prompts while a 20 MB paste to a max_model_len=1M server (8 MB cap) is refused at once instead
# of being tokenized for half a minute. Denser text can still be sent as token ids.
TEXT_BYTES_PER_TOKEN = 8


# ---------------------------------------------------------------- configuration
@dataclasses.dataclass(frozen=True)
class ServerConfig:
    checkpoint: str | None = None     # None: the embedded default model
    host: str = "127.0.0.1"
    port: int = 50051                 # gRPC; 0: any free port (logged in the "listening" event)
    grpc: bool = True                 # --no-grpc: HTTP only
    http_port: int | None = None      # OpenAI-compatible HTTP; None: off, 0: any free port ("http_listening")
    max_batch: int = 4
    max_model_len: int | None = None  # None: the engine's default for the checkpoint (zenjax.load)
    prefill_chunk: int | None = None  # None: zenjax.load's default (8192; short prompts use smaller buckets)
    max_queue: int = 64
    metrics_port: int = 0             # 0: no metrics endpoint
    attention: str = "auto"
    grace_seconds: float = 30.0
    log_level: str = "INFO"
    dca: str = "auto"                 # auto (the checkpoint's), off, or "CHUNK,LOCAL,ORIGINAL_MAX"
    cache_dtype: str | None = None    # None: the model dtype; float8_e4m3fn halves the KV cache
    sparse: str = "auto"              # auto (the checkpoint's sparse_attention_config.json), on, off, or a PATH
    served_model_name: str | None = None   # None: the checkpoint directory's name ("embedded-default")
    reflection: bool = True           # gRPC server reflection (grpcurl); --no-reflection turns it off
    tls_cert: str | None = None       # PEM certificate chain + key: TLS on both front ends
    tls_key: str | None = None
    api_key: str | None = None        # required as "authorization: Bearer KEY" (gRPC metadata / HTTP header)
    allow_special_tokens_in_content: bool = False   # chat content may spell control tokens (<|im_start|>...)
    max_itl_ms: float = 100.0         # inter-token budget of running streams during prefills; 0: unbounded
    prefix_reuse_min: int = 256       # reuse a free slot's cached prefix of >= this many tokens; 0: off
    tensor_parallel: int = 1          # devices per model for heads / MLP widths (zenjax/sharding.py)
    expert_parallel: int = 1          # MoE experts split this many ways (times tensor_parallel devices)
    distributed: DistributedConfig = DistributedConfig()   # several processes: zenjax/distributed.py
    compile_cache: str | None = None  # directory of JAX's persistent compilation cache; None: off


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m zenjax.serve",
                                 description="Serve a zenjax model over gRPC (zenjax.v1.Inference) and/or an "
                                             "OpenAI-compatible HTTP API, on one engine.")
    d = ServerConfig()
    ap.add_argument("--checkpoint", default=None, help="converted checkpoint directory (default: embedded model)")
    ap.add_argument("--host", default=d.host, help="address to bind, both front ends (default %(default)s)")
    ap.add_argument("--port", type=int, default=d.port, help="gRPC port (0: any free port; default %(default)s)")
    ap.add_argument("--no-grpc", action="store_true", help="do not serve gRPC (HTTP only)")
    ap.add_argument("--http-port", type=int, default=None,
                    help="serve the OpenAI-compatible HTTP API on this port (0: any free port; default off)")
    ap.add_argument("--max-batch", type=int, default=d.max_batch, help="decode slots (default %(default)s)")
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="prompt + generated tokens per request; each slot reserves this much KV cache "
                         "(default: min(the checkpoint's max_position_embeddings, 32768))")
    ap.add_argument("--prefill-chunk", type=int, default=None,
                    help="prompt tokens per prefill step (default: 8192 on GPU/TPU, 256 on CPU)")
    ap.add_argument("--max-queue", type=int, default=d.max_queue,
                    help="requests waiting for a slot before RESOURCE_EXHAUSTED / 429 (default %(default)s)")
    ap.add_argument("--metrics-port", type=int, default=d.metrics_port,
                    help="Prometheus /metrics on 127.0.0.1:PORT (0: off; default %(default)s)")
    ap.add_argument("--attention", default=d.attention, help="auto | reference | cudnn | pallas")
    ap.add_argument("--grace-seconds", type=float, default=d.grace_seconds,
                    help="on SIGTERM, how long running streams may finish (default %(default)s); "
                         "a second SIGTERM exits at once with status 1")
    ap.add_argument("--log-level", default=d.log_level)
    ap.add_argument("--dca", default=d.dca,
                    help="Dual Chunk Attention: auto (as the checkpoint says), off, or CHUNK,LOCAL,ORIGINAL_MAX "
                         "to enable it on any Qwen2 checkpoint (e.g. 262144,8192,262144)")
    ap.add_argument("--cache-dtype", default=d.cache_dtype, help="KV cache dtype: bfloat16 | float8_e4m3fn")
    ap.add_argument("--sparse", default=d.sparse,
                    help="sparse vertical-slash prefill for prompts over the threshold: auto (the checkpoint's "
                         "sparse_attention_config.json if present and the attention implementation has a validated "
                         "sparse path), on (the checkpoint's file), off, or PATH to such a file")
    ap.add_argument("--served-model-name", default=None,
                    help="the model name clients send and /v1/models lists (default: the checkpoint "
                         "directory's name, or embedded-default)")
    ap.add_argument("--no-reflection", action="store_true", help="turn gRPC server reflection off")
    ap.add_argument("--tls-cert", default=None, help="PEM certificate (chain) file: serve TLS on both front ends")
    ap.add_argument("--tls-key", default=None, help="PEM private key file for --tls-cert")
    ap.add_argument("--api-key-file", default=None,
                    help="file holding the API key clients must send as 'authorization: Bearer KEY' "
                         "(also read from $ZENJAX_API_KEY); health checks stay open")
    ap.add_argument("--allow-special-tokens-in-content", action="store_true",
                    help="let chat message content spell control tokens such as <|im_start|> (default: "
                         "such text stays plain text, so a user cannot forge a system turn)")
    ap.add_argument("--max-itl-ms", type=float, default=d.max_itl_ms,
                    help="bound on the gap between tokens of running streams while other prompts prefill: "
                         "prefill work is cut into pieces that fit it (0: unbounded, one full piece per "
                         "decode step; default %(default)s)")
    ap.add_argument("--prefix-reuse-min", type=int, default=d.prefix_reuse_min,
                    help="a prompt whose first N >= this many tokens equal what a free slot's KV cache still "
                         "holds prefills only the rest (0: off; default %(default)s)")
    ap.add_argument("--tensor-parallel", type=int, default=d.tensor_parallel, help="devices per model (heads)")
    ap.add_argument("--expert-parallel", type=int, default=d.expert_parallel, help="MoE experts split N ways")
    ap.add_argument("--compile-cache", default=d.compile_cache, metavar="DIR",
                    help="keep compiled steps in DIR (JAX's persistent compilation cache): a restart with the "
                         "same model, flags and jax version loads them instead of compiling (the warm-up "
                         "compiles ~20 steps, ~10 s each for a 7B model on a GPU); default: off")
    add_distributed_arguments(ap)
    return ap


def config_from_args(argv=None) -> ServerConfig:
    """The one function that builds a ServerConfig; bad values exit with a usage error naming the flag."""
    ap = _parser()
    a = ap.parse_args(argv)
    checks = [("--port", 0 <= a.port <= 65535, "must be in [0, 65535]"),
              ("--http-port", a.http_port is None or 0 <= a.http_port <= 65535, "must be in [0, 65535]"),
              ("--no-grpc", not (a.no_grpc and a.http_port is None), "needs --http-port (nothing would serve)"),
              ("--max-batch", a.max_batch >= 1, "must be >= 1"),
              ("--max-model-len", a.max_model_len is None or a.max_model_len >= 2, "must be >= 2"),
              ("--prefill-chunk", a.prefill_chunk is None or a.prefill_chunk >= 1, "must be >= 1"),
              ("--max-queue", a.max_queue >= 0, "must be >= 0"),
              ("--metrics-port", 0 <= a.metrics_port <= 65535, "must be in [0, 65535]"),
              ("--grace-seconds", a.grace_seconds >= 0, "must be >= 0"),
              ("--max-itl-ms", math.isfinite(a.max_itl_ms) and a.max_itl_ms >= 0, "must be finite, >= 0 (0: off)"),
              ("--prefix-reuse-min", a.prefix_reuse_min >= 0, "must be >= 0 (0: off)"),
              ("--tls-cert", (a.tls_cert is None) == (a.tls_key is None), "and --tls-key go together"),
              ("--tls-cert", a.tls_cert is None or os.path.isfile(a.tls_cert), "is not a file"),
              ("--tls-key", a.tls_key is None or os.path.isfile(a.tls_key), "is not a file"),
              ("--api-key-file", a.api_key_file is None or os.path.isfile(a.api_key_file), "is not a file"),
              ("--tensor-parallel", a.tensor_parallel >= 1, "must be >= 1"),
              ("--expert-parallel", a.expert_parallel >= 1, "must be >= 1"),
              ("--compile-cache", a.compile_cache is None or _can_be_directory(a.compile_cache),
               "is not a directory and cannot be made one (a file is in the way, or no write access)")]
    checks.append(("--dca", parse_dca(a.dca) is not None or a.dca in ("auto", "off"),
                   "must be auto, off or CHUNK,LOCAL,ORIGINAL_MAX (integers, LOCAL < CHUNK)"))
    checks.append(("--sparse", a.sparse in ("auto", "on", "off") or os.path.isfile(a.sparse),
                   "must be auto, on, off or an existing sparse_attention_config.json"))
    for flag, ok, why in checks:
        if not ok:
            ap.error(f"{flag}={getattr(a, flag[2:].replace('-', '_'))} {why}")
    api_key = os.environ.get("ZENJAX_API_KEY") or None
    if a.api_key_file:
        with open(a.api_key_file, encoding="utf-8") as f:
            api_key = f.read().strip()
        if not api_key:
            ap.error(f"--api-key-file={a.api_key_file} is empty")
    try:
        dist = distributed_config(a.coordinator, a.num_processes, a.process_id)
    except DistributedError as e:
        ap.error(str(e))
    return ServerConfig(checkpoint=a.checkpoint, host=a.host, port=a.port, grpc=not a.no_grpc,
                        http_port=a.http_port, max_batch=a.max_batch, max_model_len=a.max_model_len,
                        prefill_chunk=a.prefill_chunk, max_queue=a.max_queue, metrics_port=a.metrics_port,
                        attention=a.attention, grace_seconds=a.grace_seconds, log_level=a.log_level, dca=a.dca,
                        cache_dtype=a.cache_dtype, sparse=a.sparse, served_model_name=a.served_model_name,
                        reflection=not a.no_reflection, tls_cert=a.tls_cert, tls_key=a.tls_key, api_key=api_key,
                        allow_special_tokens_in_content=a.allow_special_tokens_in_content,
                        max_itl_ms=a.max_itl_ms, prefix_reuse_min=a.prefix_reuse_min,
                        tensor_parallel=a.tensor_parallel, expert_parallel=a.expert_parallel, distributed=dist,
                        compile_cache=a.compile_cache)


def _can_be_directory(path: str) -> bool:
    """path is a directory, or its nearest existing ancestor is a directory we may create entries in, so
    os.makedirs(path) at load will succeed (checked at parse time: a bad flag fails before any loading)."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        return os.path.isdir(path)
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    return os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK)


def use_compile_cache(path: str | None) -> None:
    """Point JAX's persistent compilation cache at `path` (None: leave it off), before the first compile.
    Every compiled step is kept, however fast it compiled (JAX's default keeps only those over 1 s): the
    row updates are tiny but a restart would still wait for each. The cache key covers the HLO, the
    devices, the flags and the jax version, so a different model or setting compiles afresh."""
    if path is None:
        return
    import jax
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def engine_kwargs(c: ServerConfig) -> dict:
    """zenjax.load's keyword arguments for a server config (process 0 and the followers load alike)."""
    kw = dict(max_batch=c.max_batch, attention=c.attention, tensor_parallel=c.tensor_parallel,
              expert_parallel=c.expert_parallel)
    if c.prefill_chunk is not None:
        kw["prefill_chunk"] = c.prefill_chunk
    if c.max_model_len is not None:
        kw["max_model_len"] = c.max_model_len
    if c.dca != "auto":
        kw["dca"] = False if c.dca == "off" else parse_dca(c.dca)
    if c.cache_dtype:
        kw["cache_dtype"] = c.cache_dtype
    from zenjax.config import parse_sparse_choice
    kw["sparse"] = parse_sparse_choice(c.sparse)
    return kw


def parse_dca(text: str):
    """"CHUNK,LOCAL,ORIGINAL_MAX" -> DCAConfig; None if it is not of that form."""
    from zenjax.config import ConfigError, DCAConfig
    try:
        return DCAConfig.parse(text)
    except ConfigError:
        return None


# ---------------------------------------------------------------- limits
@dataclasses.dataclass(frozen=True)
class Limits:
    """Request size limits, all derived from max_model_len by `limits_for`.

    Worked example, max_model_len = 1,048,576: text <= 8 MiB, gRPC messages <= 9 MiB (8 MiB of text or
    5 bytes per token id, + 1 MiB for the rest), HTTP bodies <= 49 MiB (JSON may escape a character as
    \\uXXXX: 6 bytes, so 6 x the text cap, + 1 MiB)."""
    max_model_len: int
    text_bytes: int              # prompt text (or all chat contents together), UTF-8
    grpc_message_bytes: int
    http_body_bytes: int
    request_id_chars: int = 128
    stop_strings: int = 16
    stop_string_chars: int = 256
    stop_token_ids: int = 64
    chat_messages: int = 4096


def limits_for(max_model_len: int) -> Limits:
    text = TEXT_BYTES_PER_TOKEN * max_model_len
    slack = 2**20
    return Limits(max_model_len=max_model_len, text_bytes=text,
                  grpc_message_bytes=max(text, 5 * max_model_len) + slack, http_body_bytes=6 * text + slack)


def _utf8_len_over(text: str, cap: int) -> int | None:
    """The UTF-8 length of text if it exceeds cap, else None; cheap for the common cases (a char is 1-4
    bytes, so len <= cap/4 is always fine and len > cap never is)."""
    if 4 * len(text) <= cap:
        return None
    n = len(text) if len(text) > cap else len(text.encode("utf-8", "surrogatepass"))
    return n if n > cap else None


# ---------------------------------------------------------------- the service
class Service:
    """Runtime (engine, scheduler, metrics, lifecycle) and request preparation for every front end."""

    def __init__(self, config: ServerConfig, engine=None):
        self.config = config
        self.engine = engine
        self.scheduler: Scheduler | None = None
        self.metrics = Metrics()
        self.ready = threading.Event()
        self.draining = False
        # known before loading (the front ends bind first): the flag, the given engine's, or zenjax.load's default
        self.limits = limits_for(config.max_model_len or (
            int(engine.engine_config.max_model_len) if engine is not None else default_max_model_len(config)))
        self.model_name = config.served_model_name or (
            os.path.basename(os.path.normpath(config.checkpoint)) if config.checkpoint else "embedded-default")
        self.created = int(time.time())
        # tokenization runs here, not on the scheduler thread nor the front ends' I/O threads
        self.prep_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="zenjax-prep")
        self.load_s = self.warmup_s = None

    # ---------------------------------------------------------------- lifecycle
    @property
    def state(self) -> str:
        """"loading" | "serving" | "draining" (health: only "serving" is healthy)."""
        if self.draining:
            return "draining"
        return "serving" if self.ready.is_set() else "loading"

    def load(self) -> None:
        """Load the engine (unless given), warm it up, start the scheduler; state becomes "serving"."""
        c = self.config
        t0 = time.monotonic()
        if self.engine is None:
            import zenjax
            use_compile_cache(c.compile_cache)
            self.engine = zenjax.load(c.checkpoint, **engine_kwargs(c))
            if c.distributed.enabled:         # process 0 of several: the others replay its device calls
                from zenjax.distributed import LeaderRunner
                self.engine.runner = LeaderRunner(self.engine.runner)
        t1 = time.monotonic()
        self.engine.warmup()       # compiles every prefill bucket and the decode call up front
        self.metrics.watch_engine(self.engine)     # sparse / dense prefill token counter, warm-up excluded
        t2 = time.monotonic()
        self.load_s, self.warmup_s = round(t1 - t0, 3), round(t2 - t1, 3)
        self.limits = limits_for(int(self.engine.engine_config.max_model_len))
        self.scheduler = Scheduler(self.engine, max_queue=c.max_queue, metrics=self.metrics,
                                   on_finish=_log_request, max_itl_ms=c.max_itl_ms, reuse_min=c.prefix_reuse_min)
        self.scheduler.start()
        self.ready.set()

    def check_serving(self) -> None:
        if self.draining:
            raise Unavailable("server is shutting down; not admitting new requests")
        if not self.ready.is_set():
            raise Unavailable("model is loading / warming up; retry shortly")

    def drain(self, grace_s: float) -> None:
        """Stop admitting, give running requests grace_s to finish, then cancel the rest (each stops within
        one engine step)."""
        self.draining = True
        if self.scheduler is None:
            return
        self.scheduler.stop_admitting()
        deadline = time.monotonic() + grace_s
        while not self.scheduler.idle() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self.scheduler.idle():
            log_event("grace_expired", cancelling=self.scheduler.snapshot()["running"])
            self.scheduler.cancel_running()
            deadline = time.monotonic() + 60      # bounds the wait only; cancelling takes one step
            while not self.scheduler.idle() and time.monotonic() < deadline:
                time.sleep(0.02)

    def stop(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()
        close = getattr(getattr(self.engine, "runner", None), "close", None)
        if close is not None:             # a LeaderRunner: release the follower processes
            close()
        self.prep_pool.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------- requests
    def new_request_id(self, given: str | None) -> str:
        if not given:
            return uuid.uuid4().hex[:16]
        if len(given) > self.limits.request_id_chars:
            raise InvalidRequest(f"request_id: {len(given)} characters; at most {self.limits.request_id_chars}",
                                 "request_id")
        if not given.isprintable():
            raise InvalidRequest("request_id: must be printable characters", "request_id")
        return given

    def encode(self, prompt) -> list[int]:
        """str (raw text, control tokens parsed: the caller writes the whole prompt) | list[int] |
        list[{role, content}] (chat) -> ids, bounded by size before any tokenizing."""
        lim, eng = self.limits, self.engine
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequest("prompt: empty text", "prompt")
            n = _utf8_len_over(prompt, lim.text_bytes)
            if n is not None:
                raise InvalidRequest(f"prompt: {n} bytes of text; at most {lim.text_bytes} "
                                     f"({TEXT_BYTES_PER_TOKEN} per token of max_model_len={lim.max_model_len})",
                                     "prompt")
            ids = self._tokenizer("prompt").encode(prompt)
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            if len(prompt) > lim.chat_messages:
                raise InvalidRequest(f"messages: {len(prompt)} messages; at most {lim.chat_messages}", "messages")
            contents = [m["content"] for m in prompt if isinstance(m.get("content"), str)]
            n = _utf8_len_over("".join(contents), lim.text_bytes)
            if n is not None:
                raise InvalidRequest(f"messages: {n} bytes of content; at most {lim.text_bytes} "
                                     f"({TEXT_BYTES_PER_TOKEN} per token of max_model_len={lim.max_model_len})",
                                     "messages")
            tok = self._tokenizer("messages")
            try:
                ids = tok.apply_chat_template(
                    list(prompt), add_generation_prompt=True,
                    special_tokens_in_content=self.config.allow_special_tokens_in_content)
            except ValueError as e:
                raise InvalidRequest(str(e), "messages") from e
        elif isinstance(prompt, (list, tuple)):
            if not prompt:
                raise InvalidRequest("prompt: empty token ids", "prompt")
            if len(prompt) >= lim.max_model_len:
                raise InvalidRequest(f"prompt: {len(prompt)} tokens leave no room to generate within "
                                     f"max_model_len={lim.max_model_len}", "prompt")
            V = eng.config.vocab_size
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < V]
            if bad:
                raise InvalidRequest(f"prompt token ids: {bad[:5]} outside [0, {V})", "prompt")
        else:
            raise InvalidRequest(f"prompt: expected text, token ids or chat messages, got {type(prompt).__name__}",
                                 "prompt")
        if not ids:
            raise InvalidRequest("prompt: encodes to zero tokens", "prompt")
        if len(ids) >= lim.max_model_len:
            raise InvalidRequest(f"prompt: {len(ids)} tokens leave no room to generate within "
                                 f"max_model_len={lim.max_model_len}", "prompt")
        return list(ids)

    def _tokenizer(self, param: str):
        tok = getattr(self.engine, "tokenizer", None)
        if tok is None:
            raise InvalidRequest(f"{param}: this checkpoint has no tokenizer; send token ids", param)
        return tok

    def sampling(self, sampling: dict, prompt_tokens: int) -> SamplingParams:
        return sampling_params(sampling, prompt_tokens, self.limits)

    def prepare(self, prompt, sampling: dict, request_id: str, *, arrival: float | None = None,
                events=None) -> Request:
        """Validate and tokenize (blocking: call it in prep_pool). Raises InvalidRequest naming the field."""
        check_stop_limits(sampling, self.limits)
        ids = self.encode(prompt)
        return Request(request_id, ids, self.sampling(sampling, len(ids)), arrival=arrival, events=events)

    def submit(self, req: Request) -> None:
        self.check_serving()
        self.scheduler.submit(req)          # QueueFull / ShuttingDown (an Unavailable)

    def reject(self, request_id: str, error: ServiceError, **fields) -> None:
        """Log and count a request refused before it reached the scheduler."""
        status = error.code.upper()
        log_event("request_rejected", logging.INFO, request_id=request_id, status=status, message=error.message,
                  **fields)
        self.metrics.finished("rejected", status)

    def detokenize(self, ids) -> str:
        tok = self._tokenizer("token_ids")
        V = self.engine.config.vocab_size
        bad = [i for i in ids if not 0 <= i < V]
        if bad:
            raise InvalidRequest(f"token_ids: {bad[:5]} outside [0, {V})", "token_ids")
        return tok.decode(list(ids))


# ---------------------------------------------------------------- sampling
_SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed",
                  "stop", "stop_token_ids", "ignore_eos")


def check_stop_limits(sampling: dict, limits: Limits) -> None:
    stop, ids = sampling.get("stop") or (), sampling.get("stop_token_ids") or ()
    if len(stop) > limits.stop_strings:
        raise InvalidRequest(f"stop: {len(stop)} strings; at most {limits.stop_strings}", "stop")
    long = [i for i, s in enumerate(stop) if len(s) > limits.stop_string_chars]
    if long:
        raise InvalidRequest(f"stop[{long[0]}]: {len(stop[long[0]])} characters; at most "
                             f"{limits.stop_string_chars}", "stop")
    if len(ids) > limits.stop_token_ids:
        raise InvalidRequest(f"stop_token_ids: {len(ids)} ids; at most {limits.stop_token_ids}", "stop_token_ids")


def sampling_params(sampling: dict, prompt_tokens: int, limits: Limits) -> SamplingParams:
    """Neutral sampling dict (keys of SamplingParams; None or absent = default) -> SamplingParams.
    max_new_tokens defaults to min(256, the room left); InvalidRequest names the field."""
    unknown = set(sampling) - set(_SAMPLING_KEYS)
    if unknown:
        raise InvalidRequest(f"{sorted(unknown)[0]}: unknown sampling field", sorted(unknown)[0])
    check_stop_limits(sampling, limits)
    room = limits.max_model_len - prompt_tokens
    kw = {k: v for k, v in sampling.items() if v is not None}
    n = kw.get("max_new_tokens")
    if n is None:
        kw["max_new_tokens"] = max(1, min(DEFAULT_MAX_NEW_TOKENS, room))
    elif n < 1:
        raise InvalidRequest(f"max_new_tokens={n} must be >= 1", "max_new_tokens")
    elif n > room:
        raise InvalidRequest(f"max_new_tokens={n}: prompt tokens ({prompt_tokens}) + max_new_tokens exceed "
                             f"max_model_len={limits.max_model_len} (at most {room} here)", "max_new_tokens")
    top_k = kw.get("top_k")
    if top_k is not None and top_k > 2**31 - 1:      # the sampler holds it as int32 (0 = off)
        raise InvalidRequest(f"top_k={top_k} must be < 2**31 (0 disables it)", "top_k")
    try:
        return SamplingParams(**kw)
    except SamplingError as e:
        m = re.match(r"\w+", str(e))
        raise InvalidRequest(str(e), m.group(0) if m else None) from e


# ---------------------------------------------------------------- runtime helpers
def default_max_model_len(config: ServerConfig) -> int:
    """What zenjax.load picks without --max-model-len (read from config.json, no weights loaded)."""
    from zenjax.checkpoint import read_config
    from zenjax.engine import DEFAULT_CHECKPOINT
    cfg, _ = read_config(config.checkpoint or DEFAULT_CHECKPOINT)
    return min(cfg.max_position_embeddings, 32768)


def _log_request(req: Request, reason: str, status: str) -> None:
    now = time.monotonic()
    fields = dict(request_id=req.id, status=status, finish_reason=reason, prompt_tokens=len(req.prompt_ids),
                  generated_tokens=req.generated, reused_tokens=req.reused, queue_s=None, ttft_s=None,
                  tokens_per_s=None, total_s=round(now - req.t_arrival, 4))
    if req.t_admitted is not None:
        fields["queue_s"] = round(req.t_admitted - req.t_arrival, 4)
    if req.t_first is not None:
        fields["ttft_s"] = round(req.t_first - req.t_arrival, 4)
        if req.generated > 1 and req.t_last > req.t_first:
            fields["tokens_per_s"] = round((req.generated - 1) / (req.t_last - req.t_first), 2)
    log_event("request", **fields)
