"""A small Python client for the zenjax gRPC API (zenjax.v1.Inference).

    from zenjax.client import Client
    with Client("127.0.0.1:50051") as c:
        c.wait_ready(timeout=120)
        for ev in c.generate("Hello", max_new_tokens=32):       # events: Progress | Delta | Done
            ...
        out = c.complete([{"role": "user", "content": "Hi"}])  # -> Completion(text, token_ids, ...)

Clients in other languages use serve/zenjax/v1/zenjax.proto directly (see serve/README.md).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from zenjax.serve import zenjax_pb2 as pb
from zenjax.serve import zenjax_pb2_grpc as pb_grpc
from zenjax.serve.events import Delta, Progress   # the same events the server's handlers read

FINISH_REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length",
                  pb.FINISH_REASON_CANCELLED: "cancelled", pb.FINISH_REASON_UNSPECIFIED: "unspecified"}
_SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed",
                    "stop", "stop_token_ids", "ignore_eos")
# the client accepts what the server may send; the server's own caps derive from its max_model_len
MAX_MESSAGE_BYTES = 256 * 2**20


@dataclasses.dataclass(frozen=True)
class Done:
    finish_reason: str
    prompt_tokens: int
    generated_tokens: int
    ttft_s: float
    queue_s: float
    total_s: float


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Done


def build_request(prompt, *, request_id: str = "", **sampling) -> pb.GenerateRequest:
    """prompt: str (raw text) | list[int] (token ids) | list[dict(role, content)] (chat)."""
    unknown = set(sampling) - set(_SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling fields: {sorted(unknown)} (known: {_SAMPLING_FIELDS})")
    req = pb.GenerateRequest(request_id=request_id)
    _set_prompt(req, prompt, allow_ids=True)
    for name, value in sampling.items():
        if value is None:
            continue
        if name in ("stop", "stop_token_ids"):
            getattr(req.sampling, name).extend(value)
        else:
            setattr(req.sampling, name, value)
    req.sampling.SetInParent()
    return req


def _set_prompt(req, prompt, *, allow_ids: bool) -> None:
    if isinstance(prompt, str):
        req.text = prompt
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        req.chat.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in prompt)
    elif isinstance(prompt, (list, tuple)) and allow_ids:
        req.token_ids.ids.extend(int(t) for t in prompt)
        req.token_ids.SetInParent()
    else:
        raise TypeError(f"prompt must be text, token ids or chat messages, got {type(prompt).__name__}")


class _ApiKey(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer KEY` to every call (what a server started with --api-key-file wants)."""

    def __init__(self, key: str):
        self._md = ("authorization", f"Bearer {key}")

    def _details(self, d):
        return d._replace(metadata=[*(d.metadata or ()), self._md])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)


class Client:
    """api_key: sent as `authorization: Bearer KEY`; root_certificates (PEM bytes) or tls=True: a TLS
    channel (tls=True with the system's roots)."""

    def __init__(self, target: str = "127.0.0.1:50051", channel: grpc.Channel | None = None, *,
                 api_key: str | None = None, root_certificates: bytes | None = None, tls: bool = False):
        self.target = target
        options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        if channel is None:
            if tls or root_certificates is not None:
                creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
                channel = grpc.secure_channel(target, creds, options=options)
            else:
                channel = grpc.insecure_channel(target, options=options)
        self._raw_channel = channel
        if api_key:
            channel = grpc.intercept_channel(channel, _ApiKey(api_key))
        self.channel = channel
        self.stub = pb_grpc.InferenceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._raw_channel.close()

    def wait_ready(self, timeout: float = 300.0, service: str = "zenjax.v1.Inference") -> None:
        """Poll grpc.health.v1 until SERVING (the model is loaded and warmed up)."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                r = self.health.Check(health_pb2.HealthCheckRequest(service=service),
                                      timeout=max(0.1, min(2.0, deadline - time.monotonic())))
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
            except grpc.RpcError as e:
                last = e.code().name
            time.sleep(0.2)
        raise TimeoutError(f"{self.target} not SERVING after {timeout}s (last status: {last})")

    def health_status(self, service: str = "zenjax.v1.Inference", timeout: float = 5.0) -> str:
        """"SERVING" | "NOT_SERVING" (loading, or shutting down) | a gRPC code name such as "UNAVAILABLE"
        (nothing listening there)."""
        try:
            r = self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
        except grpc.RpcError as e:
            return e.code().name

    def generate_stream(self, prompt, *, timeout: float | None = None, request_id: str = "", **sampling):
        """The raw gRPC response stream (a grpc call object: iterate it, or .cancel() it)."""
        return self.stub.Generate(build_request(prompt, request_id=request_id, **sampling), timeout=timeout)

    def generate(self, prompt, *, timeout: float | None = None, request_id: str = "",
                 **sampling) -> Iterator[Progress | Delta | Done]:
        for r in self.generate_stream(prompt, timeout=timeout, request_id=request_id, **sampling):
            yield event_from_proto(r)

    def complete(self, prompt, *, timeout: float | None = None, **sampling) -> Completion:
        text, ids, done = [], [], None
        for ev in self.generate(prompt, timeout=timeout, **sampling):
            if isinstance(ev, Delta):
                text.append(ev.text)
                ids.extend(ev.token_ids)
            elif isinstance(ev, Done):
                done = ev
        return Completion("".join(text), ids, done.finish_reason, done)

    def tokenize(self, prompt) -> list[int]:
        req = pb.TokenizeRequest()
        _set_prompt(req, prompt, allow_ids=False)
        return list(self.stub.Tokenize(req).token_ids)

    def detokenize(self, ids) -> str:
        return self.stub.Detokenize(pb.DetokenizeRequest(token_ids=list(ids))).text

    def model_info(self) -> pb.ModelInfoResponse:
        return self.stub.ModelInfo(pb.ModelInfoRequest())


def event_from_proto(r: pb.GenerateResponse) -> Progress | Delta | Done:
    kind = r.WhichOneof("event")
    if kind == "progress":
        return Progress(r.progress.prefilled_tokens, r.progress.prompt_tokens)
    if kind == "delta":
        return Delta(r.delta.text, tuple(r.delta.token_ids))
    if kind == "finished":
        u = r.finished.usage
        return Done(FINISH_REASONS.get(r.finished.reason, "unspecified"), u.prompt_tokens, u.generated_tokens,
                    u.time_to_first_token_s, u.queue_time_s, u.total_time_s)
    raise ValueError(f"GenerateResponse without an event: {r!r}")
