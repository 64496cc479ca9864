"""Several processes: the config parser (flags, environment, bad values), the leader / follower protocol in
one process (a queue instead of the broadcast), and 2 local CPU processes x 2 devices each (gloo
collectives) running one tensor-parallel engine: process 0's logits and greedy tokens equal a
single-process engine's while process 1 follows every step.

Tolerance of the 2-process comparison: tp 4 regroups float32 sums (o_proj, MLP down projection) exactly as
on one host with 4 devices: <= 1e-5 * max|logit| (derivation: tests/test_sharded_kernels.py).
"""
from __future__ import annotations

import queue
import re
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import zenjax
from zenjax.distributed import DistributedError, LeaderRunner, distributed_config, follow
from zenjax.sampling import SamplingParams

SAME = 1e-5


def test_config_from_flags_environment_and_errors():
    assert not distributed_config(env={}).enabled
    env = {"JAX_COORDINATOR_ADDRESS": "h0:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    dc = distributed_config(env=env)
    assert (dc.coordinator, dc.num_processes, dc.process_id, dc.is_leader) == ("h0:1234", 2, 1, False)
    dc = distributed_config(coordinator="h1:99", process_id=0, env=env)           # flags win
    assert (dc.coordinator, dc.num_processes, dc.process_id) == ("h1:99", 2, 0)
    for kw, env, words in [(dict(num_processes=2), {}, "--coordinator"),
                           (dict(num_processes=2, process_id=2, coordinator="h:1"), {}, "--process-id=2"),
                           (dict(num_processes=2, coordinator="nohost"), {}, "--coordinator='nohost'"),
                           (dict(num_processes=0), {}, "--num-processes=0"),
                           ({}, {"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two'")]:
        with pytest.raises(DistributedError, match=words.replace("[", r"\[")):
            distributed_config(**kw, env=env)


class QueueChannel:
    def __init__(self):
        self.q = queue.Queue()

    def send(self, action):
        self.q.put(action)

    def receive(self):
        return self.q.get()


def _tree_equal(a, b):
    import jax
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_follower_mirrors_the_leaders_device_state(hf_fixture, converted):
    """A follower that applies the leader's actions ends with the same cache, sampler and decode state,
    through chunked prefill, sampled (seeded) decode and a slot reused."""
    kw = dict(max_model_len=64, prefill_chunk=16, attention="reference", dtype="float32", max_batch=2,
              verbose=False)
    lead, follower = zenjax.load(converted("gqa7"), **kw), zenjax.load(converted("gqa7"), **kw)
    ch = QueueChannel()
    lead.runner = LeaderRunner(lead.runner, ch)
    ids = np.load(hf_fixture("gqa7") / "reference.npz")["ids_33"].tolist()
    lead.generate(ids, SamplingParams(max_new_tokens=5, temperature=0.8, seed=3, ignore_eos=True))
    lead.generate(ids[:9], SamplingParams(max_new_tokens=3, ignore_eos=True))
    lead.logits(ids[:20])
    lead.runner.close()
    ops = []
    n = follow(follower.runner, ch, on_action=ops.append)
    assert n == lead.runner.sent - 1 and {"set_row", "prefill", "sample_first", "decode",
                                           "prefill_all_logits"} <= set(ops)
    for name in ("cache", "sampler", "decode_state"):
        assert _tree_equal(getattr(lead.runner, name), getattr(follower.runner, name)), name
    with pytest.raises(RuntimeError, match="last prefill"):
        lead.runner.sample_first(0, np.zeros((1, 300), np.float32))
    assert lead.runner.temperature(10) == follower.runner.temperature(10)       # host-only: read through
    with pytest.raises(AttributeError, match="does not mirror Runner._put"):
        lead.runner._put(np.zeros(2))        # a device call the followers would not make: refused


SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    pid, port, ckpt, ids_path, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
    from zenjax.distributed import LeaderRunner, distributed_config, follow, initialize
    dc = distributed_config(env={"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                                 "JAX_PROCESS_ID": str(pid)})
    initialize(dc)
    import jax, numpy as np, zenjax
    from zenjax.sampling import SamplingParams
    assert len(jax.devices()) == 4 and len(jax.local_devices()) == 2
    e = zenjax.load(ckpt, max_model_len=64, prefill_chunk=16, attention="pallas", dtype="float32",
                    tensor_parallel=4, verbose=False)
    assert len(e._cache.k[0].sharding.device_set) == 4           # the cache spans both processes
    if dc.is_leader:
        e.runner = LeaderRunner(e.runner)
        ids = np.load(ids_path)["ids_33"].tolist()[:20]
        logits = e.logits(ids)
        greedy = e.generate(ids[:7], SamplingParams(max_new_tokens=3, ignore_eos=True)).token_ids
        e.runner.close()
        np.savez(out, logits=logits, greedy=np.asarray(greedy), sent=e.runner.sent)
    else:
        n = follow(e.runner)
        print("followed", n, flush=True)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_two_devices_each_equal_one_process(hf_fixture, converted, tmp_path):
    ckpt, ref = converted("gqa7"), hf_fixture("gqa7") / "reference.npz"
    port, out = _free_port(), tmp_path / "leader.npz"
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(i), str(port), str(ckpt), str(ref), str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (so, se) in zip(procs, outs):
        assert p.returncode == 0, so[-2000:] + se[-4000:]
    got = np.load(out)
    assert f"followed {int(got['sent']) - 1}" in outs[1][0]             # every action but "stop"
    ids = np.load(ref)["ids_33"].tolist()[:20]
    one = zenjax.load(ckpt, max_model_len=64, prefill_chunk=16, attention="pallas", dtype="float32",
                      verbose=False)
    want = one.logits(ids)
    err = np.abs(got["logits"] - want).max() / np.abs(want).max()
    assert err <= SAME, err
    assert got["greedy"].tolist() == one.generate(ids[:7], SamplingParams(max_new_tokens=3,
                                                                           ignore_eos=True)).token_ids


@pytest.mark.slow
def test_server_on_two_processes_serves_from_process_0(tmp_path):
    """`python -m zenjax.serve --tensor-parallel 2 --num-processes 2 ...`: process 0 serves gRPC, process 1
    (one CPU device each) follows; the greedy completion equals one process's, and SIGTERM to process 0
    drains it and releases process 1 (both exit 0)."""
    import importlib.util
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("serve_load", root / "benchmarks" / "serve_load.py")
    serve_load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve_load)
    env = dict(serve_load.server_env(), XLA_FLAGS="--xla_force_host_platform_device_count=1")
    args = ["--max-batch", "1", "--max-model-len", "256", "--prefill-chunk", "16", "--attention", "reference",
            "--tensor-parallel", "2", "--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", "2"]
    follower = subprocess.Popen([sys.executable, "-m", "zenjax.serve", *args, "--process-id", "1"], cwd=root,
                                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    try:
        leader = serve_load.ServerProcess([*args, "--process-id", "0"], env=env, timeout=300)
        prompt = "The pass key is 71432. Remember it. What is the pass key? The pass key is"
        got = leader.client.complete(prompt, max_new_tokens=6, temperature=0.0, timeout=120)
        assert leader.stop() == 0, leader.stderr_tail()
        err = follower.communicate(timeout=120)[1]
        assert follower.returncode == 0, err[-3000:]
        assert re.search(r"followed [1-9][0-9]* steps", err), err[-3000:]    # warmup + the request
    finally:
        follower.kill()
    one = zenjax.load(max_model_len=256, prefill_chunk=16, attention="reference", verbose=False)
    want = one.generate(prompt, SamplingParams(max_new_tokens=6, temperature=0.0))
    assert got.token_ids == want.token_ids and got.text == want.text, (got, want.text)


def test_server_flags_build_the_config_and_bad_ones_exit_2(capsys, monkeypatch):
    from zenjax.distributed import DistributedConfig
    from zenjax.serve.service import config_from_args
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    c = config_from_args(["--coordinator", "h0:1234", "--num-processes", "2", "--process-id", "1",
                          "--tensor-parallel", "4", "--expert-parallel", "2"])
    assert c.distributed == DistributedConfig("h0:1234", 2, 1) and (c.tensor_parallel, c.expert_parallel) == (4, 2)
    assert not config_from_args([]).distributed.enabled
    for argv, words in [(["--num-processes", "2"], "--coordinator"),
                        (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "5"], "--process-id=5"),
                        (["--tensor-parallel", "0"], "--tensor-parallel=0"),
                        (["--expert-parallel", "-1"], "--expert-parallel=-1")]:
        with pytest.raises(SystemExit) as e:
            config_from_args(argv)
        assert e.value.code == 2 and words in capsys.readouterr().err, argv
