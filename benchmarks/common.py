"""Shared pieces of the GPU benchmarks: the Qwen2.5-7B-Instruct-1M shape, random bf16 weights made on
the device, the two ceilings (matmul rate, copy bandwidth) measured in the same run, and timing."""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from zenjax.config import DCAConfig, ModelConfig

QWEN25_7B_1M = ModelConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                           num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=1e7, rms_norm_eps=1e-5,
                           tie_word_embeddings=False, max_position_embeddings=1010000,
                           dca=DCAConfig(262144, 8192, 262144))


# A tiny model with the 7B head layout (28 q / 4 kv heads) for `--smoke` runs on the CPU.
SMOKE = ModelConfig(vocab_size=512, hidden_size=224, intermediate_size=128, num_layers=2, num_heads=28,
                    num_kv_heads=4, head_dim=8, rope_theta=1e7, rms_norm_eps=1e-5, tie_word_embeddings=False,
                    max_position_embeddings=4096, dca=DCAConfig(256, 32, 256))


def add_model_args(ap) -> None:
    """The options prefill.py and decode.py share."""
    ap.add_argument("--dca", action="store_true", help="DCA on (Qwen2.5-1M config: c=262144, w=8192)")
    ap.add_argument("--attention", default="cudnn")
    ap.add_argument("--cache-dtype", default="bfloat16")
    ap.add_argument("--smoke", action="store_true", help="tiny model on any backend: checks the script runs")


def model_from_args(a) -> tuple[ModelConfig, str]:
    """(model config, attention impl) for parsed add_model_args options."""
    import dataclasses
    cfg = SMOKE if a.smoke else QWEN25_7B_1M
    cfg = cfg if a.dca else dataclasses.replace(cfg, dca=None)
    return cfg, ("reference" if a.smoke else a.attention)


def layer_params(cfg: ModelConfig) -> int:
    """Weights one token multiplies by in the decoder layers (Qwen2-MoE: router, its k experts and the
    shared expert, not all E experts)."""
    D, F, N, K, H = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    total = 0
    for l in range(cfg.num_layers):
        total += D * (N + 2 * K) * H + N * H * D
        if cfg.is_moe_layer(l):
            m = cfg.moe
            total += D * m.num_experts + 3 * D * (m.num_experts_per_tok * m.moe_intermediate_size
                                                  + m.shared_expert_intermediate_size) + D
        else:
            total += 3 * D * F
    return total


def random_params(cfg: ModelConfig, dtype=jnp.bfloat16, scale: float = 0.02):
    """Random weights generated on the device, one tensor at a time (no host copy of 15 GB), laid out as
    zenjax.model.init_params does (norms at 1, the rest normal * scale).

    One small jitted generator per distinct shape (~12 for Qwen2), NOT one jit over the whole model: that
    single module of ~340 random tensors took XLA 3m27s to compile on the H100 (2026-11-23), which is what
    session 1 had blamed on the engine's prefill step (that one compiles in ~11 s)."""
    from zenjax.params import nested_set, param_specs
    makers: dict = {}
    params: dict = {}
    key = jax.random.key(0)
    for i, (path, spec) in enumerate(param_specs(cfg).items()):
        shape = tuple(spec.shape)
        if path[-1].endswith("norm"):
            value = jnp.ones(shape, dtype)
        else:
            if shape not in makers:
                makers[shape] = jax.jit(lambda k, shape=shape: (jax.random.normal(k, shape, jnp.float32)
                                                                * scale).astype(dtype))
            value = makers[shape](jax.random.fold_in(key, i))
        nested_set(params, path, value)
    return params


def bench(f, *args, reps: int = 10, inner: int = 1) -> float:
    """Median seconds per call after one warm-up (compile) call; `inner` calls are queued before each
    sync, which hides host dispatch for calls of a few microseconds (decode kernels)."""
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = f(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / inner)
    return float(np.median(times))


def ceilings(small: bool = False) -> dict:
    """Matmul TFLOP/s (8192^3 bf16) and device copy bandwidth (bytes read + written), measured now."""
    n, m = (512, 1 << 20) if small else (8192, 1 << 30)        # 2 GiB copy on the GPU
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    t = bench(jax.jit(lambda x: x @ x), a)
    x = jax.random.normal(jax.random.key(2), (m,), jnp.bfloat16)
    tc = bench(jax.jit(lambda x: x + 1), x)
    del x
    return {"matmul_tflops": round(2 * n**3 / t / 1e12, 4), "copy_tbs": round(2 * 2 * m / tc / 1e12, 3)}


def peak_memory_gib() -> float:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", 0) / 2**30


def write_json(name: str, data: dict) -> None:
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, name), "w") as f:
            json.dump(data, f, indent=1)
    print(json.dumps(data, indent=1))
