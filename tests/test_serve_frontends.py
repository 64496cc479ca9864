"""Both front ends (gRPC and OpenAI-compatible HTTP) in this process on one Service, over a paced engine
double (tests/serve_doubles.py, no JAX) with the real embedded tokenizer: lifecycle and health, API key,
TLS, reflection switch, malformed bodies, size bounds before tokenizing, id/stop limits, deadline vs
cancel, disconnects, queue full, a second SIGTERM. Real sockets on 127.0.0.1 only; every wait is an
event or a bounded poll (the bounds only guard against hangs)."""
from __future__ import annotations

import datetime
import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest

from serve_doubles import PacedEngine
from zenjax.client import Client, build_request
from zenjax.serve import zenjax_pb2 as pb
from zenjax.serve.server import Server, ServerConfig, config_from_args

ROOT = Path(__file__).resolve().parents[1]
WAIT = 60.0
ENDLESS = 90_000          # max_new_tokens no test lets finish (the paced engine makes ~500 tokens/s)


class LogSink(logging.Handler):
    def __init__(self):
        super().__init__()
        self.events: list[dict] = []

    def emit(self, record):
        fields = getattr(record, "fields", None)
        if fields:
            self.events.append(dict(fields))

    def wait(self, event, **match):
        return poll(lambda: next((e for e in self.events if e.get("event") == event
                                  and all(e.get(k) == v for k, v in match.items())), None), f"{event} {match}")


def poll(fn, what, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.01)


@pytest.fixture
def logs():
    sink = LogSink()
    logger = logging.getLogger("zenjax.serve")
    logger.addHandler(sink)
    old = logger.level
    logger.setLevel(logging.INFO)
    yield sink
    logger.removeHandler(sink)
    logger.setLevel(old)


def start_server(engine=None, **kw) -> Server:
    cfg = dict(port=0, http_port=0, max_batch=2, max_queue=2)
    cfg.update(kw)
    server = Server(ServerConfig(**cfg), engine=engine or PacedEngine())
    server.start()
    return server


@pytest.fixture
def server():
    s = start_server()
    yield s
    s.drain(0)


@pytest.fixture
def small_server():
    s = start_server(max_model_len=4096, engine=PacedEngine(max_model_len=4096))
    yield s
    s.drain(0)


def url(server, path, scheme="http"):
    return f"{scheme}://127.0.0.1:{server.http_port}{path}"


CHAT = {"model": "embedded-default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def counter(server, status, reason="rejected"):
    return server.service.metrics.requests.labels(reason=reason, status=status)._value.get()


# ---------------------------------------------------------------- lifecycle
def test_health_503_while_loading_and_draining(logs):
    gate = threading.Event()
    server = Server(ServerConfig(port=0, http_port=0, max_batch=2, max_queue=2), engine=PacedEngine(load_gate=gate))
    t = threading.Thread(target=server.start, daemon=True)
    t.start()
    poll(lambda: server.http_port and server.port, "bound")
    r = httpx.get(url(server, "/health"))
    assert r.status_code == 503 and r.json()["status"] == "loading"
    r = httpx.post(url(server, "/v1/chat/completions"), json=CHAT)
    assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
    with Client(f"127.0.0.1:{server.port}") as c:
        assert c.health_status() == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as e:
            c.complete("hi", max_new_tokens=2, timeout=WAIT)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        gate.set()
        t.join(WAIT)
        assert httpx.get(url(server, "/health")).status_code == 200
        assert c.health_status() == "SERVING"
        # a running stream keeps the drain waiting; meanwhile health is 503 "draining" and new requests 503
        stream = c.generate_stream([5, 6, 7], max_new_tokens=ENDLESS, timeout=WAIT)
        next(iter(stream))
        drain = threading.Thread(target=server.drain, args=(WAIT,), daemon=True)
        drain.start()
        poll(lambda: httpx.get(url(server, "/health")).status_code == 503, "503 while draining")
        assert httpx.get(url(server, "/health")).json()["status"] == "draining"
        r = httpx.post(url(server, "/v1/chat/completions"), json=CHAT)
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
        stream.cancel()
        drain.join(WAIT)
        assert not drain.is_alive()
    logs.wait("stopped")


def test_grpc_can_be_turned_off(capsys):
    server = start_server(grpc=False)
    try:
        assert server.port is None and server.grpc is None
        r = httpx.post(url(server, "/v1/completions"), json={"model": "embedded-default", "prompt": [5, 6],
                                                             "max_tokens": 3})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "<2><3><4>"
    finally:
        server.drain(0)
    with pytest.raises(SystemExit):
        config_from_args(["--no-grpc"])          # nothing would serve
    assert "--no-grpc" in capsys.readouterr().err
    assert config_from_args(["--no-grpc", "--http-port", "8000"]).grpc is False


# ---------------------------------------------------------------- security
def self_signed(tmp_path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    crt, k = tmp_path / "cert.pem", tmp_path / "key.pem"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return crt, k


def test_tls_api_key_and_no_reflection(tmp_path, logs):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
    import openai
    crt, key = self_signed(tmp_path)
    (tmp_path / "key.txt").write_text("s3cret\n")
    cfg = config_from_args(["--port", "0", "--http-port", "0", "--tls-cert", str(crt), "--tls-key", str(key),
                            "--api-key-file", str(tmp_path / "key.txt"), "--no-reflection"])
    assert (cfg.api_key, cfg.reflection) == ("s3cret", False)
    server = Server(cfg, engine=PacedEngine())
    server.start()
    target, roots = f"127.0.0.1:{server.port}", crt.read_bytes()
    try:
        # gRPC over TLS: health open, everything else needs the key
        with Client(target, root_certificates=roots) as c:
            assert c.health_status() == "SERVING"
            with pytest.raises(grpc.RpcError) as e:
                c.complete([5, 6], max_new_tokens=2, timeout=WAIT)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with Client(target, root_certificates=roots, api_key="wrong") as c:
            with pytest.raises(grpc.RpcError) as e:
                c.model_info()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with Client(target, root_certificates=roots, api_key="s3cret") as c:
            assert c.complete([5, 6], max_new_tokens=2, timeout=WAIT).token_ids == [2, 3]
            with pytest.raises(grpc.RpcError) as e:     # reflection is off
                ProtoReflectionDescriptorDatabase(c.channel).get_services()
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with Client(target) as plain:                    # no TLS: the handshake fails, nothing is served
            assert plain.health_status(timeout=1) != "SERVING"
        assert counter(server, "UNAUTHENTICATED") == 2
        # HTTP over TLS
        https = httpx.Client(verify=__import__("ssl").create_default_context(cafile=str(crt)))
        assert https.get(url(server, "/health", "https")).status_code == 200
        r = https.get(url(server, "/v1/models", "https"))
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = https.get(url(server, "/v1/models", "https"), headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200 and r.json()["data"][0]["id"] == "embedded-default"
        oa = openai.OpenAI(base_url=url(server, "/v1", "https"), api_key="s3cret", http_client=https)
        out = oa.completions.create(model="embedded-default", prompt=[5, 6], max_tokens=2)
        assert out.choices[0].text == "<2><3>"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url(server, "/v1", "https"), api_key="nope", http_client=https,
                          max_retries=0).models.list()
        with pytest.raises(httpx.HTTPError):
            httpx.get(url(server, "/health"))             # plain HTTP to the TLS port
    finally:
        server.drain(0)


# ---------------------------------------------------------------- bad input
def test_malformed_protobuf_and_bad_utf8_are_invalid_argument(server, logs):
    good = build_request("hi", max_new_tokens=2).SerializeToString()
    bad_utf8 = pb.GenerateRequest(text="ab").SerializeToString().replace(b"ab", b"\xff\xfe")
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        gen = ch.unary_stream("/zenjax.v1.Inference/Generate")      # raw bytes in and out
        for body in (b"\xff\xff\xff\x0f", bad_utf8):
            with pytest.raises(grpc.RpcError) as e:
                list(gen(body, timeout=WAIT))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
            assert "not a valid GenerateRequest" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            ch.unary_unary("/zenjax.v1.Inference/Tokenize")(b"\x0a\x05ab", timeout=WAIT)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(list(gen(good, timeout=WAIT))) >= 2              # still serving
    assert server.service.metrics.malformed.labels(transport="grpc")._value.get() == 3
    ev = logs.wait("malformed_request", method="Generate")
    assert "UTF-8" in [e for e in logs.events if e["event"] == "malformed_request"][1]["error"]
    assert ev["transport"] == "grpc"
    r = httpx.post(url(server, "/v1/chat/completions"), content=b'{"model": "x", "messages": [',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(url(server, "/v1/chat/completions"), content=b'{"model": "embedded-default", "messages": '
                   b'[{"role": "user", "content": "\xff"}]}', headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert server.service.metrics.malformed.labels(transport="http")._value.get() == 2


class CountingTokenizer:
    def __init__(self, tok):
        self.tok, self.calls = tok, 0

    def __getattr__(self, name):
        attr = getattr(self.tok, name)
        if name in ("encode", "apply_chat_template"):
            def counted(*a, **k):
                self.calls += 1
                return attr(*a, **k)
            return counted
        return attr


def test_text_is_bounded_by_size_before_tokenizing(small_server):
    """max_model_len 4096 -> text cap 8 x 4096 = 32768 bytes; gRPC message cap 32768 + 1 MiB; HTTP body
    cap 6 x 32768 + 1 MiB."""
    server = small_server
    lim = server.service.limits
    assert (lim.text_bytes, lim.grpc_message_bytes, lim.http_body_bytes) == (32768, 32768 + 2**20, 6 * 32768 + 2**20)
    spy = server.engine.tokenizer = CountingTokenizer(server.engine.tokenizer)
    big = "é" * (lim.text_bytes // 2 + 1)                 # 2 bytes per char: one byte over the cap
    with Client(f"127.0.0.1:{server.port}") as c:
        for prompt, field in ((big, "prompt"), ([{"role": "user", "content": big}], "chat.messages")):
            with pytest.raises(grpc.RpcError) as e:
                c.complete(prompt, max_new_tokens=2, timeout=WAIT)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in e.value.details()
            assert f"{lim.text_bytes + 2} bytes" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:               # over the message cap: grpc refuses it unread
            c.complete("x" * (lim.grpc_message_bytes + 1), timeout=WAIT)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    r = httpx.post(url(server, "/v1/completions"), json={"model": "embedded-default", "prompt": big})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(url(server, "/v1/chat/completions"), json={**CHAT, "messages": [{"role": "user", "content": big}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(url(server, "/v1/completions"), content=b"x" * (lim.http_body_bytes + 1))
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert spy.calls == 0, "an over-size prompt must be refused before tokenizing"
    r = httpx.post(url(server, "/v1/completions"), json={"model": "embedded-default", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200 and spy.calls == 1


def test_request_id_and_stop_list_limits(server):
    lim = server.service.limits
    cases = [(build_request("hi", request_id="r" * (lim.request_id_chars + 1)), "request_id"),
             (build_request("hi", stop=["x"] * (lim.stop_strings + 1)), "sampling.stop"),
             (build_request("hi", stop=["y" * (lim.stop_string_chars + 1)]), "sampling.stop[0]"),
             (build_request("hi", stop_token_ids=[1] * (lim.stop_token_ids + 1)), "sampling.stop_token_ids")]
    with Client(f"127.0.0.1:{server.port}") as c:
        for req, field in cases:
            with pytest.raises(grpc.RpcError) as e:
                list(c.stub.Generate(req, timeout=WAIT))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith(field)
        ok = build_request("hi", request_id="r" * lim.request_id_chars, max_new_tokens=1,
                           stop=["x"] * lim.stop_strings)
        assert list(c.stub.Generate(ok, timeout=WAIT))[-1].request_id == "r" * lim.request_id_chars
    r = httpx.post(url(server, "/v1/chat/completions"), json=CHAT,
                   headers={"x-request-id": "r" * (lim.request_id_chars + 1)})
    assert r.status_code == 400 and r.json()["error"]["param"] == "request_id"
    r = httpx.post(url(server, "/v1/chat/completions"), json={**CHAT, "stop": ["x"] * (lim.stop_strings + 1)})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
    assert counter(server, "INVALID_REQUEST") == 6


def test_grpc_usage_reports_prefix_reused_tokens_as_cached():
    """Usage.cached_prompt_tokens: the second request sharing a 40-token prefix with the first (whose slot
    still holds it) reports exactly those 40 reused tokens; the first, cold, reports 0."""
    server = start_server(max_batch=1, prefix_reuse_min=8)
    doc = list(range(100, 140))
    try:
        with Client(f"127.0.0.1:{server.port}") as c:
            usage = [list(c.stub.Generate(build_request(ids, max_new_tokens=2), timeout=WAIT))
                     [-1].finished.usage for ids in (doc + [1, 2, 3], doc + [7, 8])]
        assert [u.cached_prompt_tokens for u in usage] == [0, 40]
        assert [u.prompt_tokens for u in usage] == [43, 42]      # cached tokens are part of the prompt's
    finally:
        server.drain(0)


# ---------------------------------------------------------------- cancellation
def test_deadline_is_counted_apart_from_cancel(server, logs):
    with Client(f"127.0.0.1:{server.port}") as c:
        with pytest.raises(grpc.RpcError) as e:
            list(c.generate_stream([5, 6], request_id="dl", max_new_tokens=ENDLESS, timeout=0.5))
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert logs.wait("request", request_id="dl")["status"] == "DEADLINE_EXCEEDED"
        call = c.generate_stream([5, 6], request_id="cx", max_new_tokens=ENDLESS, timeout=WAIT)
        next(iter(call))
        call.cancel()
        assert logs.wait("request", request_id="cx")["status"] == "CANCELLED"
    assert counter(server, "DEADLINE_EXCEEDED", "cancelled") == 1
    assert counter(server, "CANCELLED", "cancelled") == 1
    poll(lambda: server.service.scheduler.idle(), "slots freed")


def _raw_post(server, path, body: dict, rid: str) -> socket.socket:
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", server.http_port))
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Request-Id: {rid}\r\n"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


def test_http_disconnect_cancels_the_request(server, logs):
    sch = server.service.scheduler
    # not streaming: the client gives up while the answer is being generated
    s = _raw_post(server, "/v1/chat/completions", {**CHAT, "max_tokens": ENDLESS}, "gone-1")
    poll(lambda: sch.snapshot()["running"] == 1, "admitted")
    s.close()
    assert logs.wait("request", request_id="gone-1")["status"] == "CANCELLED"
    # streaming: the client reads a few chunks and closes
    with httpx.stream("POST", url(server, "/v1/chat/completions"), json={**CHAT, "max_tokens": ENDLESS, "stream": True},
                      headers={"x-request-id": "gone-2"}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    assert logs.wait("request", request_id="gone-2")["status"] == "CANCELLED"
    poll(lambda: sch.idle(), "slots freed")


def test_full_queue_is_429_and_resource_exhausted(server):
    sch = server.service.scheduler
    socks = [_raw_post(server, "/v1/completions", {"model": "embedded-default", "prompt": [5], "max_tokens": ENDLESS},
                       f"hold-{i}") for i in range(4)]
    poll(lambda: sch.snapshot() == {"waiting": 2, "running": 2}, "2 running + 2 queued")
    r = httpx.post(url(server, "/v1/chat/completions"), json=CHAT)
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    assert r.json()["error"]["code"] == "queue_full"
    with Client(f"127.0.0.1:{server.port}") as c:
        with pytest.raises(grpc.RpcError) as e:
            c.complete([5], max_new_tokens=2, timeout=WAIT)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    for s in socks:
        s.close()
    poll(lambda: sch.idle(), "all cancelled")
    assert counter(server, "QUEUE_FULL") == 2


# ---------------------------------------------------------------- signals
def test_second_sigterm_during_drain_exits_at_once_nonzero():
    env = {**__import__("os").environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "serve_doubles.py"), "--port", "0",
                             "--max-batch", "1", "--grace-seconds", "600"], cwd=ROOT, env=env,
                            stderr=subprocess.PIPE, text=True)
    events: list[dict] = []
    cond = threading.Condition()

    def read():
        for line in proc.stderr:
            if line.startswith("{"):
                with cond:
                    events.append(json.loads(line))
                    cond.notify_all()

    threading.Thread(target=read, daemon=True).start()

    def wait(name):
        with cond:
            assert cond.wait_for(lambda: any(e["event"] == name for e in events), WAIT), name
            return next(e for e in events if e["event"] == name)

    try:
        with Client(wait("listening")["address"]) as c:
            c.wait_ready(WAIT)
            stream = c.generate_stream([5], max_new_tokens=ENDLESS, timeout=WAIT)
            next(iter(stream))
            proc.send_signal(signal.SIGTERM)
            wait("draining")                       # the running stream holds the drain (grace 600 s)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(WAIT) == 1
        assert wait("forced_exit")["exit_code"] == 1
    finally:
        if proc.poll() is None:
            proc.kill()


class BlockingTokenizer(CountingTokenizer):
    """encode waits for `release`: a stand-in for a slow tokenization."""

    def __init__(self, tok):
        super().__init__(tok)
        self.entered, self.release = threading.Event(), threading.Event()

    def encode(self, *a, **k):
        self.entered.set()
        assert self.release.wait(WAIT)
        return self.tok.encode(*a, **k)


def test_tokenization_is_off_the_health_and_decode_path(server):
    """While one prompt is being tokenized (held here), health answers on both front ends and a running
    stream keeps getting tokens: tokenizing runs in the prep pool, not on the scheduler or I/O threads."""
    tok = server.engine.tokenizer = BlockingTokenizer(server.engine.tokenizer)
    with Client(f"127.0.0.1:{server.port}") as c:
        running = c.generate_stream([5, 6], max_new_tokens=ENDLESS, timeout=WAIT)
        it = iter(running)
        next(it)
        slow = c.generate_stream("a prompt that takes long to tokenize", max_new_tokens=2, timeout=WAIT)
        slow_events = []
        t = threading.Thread(target=lambda: slow_events.extend(slow), daemon=True)
        t.start()
        assert tok.entered.wait(WAIT)
        assert c.health_status() == "SERVING"
        assert httpx.get(url(server, "/health")).status_code == 200
        deltas = 0
        for r in it:                                    # tokens keep coming while encode is held
            deltas += r.WhichOneof("event") == "delta"
            if deltas == 20:
                break
        assert not tok.release.is_set() and not slow_events
        tok.release.set()
        t.join(WAIT)
        assert slow_events[-1].WhichOneof("event") == "finished"
        running.cancel()
