"""Scheduler unit tests: the loop is stepped by hand against a scripted engine double, so the order of
engine calls (interleaving, round-robin, admission, reaping) and per-request failure isolation are
checked deterministically and without JAX. The gRPC tests (test_serve.py) run the real engine."""
from __future__ import annotations

import queue

import pytest

from serve_doubles import SlotQueries  # noqa: E402  (the shared sequence double and slot queries)
from zenjax.config import EngineConfig
from zenjax.sampling import SamplingParams
from zenjax.serve.scheduler import (Delta, Failed, Finished, Progress, QueueFull, Request, Scheduler,
                                    ShuttingDown)

POISON = 666          # a prompt containing this id makes the double's prefill raise
BAD_START = 667       # ... makes start raise ValueError (as the engine does on a bad prompt)


class ScriptedEngine(SlotQueries):
    """Same slot API as zenjax.engine.Engine; logs every call. Token t+1 follows t; the first token is
    the prompt length."""

    def __init__(self, max_batch=2, max_model_len=64, prefill_chunk=4):
        self.max_batch = max_batch
        self.engine_config = EngineConfig(max_model_len=max_model_len, prefill_chunk=prefill_chunk,
                                          max_batch=max_batch)
        self.seqs: dict[int, _Seq] = {}
        self.calls: list[tuple] = []

    def start(self, slot, ids, params, reuse_min=0):
        assert slot not in self.seqs, f"slot {slot} reused before release"
        if BAD_START in ids:
            raise ValueError("prompt: bad id for this test")
        self.calls.append(("start", slot))
        return self._start_seq(slot, ids, params, reuse_min)

    def prefill_next(self, slot, max_tokens=None):
        seq = self.seqs[slot]
        self.calls.append(("prefill", slot) if max_tokens is None else ("prefill", slot, max_tokens))
        if POISON in seq.prompt_ids:
            raise RuntimeError("injected prefill failure")
        seq.prefilled = self.next_piece(slot, max_tokens)[1]
        return seq.prompt_len if seq.prefilled == seq.prompt_len else None

    def warmup(self):                             # the server's warm-up: nothing to compile here
        self.calls.append(("warmup",))

    def decode(self, slots):                      # one step
        self.calls.append(("decode", tuple(slots)))
        return [self.seqs[s].out[-1] + 1 for s in slots]

    decode_block = 4

    def decode_steps(self, slots, n):
        """Like the engine: up to n tokens per slot, fewer where max_new_tokens ends the sequence."""
        self.calls.append(("decode", tuple(slots)) if n == 1 else ("decode", tuple(slots), n))
        out = {}
        for s in slots:
            seq = self.seqs[s]
            left = seq.params.max_new_tokens - len(seq.out)
            out[s] = [seq.out[-1] + 1 + i for i in range(min(n, left))]
        return out

    def release(self, slot, keep=True):
        self.calls.append(("release", slot))
        self._release_seq(slot, keep)


def _req(name, n_prompt, max_new=3):
    return Request(name, list(range(1, n_prompt + 1)), SamplingParams(max_new_tokens=max_new))


def _drain(req):
    out = []
    while True:
        try:
            out.append(req.events.get_nowait())
        except queue.Empty:
            return out


def test_short_prompt_interleaves_with_long_prefill_round_robin():
    eng = ScriptedEngine(max_batch=2, prefill_chunk=4)
    sch = Scheduler(eng, max_queue=4)
    long = _req("long", 40, max_new=2)           # 10 chunks
    sch.submit(long)
    sch.step()
    sch.step()                                    # long: 2 of 10 chunks done
    short = _req("short", 3, max_new=3)           # 1 chunk
    sch.submit(short)
    sch.step()                                    # round-robin: the short prompt's chunk comes next
    ev = _drain(short)
    # its first token comes from the prefill, the second from the same iteration's decode step
    assert ev == [Progress(3, 3), Delta("<3>", (3,)), Delta("<4>", (4,))], ev
    assert eng.seqs[0].prefilled == 8, "long prompt must still be prefilling when short gets a token"
    sch.step()                                    # one long chunk, then one decode step for short
    assert eng.calls[-3:] == [("prefill", 0), ("decode", (1,)), ("release", 1)]
    assert [e for e in _drain(short) if isinstance(e, Finished)][0].reason == "length"
    assert 1 not in eng.seqs, "finished sequence must release its slot"
    while not sch.idle():
        sch.step()
    evs = _drain(long)
    assert [e.prefilled for e in evs if isinstance(e, Progress)] == [4, 8, 12, 16, 20, 24, 28, 32, 36, 40]
    assert [e.token_ids for e in evs if isinstance(e, Delta)] == [(40,), (41,)]
    assert isinstance(evs[-1], Finished) and evs[-1].usage.generated_tokens == 2
    assert eng.seqs == {}


def test_exception_in_one_request_fails_only_that_request():
    eng = ScriptedEngine(max_batch=2)
    sch = Scheduler(eng, max_queue=4)
    good, bad = _req("good", 6, max_new=4), Request("bad", [1, POISON, 3], SamplingParams(max_new_tokens=4))
    sch.submit(good)
    sch.submit(bad)
    for _ in range(20):
        if sch.idle():
            break
        sch.step()
    bad_ev, good_ev = _drain(bad), _drain(good)
    assert len(bad_ev) == 1 and isinstance(bad_ev[0], Failed) and bad_ev[0].code == "internal"
    assert "injected prefill failure" in bad_ev[0].message
    assert isinstance(good_ev[-1], Finished) and good_ev[-1].usage.generated_tokens == 4
    assert eng.seqs == {}, "the failed request's slot must be released"
    after = _req("after", 2, max_new=1)           # the scheduler keeps serving
    sch.submit(after)
    sch.step()
    assert isinstance(_drain(after)[-1], Finished)


def test_start_value_error_is_invalid_argument():
    eng = ScriptedEngine(max_batch=1)
    sch = Scheduler(eng, max_queue=4)
    r = Request("r", [1, BAD_START], SamplingParams(max_new_tokens=2))
    sch.submit(r)
    sch.step()
    ev = _drain(r)
    assert ev == [Failed("invalid_request", "prompt: bad id for this test")]
    assert eng.seqs == {} and sch.idle()


def test_queue_bound_counts_only_requests_beyond_free_slots():
    sch = Scheduler(ScriptedEngine(max_batch=1), max_queue=1)
    sch.submit(_req("a", 2))      # takes the free slot at the next step
    sch.submit(_req("b", 2))      # waits (1 of max_queue=1)
    with pytest.raises(QueueFull, match="max_queue|1 requests"):
        sch.submit(_req("c", 2))


def test_cancel_frees_slot_within_one_step_and_queued_request_takes_it():
    eng = ScriptedEngine(max_batch=1)
    sch = Scheduler(eng, max_queue=4)
    a, b, c = _req("a", 2, max_new=50), _req("b", 2, max_new=2), _req("c", 2, max_new=2)
    for r in (a, b, c):
        sch.submit(r)
    sch.step()
    sch.step()
    assert eng.seqs[0].prompt_ids == a.prompt_ids
    c.cancel()                                   # queued: dropped without touching the engine
    a.cancel()                                   # running: released at the start of the next step
    n_calls = len(eng.calls)
    sch.step()
    assert eng.calls[n_calls] == ("release", 0) and eng.calls[n_calls + 1] == ("start", 0)
    assert isinstance(_drain(a)[-1], Finished) and _drain(c)[-1].reason == "cancelled"
    sch.step()
    assert _drain(b)[-1].reason == "length"
    assert sch.idle() and eng.seqs == {}


def test_stop_admitting_rejects_waiting_and_new_then_cancel_running():
    eng = ScriptedEngine(max_batch=1)
    sch = Scheduler(eng, max_queue=4)
    run, wait = _req("run", 2, max_new=50), _req("wait", 2)
    sch.submit(run)
    sch.step()
    sch.submit(wait)
    sch.stop_admitting()
    assert _drain(wait) == [Failed("unavailable", "server is shutting down before this request started; retry")]
    with pytest.raises(ShuttingDown):
        sch.submit(_req("new", 2))
    sch.step()                                   # running requests continue during the grace period
    assert not sch.idle()
    sch.cancel_running()
    sch.step()
    ev = _drain(run)
    assert isinstance(ev[-1], Finished) and ev[-1].reason == "cancelled" and ev[-1].usage.generated_tokens >= 2
    assert sch.idle() and eng.seqs == {}


# ---------------------------------------------------------------- server configuration (no server started)
def test_server_config_from_args():
    from zenjax.serve.server import ServerConfig, config_from_args
    assert config_from_args([]) == ServerConfig()
    c = config_from_args(["--port", "0", "--max-batch", "8", "--max-model-len", "4096", "--prefill-chunk", "512",
                          "--max-queue", "3", "--metrics-port", "9100", "--grace-seconds", "2.5",
                          "--checkpoint", "/ckpt"])
    assert (c.port, c.max_batch, c.max_model_len, c.prefill_chunk, c.max_queue, c.metrics_port,
            c.grace_seconds, c.checkpoint) == (0, 8, 4096, 512, 3, 9100, 2.5, "/ckpt")
    assert c.host == "127.0.0.1"
    c = config_from_args(["--max-itl-ms", "0", "--prefix-reuse-min", "0"])
    assert (c.max_itl_ms, c.prefix_reuse_min) == (0.0, 0)
    assert (ServerConfig().max_itl_ms, ServerConfig().prefix_reuse_min) == (100.0, 256)


@pytest.mark.parametrize("argv,flag", [(["--max-batch", "0"], "--max-batch"), (["--port", "70000"], "--port"),
                                       (["--max-queue", "-1"], "--max-queue"),
                                       (["--prefill-chunk", "0"], "--prefill-chunk"),
                                       (["--max-itl-ms", "-1"], "--max-itl-ms"),
                                       (["--max-itl-ms", "inf"], "--max-itl-ms"),
                                       (["--prefix-reuse-min", "-5"], "--prefix-reuse-min")])
def test_server_config_rejects_bad_flag(argv, flag, capsys):
    from zenjax.serve.server import config_from_args
    with pytest.raises(SystemExit) as e:
        config_from_args(argv)
    assert e.value.code == 2 and flag in capsys.readouterr().err


def test_sampling_from_proto_defaults_and_field_names():
    from zenjax.serve import zenjax_pb2 as pb
    from zenjax.serve.server import BadRequest, sampling_from_proto
    p = sampling_from_proto(pb.SamplingParams(), prompt_tokens=10, max_model_len=100)
    assert p == SamplingParams(max_new_tokens=90)                 # default 256, capped by the room left
    p = sampling_from_proto(pb.SamplingParams(temperature=0.5, seed=3, stop=["x"], ignore_eos=True), 10, 1000)
    assert (p.temperature, p.seed, p.stop, p.ignore_eos, p.max_new_tokens) == (0.5, 3, ("x",), True, 256)
    with pytest.raises(BadRequest, match=r"^sampling\.max_new_tokens=91: prompt tokens \(10\)"):
        sampling_from_proto(pb.SamplingParams(max_new_tokens=91), 10, 100)
    with pytest.raises(BadRequest, match=r"^sampling\.top_p="):
        sampling_from_proto(pb.SamplingParams(top_p=0.0), 10, 100)


# ---------------------------------------------------------------- through gRPC, with the scripted engine
def test_grpc_internal_error_fails_one_request_and_server_keeps_serving():
    """An engine exception inside one request reaches its client as INTERNAL; a request running at the
    same time and the ones after it are served normally (real gRPC server in this process)."""
    import grpc

    from zenjax.client import Client
    from zenjax.config import ModelConfig
    from zenjax.serve.server import Server, ServerConfig

    eng = ScriptedEngine(max_batch=2, prefill_chunk=4)
    eng.config = ModelConfig(vocab_size=1000, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=28,
                             num_kv_heads=4, head_dim=2, rope_theta=1e4, rms_norm_eps=1e-6,
                             tie_word_embeddings=True, max_position_embeddings=64)
    eng.tokenizer = None
    eng.encode_prompt = lambda prompt: list(prompt)
    server = Server(ServerConfig(port=0, max_batch=2, max_queue=4), engine=eng)
    server.start()
    try:
        with Client(f"127.0.0.1:{server.port}") as c:
            c.wait_ready(30)
            good = c.generate_stream([1, 2, 3, 4, 5, 6, 7, 8, 9], max_new_tokens=5, timeout=30)
            with pytest.raises(grpc.RpcError) as e:
                list(c.generate_stream([1, POISON, 3], max_new_tokens=5, timeout=30))
            assert e.value.code() == grpc.StatusCode.INTERNAL and "injected prefill failure" in e.value.details()
            events = list(good)
            assert events[-1].finished.usage.generated_tokens == 5
            assert c.complete([1, 2], max_new_tokens=2, timeout=30).token_ids == [2, 3]
    finally:
        server.drain(0)
    assert eng.seqs == {}


def test_dca_and_cache_dtype_flags():
    import pytest
    from zenjax.config import DCAConfig
    from zenjax.serve.server import config_from_args, parse_dca
    c = config_from_args(["--dca", "262144,8192,262144", "--cache-dtype", "float8_e4m3fn"])
    assert parse_dca(c.dca) == DCAConfig(262144, 8192, 262144) and c.cache_dtype == "float8_e4m3fn"
    assert config_from_args(["--dca", "off"]).dca == "off"
    for bad in ("x", "64,64,64", "1,2"):
        with pytest.raises(SystemExit):
            config_from_args(["--dca", bad])


def test_decode_runs_blocks_when_nothing_prefills_and_one_step_while_something_does():
    eng = ScriptedEngine(max_batch=2, prefill_chunk=4)
    sch = Scheduler(eng, max_queue=4)
    a = _req("a", 3, max_new=10)
    sch.submit(a)
    sch.step()                                    # prefill (first token) + a block of decode_block = 4
    assert eng.calls[-1] == ("decode", (0,), 4)
    assert [e.token_ids for e in _drain(a) if isinstance(e, Delta)] == [(3,), (4,), (5,), (6,), (7,)]
    b = _req("b", 8, max_new=2)                   # two chunks: while it prefills, decode runs one step
    sch.submit(b)
    sch.step()
    assert eng.calls[-2:] == [("prefill", 1), ("decode", (0,))]
    sch.step()                                    # b's last chunk -> b decodes too; nothing prefills now
    assert eng.calls[-4:] == [("prefill", 1), ("decode", (0, 1), 4), ("release", 0), ("release", 1)]
    # a: 10 tokens in all (the block ended it exactly); b: its prefill token + one decode token, then
    # released although its block had room for 3 more (the engine stops the slot at max_new_tokens)
    evs_a, evs_b = _drain(a), _drain(b)
    assert [e.token_ids[0] for e in evs_a if isinstance(e, Delta)] == [8, 9, 10, 11, 12]
    assert [e.token_ids[0] for e in evs_b if isinstance(e, Delta)] == [8, 9]
    assert isinstance(evs_b[-1], Finished) and evs_b[-1].usage.generated_tokens == 2
    assert isinstance(evs_a[-1], Finished) and evs_a[-1].usage.generated_tokens == 10 and sch.idle()


def test_cancel_takes_effect_within_one_block():
    eng = ScriptedEngine(max_batch=1, prefill_chunk=4)
    sch = Scheduler(eng, max_queue=4)
    a = _req("a", 3, max_new=100)
    sch.submit(a)
    sch.step()
    a.cancel()
    sch.step()                                    # reaped before any further decode call
    evs = _drain(a)
    assert isinstance(evs[-1], Finished) and evs[-1].reason == "cancelled"
    assert evs[-1].usage.generated_tokens == 1 + eng.decode_block and eng.calls[-1] == ("release", 0)
