"""End-to-end tests of `python -m zenjax.serve` on the embedded default model (CPU).

A real server runs in a subprocess on a free loopback port (127.0.0.1 only) and real gRPC clients talk
to it. One server (2 batch slots, max_model_len 1024, prefill chunk 16, queue of 2) is shared by the
module; the SIGTERM test starts its own with the same shapes. Every subprocess shares a persistent JAX
compilation cache, so only the first server pays the compile time.
"""
from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from zenjax.client import FINISH_REASONS, Client, build_request
from zenjax.serve import zenjax_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("serve_load", ROOT / "benchmarks" / "serve_load.py")
serve_load = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve_load)

MAX_MODEL_LEN, PREFILL_CHUNK, MAX_BATCH, MAX_QUEUE = 1024, 16, 2, 2
SHAPE_ARGS = ["--max-batch", str(MAX_BATCH), "--max-model-len", str(MAX_MODEL_LEN),
              "--prefill-chunk", str(PREFILL_CHUNK)]
TIMEOUT = 120.0   # per RPC; bounds every wait below (no test relies on speed, only on order)


free_port = serve_load.free_port


def server_env(tmp_path_factory) -> dict:
    """CPU, and one persistent compilation cache for every server/engine subprocess of the session."""
    cache = tmp_path_factory.getbasetemp() / "zenjax-jax-cache"
    cache.mkdir(exist_ok=True)
    return serve_load.server_env(cache)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    mport = free_port()
    srv = serve_load.ServerProcess([*SHAPE_ARGS, "--max-queue", str(MAX_QUEUE), "--metrics-port", str(mport),
                                    "--grace-seconds", "30"], env=server_env(tmp_path_factory))
    srv.metrics_port = mport
    yield srv
    assert srv.stop() == 0, srv.stderr_tail()


@pytest.fixture(scope="module")
def client(server):
    with Client(server.target) as c:
        yield c


class Stream:
    """Reads one Generate stream in a thread; records each event with a global arrival index."""

    _counter = 0
    _lock = threading.Lock()

    def __init__(self, client: Client, prompt, timeout=TIMEOUT, **sampling):
        self.call = client.generate_stream(prompt, timeout=timeout, **sampling)
        self.events: list[tuple[int, str, object]] = []   # (arrival index, kind, payload)
        self.error: grpc.RpcError | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        try:
            for r in self.call:
                kind = r.WhichOneof("event")
                with Stream._lock:
                    Stream._counter += 1
                    idx = Stream._counter
                with self._cond:
                    self.events.append((idx, kind, getattr(r, kind)))
                    self._cond.notify_all()
        except grpc.RpcError as e:
            self.error = e
        with self._cond:
            self.done = True
            self._cond.notify_all()

    done = False

    def wait_for(self, kind: str, n: int = 1, timeout: float = TIMEOUT):
        deadline = time.monotonic() + timeout
        with self._cond:
            while sum(k == kind for _, k, _ in self.events) < n:
                assert not self.done, f"stream ended before {n} {kind} events: {self.error}"
                assert time.monotonic() < deadline, f"no {n} {kind} events in {timeout}s"
                self._cond.wait(0.1)

    def join(self, timeout: float = TIMEOUT):
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "stream did not end"
        return self

    def of(self, kind):
        return [(i, p) for i, k, p in self.events if k == kind]

    @property
    def token_ids(self):
        return [t for _, p in self.of("delta") for t in p.token_ids]

    @property
    def text(self):
        return "".join(p.text for _, p in self.of("delta"))

    @property
    def finished(self):
        f = self.of("finished")
        return f[-1][1] if f else None


def wait_metrics(server, timeout=TIMEOUT, **want):
    deadline = time.monotonic() + timeout
    while True:
        m = serve_load.scrape_metrics(server.metrics_port)
        if all(m.get(k) == v for k, v in want.items()):
            return m
        assert time.monotonic() < deadline, f"metrics never reached {want}: {m}"
        time.sleep(0.05)


def _vocab_size() -> int:
    from zenjax.checkpoint import read_config
    from zenjax.engine import DEFAULT_CHECKPOINT
    return read_config(DEFAULT_CHECKPOINT)[0].vocab_size


VOCAB = _vocab_size()


def long_prompt(n: int, offset: int = 0) -> list[int]:
    """n valid token ids, a fixed pattern (prompts given as ids work with any tokenizer)."""
    return [3 + (offset + 7 * i) % (VOCAB - 6) for i in range(n)]


# ---------------------------------------------------------------- health, reflection, info, tokenize
def test_health_serving_and_reflection_lists_services(server, client):
    for service in ("", "zenjax.v1.Inference"):
        r = client.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert r.status == health_pb2.HealthCheckResponse.SERVING
    db = ProtoReflectionDescriptorDatabase(client.channel)
    services = set(db.get_services())
    assert {"zenjax.v1.Inference", "grpc.health.v1.Health"} <= services, services
    # the full service description is available without the .proto (what grpcurl needs)
    fd = db.FindFileContainingSymbol("zenjax.v1.Inference")
    assert fd.package == "zenjax.v1"
    assert {m.name for m in fd.service[0].method} == {"Generate", "Tokenize", "Detokenize", "ModelInfo"}
    ready = server.find("ready")
    assert ready and ready[0]["warmup_s"] >= 0


def test_model_info_describes_engine_and_kv_budget(client):
    from zenjax.checkpoint import read_config
    from zenjax.engine import DEFAULT_CHECKPOINT
    cfg, meta = read_config(DEFAULT_CHECKPOINT)
    info = client.model_info()
    assert info.model == "embedded-default"
    assert (info.max_model_len, info.prefill_chunk, info.max_batch, info.max_queue) == \
        (MAX_MODEL_LEN, PREFILL_CHUNK, MAX_BATCH, MAX_QUEUE)
    a = info.architecture
    assert (a.vocab_size, a.num_layers, a.num_heads, a.num_kv_heads, a.head_dim) == \
        (cfg.vocab_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    kv = info.kv_cache
    assert kv.allocation == "reservation" and kv.slots == MAX_BATCH and kv.tokens_per_slot == MAX_MODEL_LEN
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[kv.dtype]
    assert kv.bytes_per_token == 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize
    assert kv.total_bytes == kv.bytes_per_token * MAX_BATCH * MAX_MODEL_LEN
    assert info.HasField("dca") == (cfg.dca is not None)
    if cfg.dca is not None:
        assert (info.dca.chunk_size, info.dca.local_size) == (cfg.dca.chunk_size, cfg.dca.local_size)
    eos = meta["generation"]["eos_token_id"]
    assert list(info.eos_token_ids) == (eos if isinstance(eos, list) else [eos])


def test_tokenize_detokenize_round_trip(client):
    from zenjax.engine import DEFAULT_CHECKPOINT
    from zenjax.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(DEFAULT_CHECKPOINT)
    text = "The pass key is 71432. Remember it. 71432 is the pass key."
    ids = client.tokenize(text)
    assert ids == tok.encode(text) and len(ids) > 5
    assert client.detokenize(ids) == text
    chat = [{"role": "user", "content": "What is the pass key?"}]
    chat_ids = client.tokenize(chat)
    assert chat_ids == tok.apply_chat_template(chat, add_generation_prompt=True)
    assert "What is the pass key?" in client.detokenize(chat_ids)
    with pytest.raises(grpc.RpcError) as e:
        client.detokenize([5, 10**6])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "token_ids" in e.value.details()


# ---------------------------------------------------------------- generation
REFERENCE_CASES = [
    ("text greedy", "The pass key is 12345. Remember it.", dict(max_new_tokens=12)),
    ("chat sampled, seed", [{"role": "user", "content": "What is the pass key?"}],
     dict(max_new_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=7)),
    ("ids over several prefill chunks", long_prompt(70), dict(max_new_tokens=10, repetition_penalty=1.1)),
    ("ignore_eos sampled", "Remember it.", dict(max_new_tokens=20, temperature=1.0, seed=3, ignore_eos=True)),
]


@pytest.fixture(scope="module")
def engine_reference(tmp_path_factory):
    """engine.generate for REFERENCE_CASES, in a subprocess with the server's engine shapes (so the test
    process never imports JAX state and the compile cache is shared)."""
    script = textwrap.dedent(f"""
        import json, sys
        import zenjax
        from zenjax.sampling import SamplingParams
        cases = json.load(sys.stdin)
        e = zenjax.load(None, max_batch={MAX_BATCH}, max_model_len={MAX_MODEL_LEN}, prefill_chunk={PREFILL_CHUNK},
                        verbose=False)
        out = []
        for prompt, sampling in cases:
            r = e.generate(prompt, SamplingParams(**sampling))
            out.append(dict(text=r.text, token_ids=r.token_ids, finish_reason=r.finish_reason,
                            prompt_tokens=r.prompt_tokens))
        print(json.dumps(out))
    """)
    cases = [[p, s] for _, p, s in REFERENCE_CASES]
    r = subprocess.run([sys.executable, "-c", script], input=json.dumps(cases), capture_output=True, text=True,
                       cwd=ROOT, env=server_env(tmp_path_factory), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", range(len(REFERENCE_CASES)), ids=[c[0] for c in REFERENCE_CASES])
def test_stream_equals_engine_generate(client, engine_reference, case):
    _, prompt, sampling = REFERENCE_CASES[case]
    want = engine_reference[case]
    s = Stream(client, prompt, **sampling).join()
    assert s.error is None, s.error
    assert s.token_ids == want["token_ids"]
    assert s.text == want["text"]
    fin = s.finished
    assert FINISH_REASONS[fin.reason] == want["finish_reason"]
    assert fin.usage.prompt_tokens == want["prompt_tokens"]
    assert fin.usage.generated_tokens == len(want["token_ids"])
    assert fin.usage.time_to_first_token_s > 0 and fin.usage.total_time_s >= fin.usage.time_to_first_token_s
    # prefill progress: one event per chunk, increasing, ending at the prompt length, all before tokens
    progress = s.of("progress")
    n = want["prompt_tokens"]
    assert [p.prefilled_tokens for _, p in progress] == [min(n, k * PREFILL_CHUNK)
                                                         for k in range(1, -(-n // PREFILL_CHUNK) + 1)]
    assert all(p.prompt_tokens == n for _, p in progress)
    assert progress[-1][0] < s.of("delta")[0][0]


def test_request_id_is_echoed_and_logged(server, client):
    rid = "test-log-42"
    events = list(client.generate_stream("Remember it.", request_id=rid, max_new_tokens=3, ignore_eos=True))
    assert events and all(r.request_id == rid for r in events)
    log = server.wait_event("request", 30, request_id=rid)
    assert log["status"] == "OK" and log["finish_reason"] == "length" and log["generated_tokens"] == 3
    assert log["prompt_tokens"] > 0 and log["ttft_s"] > 0 and "tokens_per_s" in log


BAD_REQUESTS = [
    ("no prompt", pb.GenerateRequest(), "prompt"),
    ("empty text", build_request(""), "text"),
    ("empty ids", build_request([]), "token_ids"),
    ("id out of range", build_request([5, 10**6]), "token ids"),
    ("unknown role", build_request([{"role": "robot", "content": "hi"}]), "chat.messages[0].role"),
    ("over-long prompt", build_request(long_prompt(MAX_MODEL_LEN)), "prompt"),
    ("prompt + max_new_tokens too long", build_request(long_prompt(MAX_MODEL_LEN - 10), max_new_tokens=11),
     "sampling.max_new_tokens"),
    ("max_new_tokens 0", build_request("hi", max_new_tokens=0), "sampling.max_new_tokens"),
    ("negative temperature", build_request("hi", temperature=-0.5), "sampling.temperature"),
    ("nan temperature", build_request("hi", temperature=float("nan")), "sampling.temperature"),
    ("top_p > 1", build_request("hi", top_p=1.5), "sampling.top_p"),
    ("top_p 0", build_request("hi", top_p=0.0), "sampling.top_p"),
    ("negative top_k", build_request("hi", top_k=-1), "sampling.top_k"),
    ("min_p > 1", build_request("hi", min_p=2.0), "sampling.min_p"),
    ("repetition_penalty 0", build_request("hi", repetition_penalty=0.0), "sampling.repetition_penalty"),
    ("empty stop string", build_request("hi", stop=[""]), "stop"),
    ("negative stop id", build_request("hi", stop_token_ids=[-3]), "stop_token_ids"),
]


@pytest.mark.parametrize("case", range(len(BAD_REQUESTS)), ids=[c[0] for c in BAD_REQUESTS])
def test_bad_input_is_invalid_argument_naming_the_field(server, client, case):
    _, request, field = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as e:
        list(client.stub.Generate(request, timeout=TIMEOUT))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
    assert field in e.value.details(), e.value.details()
    # nothing queued or running, and the server still serves
    wait_metrics(server, zenjax_running_sequences=0, zenjax_queue_depth=0)
    ok = client.complete("Remember it.", max_new_tokens=2, ignore_eos=True, timeout=TIMEOUT)
    assert len(ok.token_ids) == 2


# ---------------------------------------------------------------- load behaviour
def test_full_queue_is_resource_exhausted_and_cancel_frees_slot(server, client):
    """2 slots + 2 queued requests fill the server; the 5th is RESOURCE_EXHAUSTED. Cancelling a running
    one hands its slot to the oldest queued request; a deadline frees the slot the same way."""
    endless = dict(max_new_tokens=MAX_MODEL_LEN - 10, ignore_eos=True)
    running = [Stream(client, [5, 6, 7], **endless) for _ in range(2)]
    for s in running:
        s.wait_for("delta")
    queued = [Stream(client, [8, 9], **endless), Stream(client, [10, 11], max_new_tokens=4, ignore_eos=True)]
    wait_metrics(server, zenjax_running_sequences=2, zenjax_queue_depth=2)
    with pytest.raises(grpc.RpcError) as e:
        list(client.generate_stream("hi", max_new_tokens=2, timeout=TIMEOUT))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue" in e.value.details()

    running[0].call.cancel()                        # slot 0 -> queued[0]
    queued[0].wait_for("delta")
    assert running[1].finished is None, "the other running request must be untouched"
    running[1].call.cancel()                        # slot 1 -> queued[1], which then completes
    queued[1].join()
    assert queued[1].finished.reason == pb.FINISH_REASON_LENGTH and len(queued[1].token_ids) == 4
    queued[0].call.cancel()
    wait_metrics(server, zenjax_running_sequences=0, zenjax_queue_depth=0)
    for s in running + queued[:1]:
        s.join()
        assert s.error is not None and s.error.code() == grpc.StatusCode.CANCELLED
    cancelled_logs = [e for e in server.find("request") if e["status"] == "CANCELLED"]
    assert len(cancelled_logs) >= 3

    # deadline: the client gives up, the server frees the slot within one engine step
    dl = Stream(client, [5, 6, 7], timeout=1.0, **endless).join()
    assert dl.error is not None and dl.error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_metrics(server, zenjax_running_sequences=0, zenjax_queue_depth=0)
    ok = client.complete([5, 6, 7], max_new_tokens=3, ignore_eos=True, timeout=TIMEOUT)
    assert len(ok.token_ids) == 3


def test_short_prompt_gets_first_token_while_long_prompt_prefills(client):
    """A 1000-token prompt needs 63 prefill chunks of 16; a short prompt submitted after the long one's
    first chunk is prefilled between its chunks and streams its first token before the long prompt's
    last chunk (order of arrival at the client; no timing assumed)."""
    long = Stream(client, long_prompt(1000), max_new_tokens=2, ignore_eos=True)
    long.wait_for("progress")
    short = Stream(client, [5, 6, 7, 8], max_new_tokens=4, ignore_eos=True)
    short.join()
    long.join()
    assert short.error is None and long.error is None
    first_short_token = short.of("delta")[0][0]
    last_long_chunk = long.of("progress")[-1]
    assert last_long_chunk[1].prefilled_tokens == 1000
    assert first_short_token < last_long_chunk[0], "short prompt waited for the whole long prefill"
    # and the short request finished entirely while the long one was still reading its prompt
    assert short.of("finished")[0][0] < last_long_chunk[0]


def test_seeded_output_does_not_depend_on_concurrent_requests(client):
    """The same seeded, sampled request gives the same tokens alone and while another sequence decodes
    between its prefill chunks (per-slot sampler state must not move with other slots' steps)."""
    sampling = dict(max_new_tokens=8, temperature=0.8, seed=11, ignore_eos=True)
    alone = Stream(client, long_prompt(200, 1), **sampling).join()
    busy = Stream(client, [5, 6, 7], max_new_tokens=MAX_MODEL_LEN - 10, ignore_eos=True)
    busy.wait_for("delta")
    together = Stream(client, long_prompt(200, 1), **sampling).join()
    busy.call.cancel()
    busy.join()
    assert alone.error is None and together.error is None
    assert together.token_ids == alone.token_ids


def test_metrics_endpoint(server, client):
    client.complete("Remember it.", max_new_tokens=3, ignore_eos=True, timeout=TIMEOUT)
    m = serve_load.scrape_metrics(server.metrics_port)
    for name in ("zenjax_queue_depth", "zenjax_running_sequences", "zenjax_kv_cache_reserved_ratio",
                 "zenjax_kv_cache_used_ratio", "zenjax_prefill_tokens_per_second", "zenjax_prefill_tokens_total",
                 "zenjax_generated_tokens_total", "zenjax_time_to_first_token_seconds_count",
                 "zenjax_inter_token_latency_seconds_count"):
        assert name in m, name
    assert m["zenjax_time_to_first_token_seconds_count"] >= 1
    assert m["zenjax_generated_tokens_total"] >= 3 and m["zenjax_prefill_tokens_total"] >= 1


# ---------------------------------------------------------------- shutdown
def test_sigterm_drains_then_exits_zero(tmp_path_factory):
    """SIGTERM: queued requests get UNAVAILABLE, new ones too; a running stream that finishes within the
    grace period completes normally; one that does not is ended with finish reason CANCELLED; exit 0."""
    # grace 5 s: `quick` (60 tokens) must not be able to finish before the signal lands, even on a loaded
    # CPU, yet finish within the grace period; `endless` (32758 tokens) cannot: with 16 decode steps per
    # device call 1014 tokens took under 5 s on the CPU, so this server's slots are 32768 tokens long.
    long_len = 32768
    srv = serve_load.ServerProcess(["--max-batch", str(MAX_BATCH), "--max-model-len", str(long_len),
                                    "--prefill-chunk", str(PREFILL_CHUNK), "--max-queue", "2",
                                    "--grace-seconds", "5"], env=server_env(tmp_path_factory))
    try:
        with Client(srv.target) as c:
            endless = Stream(c, [5, 6, 7], max_new_tokens=long_len - 10, ignore_eos=True)
            endless.wait_for("delta")
            quick = Stream(c, [8, 9], max_new_tokens=60, ignore_eos=True)
            quick.wait_for("delta")
            waiting = Stream(c, [10, 11], max_new_tokens=4, ignore_eos=True)
            srv.proc.send_signal(signal.SIGTERM)
            srv.wait_event("draining", TIMEOUT)
            waiting.join()
            assert waiting.error is not None and waiting.error.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in waiting.error.details()
            with pytest.raises(grpc.RpcError) as e:
                list(c.generate_stream("hi", max_new_tokens=2, timeout=TIMEOUT))
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            quick.join()
            assert quick.error is None and quick.finished.reason == pb.FINISH_REASON_LENGTH
            assert len(quick.token_ids) == 60
            endless.join()
            assert endless.error is None and endless.finished.reason == pb.FINISH_REASON_CANCELLED
            assert endless.finished.usage.generated_tokens == len(endless.token_ids) < long_len - 10
        assert srv.proc.wait(TIMEOUT) == 0, srv.stderr_tail()
        assert srv.find("grace_expired") and srv.find("stopped")
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()


# ---------------------------------------------------------------- the command-line client
def test_cli_client_streams_answer(server, engine_reference, tmp_path):
    """`python -m zenjax.client` prints what engine.generate gives (prompt as argument, file or stdin)."""
    _, prompt, sampling = REFERENCE_CASES[0]
    want = engine_reference[0]["text"] + "\n"
    base = [sys.executable, "-m", "zenjax.client", "--server", server.target, "--max-new-tokens",
            str(sampling["max_new_tokens"])]
    r = subprocess.run([*base, prompt], capture_output=True, text=True, cwd=ROOT, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert r.stdout == want
    (tmp_path / "prompt.txt").write_text(prompt)
    r = subprocess.run([*base, "--file", str(tmp_path / "prompt.txt")], capture_output=True, text=True,
                       cwd=ROOT, timeout=TIMEOUT)
    assert r.returncode == 0 and r.stdout == want, r.stderr
    r = subprocess.run([*base, "-"], input=prompt, capture_output=True, text=True, cwd=ROOT, timeout=TIMEOUT)
    assert r.returncode == 0 and r.stdout == want, r.stderr
    r = subprocess.run([*base, "--temperature", "-1", prompt], capture_output=True, text=True, cwd=ROOT,
                       timeout=TIMEOUT)
    assert r.returncode == 1 and "INVALID_ARGUMENT" in r.stderr and "sampling.temperature" in r.stderr


def test_cli_client_draws_prefill_progress_on_a_terminal(server, tmp_path):
    import io
    from zenjax.client import cli

    class Tty(io.StringIO):
        def isatty(self):
            return True

    (tmp_path / "long.txt").write_text("The grass is green. The sky is blue. " * 25)
    out, err = io.StringIO(), Tty()
    rc = cli.main(["--server", server.target, "--file", str(tmp_path / "long.txt"), "--max-new-tokens", "3",
                   "--ignore-eos", "--usage"], stdout=out, stderr=err)
    assert rc == 0, err.getvalue()
    assert "prefill [" in err.getvalue() and "tokens" in err.getvalue()
    assert "\r\033[K" in err.getvalue(), "the bar is cleared before the answer"
    assert "[length] prompt" in err.getvalue() and "generated 3" in err.getvalue()
    assert out.getvalue().endswith("\n")
