"""Shared pieces of the GPU benchmarks: the Qwen2.5-7B-Instruct-1M shape, random bf16 weights made on
the device, the two ceilings (matmul rate, copy bandwidth) measured in the same run, and timing."""
from __future__ import annotations

import functools
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


DATASHEET_TBS = {"H200": 4.8, "H100": 3.35}      # HBM bandwidth by the vendor's datasheet


def datasheet_tbs() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((v for k, v in DATASHEET_TBS.items() if k in kind), None)


def _pallas_copy(x, block=(1, 8192), interpret=False):
    """A trivial Pallas kernel: each program copies one [1, 8192] bf16 row (16 KiB) of x, a typical
    Triton copy tile; a 1-D grid (CUDA limits the second grid dimension to 65535)."""
    from jax.experimental import pallas as pl
    R, C = x.shape
    spec = pl.BlockSpec(block, lambda i: (i, 0))
    return pl.pallas_call(lambda i_ref, o_ref: o_ref.__setitem__(Ellipsis, i_ref[...]),
                          out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                          grid=(R // block[0],), in_specs=[spec], out_specs=spec,
                          interpret=interpret)(x)


def copy_bandwidth(small: bool = False) -> dict:
    """Device copy bandwidth (bytes read + written per second), several ways, all measured now; the
    ceiling is the best of them. Why several: the old figure (jnp `x + 1` over one 1-D 2 GiB array,
    one call per sync) read 2.57-2.75 TB/s on the H200 while a torch device copy moves ~4.3 TB/s there,
    so decode rows were printed at over 100% "of copy bandwidth".

    loop10: ten in-place passes `x = x + 1` inside ONE jitted fori_loop over a donated 4 GiB [R, 8192]
    array: no dispatch or allocation in the timed region, and the buffer is 70x the 60 MB L2.
    """
    R, C = (64, 8192) if small else (262144, 8192)           # 4 GiB bf16 on the GPU
    nbytes = 2 * R * C
    out = {}
    x = jax.jit(lambda: jnp.ones((R, C), jnp.bfloat16))()

    def loop10(x):
        # the barrier keeps XLA from unrolling the loop and fusing ten adds into one pass
        return jax.lax.fori_loop(0, 10, lambda i, y: jax.lax.optimization_barrier(y + jnp.bfloat16(1)), x)

    f = jax.jit(loop10, donate_argnums=0)
    x = f(x)
    jax.block_until_ready(x)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        x = f(x)
        jax.block_until_ready(x)
        times.append(time.perf_counter() - t0)
    out["jax_loop10_tbs"] = round(10 * 2 * nbytes / float(np.median(times)) / 1e12, 3)
    out["jax_add_2d_tbs"] = round(2 * nbytes / bench(jax.jit(lambda y: y + 1), x, inner=10) / 1e12, 3)
    flat = x.reshape(-1)
    out["jax_add_1d_old_tbs"] = round(2 * nbytes / bench(jax.jit(lambda y: y + 1), flat) / 1e12, 3)
    del flat
    try:
        copy = jax.jit(functools.partial(_pallas_copy, interpret=jax.default_backend() == "cpu"))
        if not bool(jnp.array_equal(copy(x), x)):
            raise AssertionError("pallas copy is wrong")
        out["pallas_copy_tbs"] = round(2 * nbytes / bench(copy, x, inner=10) / 1e12, 3)
    except Exception as e:  # a lowering problem must not lose the other ceilings
        out["pallas_copy_error"] = repr(e)[:300]
    del x
    # a figure above the datasheet means a variant did less work than counted: report it, never use it
    sheet = datasheet_tbs()
    usable = {k: v for k, v in out.items() if k.endswith("_tbs") and (sheet is None or v <= 1.02 * sheet)}
    out["copy_tbs"] = max(usable.values())
    out["copy_from"] = max(usable, key=usable.get)
    return out


def ceilings(small: bool = False) -> dict:
    """Matmul TFLOP/s (8192^3 bf16) and device copy bandwidth (bytes read + written), measured now."""
    n = 512 if small else 8192
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    t = bench(jax.jit(lambda x: x @ x), a)
    out = {"matmul_tflops": round(2 * n**3 / t / 1e12, 4), **copy_bandwidth(small)}
    out["datasheet_tbs"] = datasheet_tbs()
    return out


def peak_memory_gib() -> float:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", 0) / 2**30


def trace_dir(name: str) -> str:
    """Where a profiler trace goes: $OUT/name when $OUT is set (the device tool brings it back), else a new
    temporary directory, so a local run never writes traces into the working tree."""
    out = os.environ.get("OUT")
    if out:
        return os.path.join(out, name)
    import tempfile
    return tempfile.mkdtemp(prefix=f"zenjax-{name}-")


def write_json(name: str, data: dict, echo: bool = True) -> None:
    """data as $OUT/name (when $OUT is set: the device tool brings it back) and, with echo, on stdout."""
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, name), "w") as f:
            json.dump(data, f, indent=1)
    if echo:
        print(json.dumps(data, indent=1))
