"""Several processes: the config parser (flags, environment, bad values), the leader / follower protocol in
one process (a queue instead of the broadcast), and 2 local CPU processes x 2 devices each (gloo
collectives) running one tensor-parallel engine: process 0's logits and greedy tokens equal a
single-process engine's while process 1 follows every step.

Tolerance of the 2-process comparison: tp 4 regroups float32 sums (o_proj, MLP down projection) exactly as
on one host with 4 devices: <= 1e-5 * max|logit| (derivation: tests/test_sharded_kernels.py).
"""
from __future__ import annotations

import queue
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
