"""--compile-cache (zenjax/serve/service.py use_compile_cache): a second process with the same directory
loads every step the warm-up compiles from the cache instead of compiling it. Two subprocesses (the
cache is per process in memory, so only a new one shows the disk cache), each counting JAX's own
compilation-cache events."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from zenjax.serve.service import config_from_args

SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp
from jax._src import monitoring
from zenjax.serve.service import use_compile_cache
counts = {"hits": 0, "misses": 0}
def on(event, **kw):
    if event == "/jax/compilation_cache/cache_hits": counts["hits"] += 1
    if event == "/jax/compilation_cache/cache_misses": counts["misses"] += 1
monitoring.register_event_listener(on)
use_compile_cache(sys.argv[1])
from zenjax.config import ModelConfig, engine_config
from zenjax.engine import Engine
from zenjax.model import init_params
cfg = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=64, num_layers=1, num_heads=4,
                  num_kv_heads=2, head_dim=16, rope_theta=1e4, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  max_position_embeddings=4096)
ec = engine_config(max_model_len=600, prefill_chunk=512, max_batch=2, attention="reference", dtype="float32")
Engine(cfg, init_params(cfg, jax.random.key(0), jnp.float32), ec, verbose=False).warmup()
print(json.dumps(counts))
"""


def _run(cache_dir: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    out = subprocess.run([sys.executable, "-c", SCRIPT, cache_dir], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_process_loads_every_warmup_step_from_the_cache(tmp_path):
    d = str(tmp_path / "xla")
    first = _run(d)
    # a new directory: everything compiles (a hit here is a second jit of an identical computation)
    assert first["misses"] > first["hits"], first
    entries = sorted(os.listdir(d))
    assert len(entries) >= first["misses"] > 0
    second = _run(d)
    # the same steps, all found: no compile, nothing new written
    assert second == {"hits": first["hits"] + first["misses"], "misses": 0}, (first, second)
    assert sorted(os.listdir(d)) == entries


def test_compile_cache_flag(tmp_path):
    assert config_from_args([]).compile_cache is None                 # off by default
    assert config_from_args(["--compile-cache", str(tmp_path / "c")]).compile_cache == str(tmp_path / "c")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SystemExit):
        config_from_args(["--compile-cache", str(f)])                 # a file, not a directory
    with pytest.raises(SystemExit):
        config_from_args(["--compile-cache", str(f / "sub")])         # cannot be made: a file is in the way
    assert not (tmp_path / "c").exists()                              # parsing creates nothing
