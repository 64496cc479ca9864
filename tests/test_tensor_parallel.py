"""Tensor parallelism is configuration: the same checkpoint on a mesh of 2 and 4 (simulated CPU) devices,
weights sharded by their logical axes (heads, MLP width) and the KV cache by kv heads, gives the same
logits as transformers. Runs in a subprocess because the device count is fixed when JAX starts."""
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import numpy as np, zenjax
    ckpt, ref = sys.argv[1], np.load(sys.argv[2])
    for tp in (2, 4):
        e = zenjax.load(ckpt, max_model_len=128, prefill_chunk=16, attention="reference", dtype="float32",
                        tensor_parallel=tp, verbose=False)
        assert e._cache.k[0].sharding.spec[2] == "tp"                 # cache split by kv heads
        assert len(e._cache.k[0].sharding.device_set) == tp
        got = e.logits(ref["ids_70"].tolist())
        err = np.abs(got - ref["logits_70"]).max() / np.abs(ref["logits_70"]).max()
        print(tp, err)
        assert err <= 1e-4, (tp, err)                                  # same bound as tests/test_parity.py
""")


def test_tp_2_and_4_match_transformers(hf_fixture, converted):
    ckpt = converted("gqa7")          # 28 q / 4 kv heads: 4 ways leaves one kv head (7 q heads) per device
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(ckpt), str(hf_fixture("gqa7") / "reference.npz")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
