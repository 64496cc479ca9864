"""The gRPC front end (service zenjax.v1.Inference, contract serve/zenjax/v1/zenjax.proto): a thin
adapter over zenjax/serve/service.py.

Walk of one Generate call:
    1. bytes -> GenerateRequest here, not in grpc's own deserializer, so malformed protobuf or invalid
       UTF-8 is INVALID_ARGUMENT (logged as JSON, counted in zenjax_malformed_requests_total) instead of
       grpc's INTERNAL "Exception deserializing request!" with a traceback;
    2. proto -> (prompt, sampling dict) -> Service.prepare in the prep pool (this handler thread waits);
    3. Service.submit; a cancel/deadline callback marks the Request ("client" vs "deadline", counted as
       CANCELLED vs DEADLINE_EXCEEDED);
    4. scheduler events -> GenerateResponse messages.

Message size caps come from Limits (derived from max_model_len), the API key is checked by an
interceptor (health stays open for load balancers), reflection can be turned off, TLS from cert/key files.
"""
from __future__ import annotations

import hmac
import logging
import queue
import time
from concurrent import futures

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from zenjax.serve import zenjax_pb2 as pb
from zenjax.serve.errors import InvalidRequest, ServiceError
from zenjax.serve.metrics import log_event
from zenjax.serve.events import Delta, Failed, Finished, Progress
from zenjax.serve.service import Limits, Service, limits_for, sampling_params

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name   # "zenjax.v1.Inference"
HEALTH_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH,
           "cancelled": pb.FINISH_REASON_CANCELLED}
_GRPC_CODE = {"invalid_request": grpc.StatusCode.INVALID_ARGUMENT, "queue_full": grpc.StatusCode.RESOURCE_EXHAUSTED,
              "unavailable": grpc.StatusCode.UNAVAILABLE, "deadline_exceeded": grpc.StatusCode.DEADLINE_EXCEEDED,
              "unauthenticated": grpc.StatusCode.UNAUTHENTICATED, "internal": grpc.StatusCode.INTERNAL}
BadRequest = InvalidRequest     # the name older callers import


# ---------------------------------------------------------------- proto <-> neutral
def prompt_from_proto(msg):
    """GenerateRequest/TokenizeRequest oneof `prompt` -> str | list[int] | list[dict]."""
    which = msg.WhichOneof("prompt")
    if which is None:
        raise InvalidRequest("prompt: set one of text, token_ids or chat", "prompt")
    if which == "text":
        if not msg.text:
            raise InvalidRequest("text: empty prompt", "text")
        return msg.text
    if which == "token_ids":
        if not msg.token_ids.ids:
            raise InvalidRequest("token_ids.ids: empty prompt", "token_ids")
        return list(msg.token_ids.ids)
    if not msg.chat.messages:
        raise InvalidRequest("chat.messages: empty; a chat needs at least one message", "chat")
    return [{"role": m.role, "content": m.content} for m in msg.chat.messages]


def sampling_dict(sp) -> dict:
    kw = {name: getattr(sp, name) for name in ("max_new_tokens", "temperature", "top_k", "top_p", "min_p",
                                               "repetition_penalty", "seed") if sp.HasField(name)}
    kw.update(stop=tuple(sp.stop), stop_token_ids=tuple(sp.stop_token_ids), ignore_eos=sp.ignore_eos)
    return kw


def grpc_message(e: ServiceError) -> str:
    """Service field names as the proto spells them: sampling.<field>, chat.messages[i]..., text."""
    if e.param in ("messages",):
        return "chat." + e.message if e.message.startswith("messages") else e.message
    if e.param in ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed",
                   "stop", "stop_token_ids", "ignore_eos"):
        return e.renamed({}, prefix="sampling.")
    return e.message


def sampling_from_proto(sp, prompt_tokens: int, max_model_len: int, limits: Limits | None = None):
    """Proto SamplingParams -> engine SamplingParams; raises InvalidRequest naming `sampling.<field>`."""
    try:
        return sampling_params(sampling_dict(sp), prompt_tokens, limits or limits_for(max_model_len))
    except InvalidRequest as e:
        raise InvalidRequest(grpc_message(e), e.param) from e


def model_info(service: Service) -> pb.ModelInfoResponse:
    import jax.numpy as jnp
    import zenjax
    engine = service.engine
    mc, ec = engine.config, engine.engine_config
    per_token = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * jnp.dtype(ec.cache_dtype).itemsize
    sparse = getattr(ec, "sparse", None) or getattr(engine, "sparse", None)
    info = pb.ModelInfoResponse(
        model=service.model_name, zenjax_version=zenjax.__version__,
        architecture=pb.ModelArchitecture(
            name=mc.architecture, vocab_size=mc.vocab_size, hidden_size=mc.hidden_size,
            intermediate_size=mc.intermediate_size, num_layers=mc.num_layers, num_heads=mc.num_heads,
            num_kv_heads=mc.num_kv_heads, head_dim=mc.head_dim, rope_theta=mc.rope_theta,
            max_position_embeddings=mc.max_position_embeddings, tie_word_embeddings=mc.tie_word_embeddings),
        max_model_len=ec.max_model_len, prefill_chunk=ec.prefill_chunk, max_batch=ec.max_batch,
        max_queue=service.config.max_queue, attention=ec.attention,
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


class _Malformed:
    """What the deserializer returns for bytes that are not a valid message (the handler refuses it)."""

    def __init__(self, error: str):
        self.error = error


def _lenient(message_cls):
    def parse(data: bytes):
        try:
            return message_cls.FromString(data)
        except DecodeError as e:
            return _Malformed(str(e))
    return parse


# ---------------------------------------------------------------- the service
class InferenceServicer:
    def __init__(self, service: Service, frontend: "GrpcFrontend"):
        self.s = service
        self.f = frontend

    def _fail(self, context, e: ServiceError, rid: str = "", count: bool = True):
        if count:
            self.s.reject(rid, e, transport="grpc")
        context.abort(_GRPC_CODE[e.code], grpc_message(e))

    def _parsed(self, request, context, method: str):
        if isinstance(request, _Malformed):
            log_event("malformed_request", logging.WARNING, transport="grpc", method=method, error=request.error)
            self.s.metrics.malformed.labels(transport="grpc").inc()
            self.s.metrics.finished("rejected", "INVALID_REQUEST")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request is not a valid {method}Request message: "
                                                            f"{request.error}")
        return request

    def _ready(self, context):
        try:
            self.s.check_serving()
        except ServiceError as e:
            context.abort(_GRPC_CODE[e.code], e.message)

    def Generate(self, request, context):
        arrival = time.monotonic()
        request = self._parsed(request, context, "Generate")
        self._ready(context)
        rid = request.request_id[:64]       # for the log if the id itself is refused
        try:
            rid = self.s.new_request_id(request.request_id)
            prompt = prompt_from_proto(request)
            req = self.s.prep_pool.submit(self.s.prepare, prompt, sampling_dict(request.sampling), rid,
                                          arrival=arrival).result()
            self.s.submit(req)
        except ServiceError as e:
            self._fail(context, e, rid)     # context.abort raises: nothing below runs
        except Exception as e:              # e.g. a tokenizer failure: this request only
            log_event("request_error", logging.ERROR, request_id=rid, where="prepare",
                      error=f"{type(e).__name__}: {e}")
            self.s.metrics.finished("rejected", "INTERNAL")
            context.abort(grpc.StatusCode.INTERNAL, f"internal error while reading the prompt: {type(e).__name__}")

        def on_done():                      # client cancel, deadline, disconnect: the slot frees next step
            left = context.time_remaining()
            req.cancel("deadline" if left is not None and left <= 0 else "client")

        if not context.add_callback(on_done):   # the RPC ended while the prompt was being prepared
            req.cancel("client")
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
                            time_to_first_token_s=u.ttft_s, queue_time_s=u.queue_s, total_time_s=u.total_s,
                            cached_prompt_tokens=u.reused_tokens)))
                    return
                elif isinstance(ev, Failed):
                    context.abort(_GRPC_CODE[ev.code], ev.message)
        finally:
            req.cancel()                    # no-op when finished; frees the slot when the stream broke

    def Tokenize(self, request, context):
        request = self._parsed(request, context, "Tokenize")
        self._ready(context)
        which = request.WhichOneof("prompt")
        try:
            if which is None:
                raise InvalidRequest("prompt: set one of text or chat", "prompt")
            prompt = prompt_from_proto(request)
            ids = self.s.prep_pool.submit(self.s.encode, prompt).result()
        except ServiceError as e:
            self._fail(context, e, count=False)
        return pb.TokenizeResponse(token_ids=ids)

    def Detokenize(self, request, context):
        request = self._parsed(request, context, "Detokenize")
        self._ready(context)
        try:
            text = self.s.detokenize(list(request.token_ids))
        except ServiceError as e:
            self._fail(context, e, count=False)
        return pb.DetokenizeResponse(text=text)

    def ModelInfo(self, request, context):
        self._parsed(request, context, "ModelInfo")
        self._ready(context)
        return self.f.info


def _handlers(servicer: InferenceServicer):
    m = {"Generate": grpc.unary_stream_rpc_method_handler(
             servicer.Generate, request_deserializer=_lenient(pb.GenerateRequest),
             response_serializer=pb.GenerateResponse.SerializeToString)}
    for name, req, resp in (("Tokenize", pb.TokenizeRequest, pb.TokenizeResponse),
                            ("Detokenize", pb.DetokenizeRequest, pb.DetokenizeResponse),
                            ("ModelInfo", pb.ModelInfoRequest, pb.ModelInfoResponse)):
        m[name] = grpc.unary_unary_rpc_method_handler(getattr(servicer, name), request_deserializer=_lenient(req),
                                                      response_serializer=resp.SerializeToString)
    return grpc.method_handlers_generic_handler(SERVICE_NAME, m)


class ApiKeyInterceptor(grpc.ServerInterceptor):
    """Requires metadata `authorization: Bearer KEY` on every method but grpc.health.v1.Health."""

    def __init__(self, key: str, on_reject):
        self._want = ("bearer " + key).encode()
        self._on_reject = on_reject

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or details.method.startswith(f"/{HEALTH_NAME}/"):
            return handler
        got = dict(details.invocation_metadata or ()).get("authorization", "")
        got = got.encode() if isinstance(got, str) else got
        if hmac.compare_digest(got[:7].lower() + got[7:], self._want):
            return handler
        self._on_reject(details.method)

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "missing or wrong API key: send metadata 'authorization: Bearer KEY'")

        kind = (handler.request_streaming, handler.response_streaming)
        make = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
        return make[kind](deny)


class GrpcFrontend:
    """grpc.server with Inference, Health and (unless --no-reflection) reflection."""

    def __init__(self, service: Service):
        self.s = service
        c = service.config
        self.info: pb.ModelInfoResponse | None = None
        self.port: int | None = None
        self._server = None
        self.health = health.HealthServicer()
        self._set_health(False)

    def _build(self):
        c = self.s.config
        workers = c.max_batch + c.max_queue + 16   # every streaming Generate holds one thread
        interceptors = []
        if c.api_key:
            def on_reject(method):
                log_event("request_rejected", logging.INFO, transport="grpc", method=method, status="UNAUTHENTICATED")
                self.s.metrics.finished("rejected", "UNAUTHENTICATED")
            interceptors.append(ApiKeyInterceptor(c.api_key, on_reject))
        cap = self.s.limits.grpc_message_bytes
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="zenjax-rpc"),
                             interceptors=interceptors,
                             options=[("grpc.max_receive_message_length", cap), ("grpc.max_send_message_length", cap)])
        server.add_generic_rpc_handlers((_handlers(InferenceServicer(self.s, self)),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if c.reflection:
            reflection.enable_server_reflection((SERVICE_NAME, HEALTH_NAME, reflection.SERVICE_NAME), server)
        return server

    def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set("", status)
        self.health.set(SERVICE_NAME, status)

    def start(self) -> None:
        """Bind and answer (NOT_SERVING until `serving()`); message caps from the Service's Limits."""
        c = self.s.config
        self._server = self._build()
        address = f"{c.host}:{c.port}"
        if c.tls_cert:
            with open(c.tls_key, "rb") as k, open(c.tls_cert, "rb") as crt:
                creds = grpc.ssl_server_credentials([(k.read(), crt.read())])
            self.port = self._server.add_secure_port(address, creds)
        else:
            self.port = self._server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"cannot bind {address}")
        self._server.start()
        log_event("listening", address=f"{c.host}:{self.port}", tls=bool(c.tls_cert), reflection=c.reflection,
                  max_message_bytes=self.s.limits.grpc_message_bytes)

    def serving(self) -> None:
        self.info = model_info(self.s)
        self._set_health(True)

    def not_serving(self) -> None:
        self._set_health(False)

    def stop(self, grace: float = 5.0) -> None:
        if self._server is not None:
            self._server.stop(grace=grace).wait()
