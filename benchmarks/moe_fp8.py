"""Qwen1.5-MoE-A2.7B shape and fp8 weights: TTFT and decode ms/step with random weights made on the
device, through the same measure() functions as benchmarks/prefill.py and benchmarks/decode.py.

    python -m benchmarks.moe_fp8 --model moe --lengths 32768 --contexts 8192 --batches 1,8
    python -m benchmarks.moe_fp8 --model 7b --weights fp8 --lengths 32768 --contexts 8192 --batches 1
    python -m benchmarks.moe_fp8 --smoke            # tiny shapes on the CPU: the script runs

--weights fp8 quantizes the random bf16 weights on the device (zenjax.fp8.quantize, the converter's
formula) and drops the bf16 copies. FLOPs and bytes in the rows count the weights a token multiplies by
(benchmarks/common.layer_params: for MoE the router, k experts and the shared expert); at decode batch 8
more experts are touched, so the GB/s figure is a lower bound there.
"""
from __future__ import annotations

import argparse
import dataclasses

import jax

from benchmarks import decode, prefill
from benchmarks.common import ceilings, random_params, write_json
from zenjax.config import MoEConfig, ModelConfig
from zenjax.fp8 import quantize
from zenjax.params import FP8_DTYPE, param_specs, scale_name

QWEN15_MOE_A27B = ModelConfig(vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_layers=24,
                              num_heads=16, num_kv_heads=16, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6,
                              tie_word_embeddings=False, max_position_embeddings=8192,
                              architecture="Qwen2MoeForCausalLM", moe=MoEConfig(60, 4, 1408, 5632))
SMOKE_MOE = dataclasses.replace(QWEN15_MOE_A27B, vocab_size=512, hidden_size=64, intermediate_size=128,
                                num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16,
                                moe=MoEConfig(8, 2, 32, 64, mlp_only_layers=(1,)))


def check_grouped(M: int = 131072, E: int = 60, D: int = 2048, F: int = 1408) -> dict:
    """One grouped projection of the A2.7B shape (32K tokens x top-4 rows, 60 experts): the Mosaic GPU
    ragged dot vs jax.lax.ragged_dot, relative difference and times."""
    import jax.numpy as jnp
    from benchmarks.common import bench
    from zenjax import layers
    x = jax.random.normal(jax.random.key(0), (M, D), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (E, D, F), jnp.bfloat16) * 0.02
    sizes = jnp.bincount(jnp.sort(jax.random.randint(jax.random.key(2), (M,), 0, E)), length=E).astype(jnp.int32)
    mode = layers.GROUPED_MATMUL
    out = {}
    for m in ("xla", "mgpu"):
        layers.GROUPED_MATMUL = m
        f = jax.jit(lambda x, w, s: layers.grouped_linear(x, w, s))
        out[m] = (f(x, w, sizes).astype(jnp.float32), bench(f, x, w, sizes, reps=5))
    layers.GROUPED_MATMUL = mode
    rel = float(jnp.linalg.norm(out["mgpu"][0] - out["xla"][0]) / jnp.linalg.norm(out["xla"][0]))
    flops = 2 * M * D * F
    row = {"rows": M, "experts": E, "rel_mgpu_vs_xla": rel, **{f"{m}_ms": round(t * 1e3, 2) for m, (_, t) in out.items()},
           **{f"{m}_tflops": round(flops / t / 1e12, 1) for m, (_, t) in out.items()}}
    # compile time of one call site vs 24 (a model's layers): is the Mosaic kernel lowered once per call site?
    import time
    layers.GROUPED_MATMUL = "mgpu"
    for n in (1, 24):
        def many(x, w, s, n=n):
            acc = x[:, :1].astype(jnp.float32)
            for i in range(n):
                acc = acc + layers.grouped_linear(x + i, w, s)[:, :1].astype(jnp.float32)
            return acc
        t0 = time.perf_counter()
        jax.jit(many).lower(x, w, sizes).compile()
        row[f"compile_s_{n}_sites"] = round(time.perf_counter() - t0, 1)
    layers.GROUPED_MATMUL = mode
    print("grouped matmul check", row, flush=True)
    return row


def to_fp8(cfg: ModelConfig, params: dict) -> dict:
    """Random bf16 weights -> the fp8 layout (values + scales), one jitted quantizer per distinct shape."""
    fns: dict = {}
    floats = param_specs(cfg)                     # the random weights' (in-major) layout
    for path, spec in param_specs(cfg, "fp8").items():
        if spec.dtype != FP8_DTYPE:
            continue
        node = params
        for k in path[:-1]:
            node = node[k]
        spec = floats[path]
        key = (spec.shape, spec.stacked, spec.in_dims)
        if key not in fns:
            fns[key] = jax.jit(lambda w, spec=spec: quantize(spec, w))
        node[path[-1]], node[scale_name(path[-1])] = fns[key](node[path[-1]])
    return params


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("moe", "7b"), default="moe")
    ap.add_argument("--weights", choices=("bf16", "fp8"), default="bf16")
    ap.add_argument("--lengths", default="32768", help="prefill lengths (TTFT)")
    ap.add_argument("--contexts", default="8192", help="decode contexts")
    ap.add_argument("--batches", default="1,8", help="decode batch sizes")
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--attention", default="cudnn")
    ap.add_argument("--grouped", choices=("xla", "mgpu"), default="mgpu",
                    help="expert matmul: jax.lax.ragged_dot or JAX's Mosaic GPU ragged dot (zenjax.layers)")
    ap.add_argument("--fp8-matmul", choices=("xla", "kernel", "auto", "w8a8"), default=None,
                    help="zenjax.layers.FP8_MATMUL for --weights fp8 (default: the library's)")
    ap.add_argument("--fp8-configs", default=None, help="kernel configs measured by check_fp8_matmul.py "
                    "(its --configs-out JSON) for --fp8-matmul kernel")
    ap.add_argument("--check", action="store_true", help="first compare one MoE layer's grouped matmul "
                    "(mgpu vs ragged_dot) on random routed rows")
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args(argv)
    from zenjax import layers
    layers.GROUPED_MATMUL = a.grouped
    if a.fp8_matmul:
        layers.FP8_MATMUL = a.fp8_matmul
    if a.fp8_configs:
        from pallas_kernels.fp8_matmul import load_tuned
        print(f"fp8 kernel configs: {load_tuned(a.fp8_configs)} from {a.fp8_configs}", flush=True)
    if a.check:
        check_grouped()
    from benchmarks.common import QWEN25_7B_1M, SMOKE
    if a.smoke:
        cfg, attention = (SMOKE_MOE if a.model == "moe" else dataclasses.replace(SMOKE, dca=None)), "reference"
        a.lengths, a.contexts, a.chunk = "64", "32", 32
    else:
        cfg = QWEN15_MOE_A27B if a.model == "moe" else dataclasses.replace(QWEN25_7B_1M, dca=None)
        attention = a.attention
    warm = ceilings(small=a.smoke)
    lengths = [int(x) for x in a.lengths.split(",")]
    contexts = [int(x) for x in a.contexts.split(",")]
    info = {"device": jax.devices()[0].device_kind, "model": a.model, "weights": a.weights, "ceilings": warm,
            "grouped": a.grouped, "fp8_matmul": layers.FP8_MATMUL}
    out = dict(info, prefill=[], decode={})
    name = (f"moe_fp8_{a.model}_{a.weights}{'' if a.grouped == 'mgpu' else '_' + a.grouped}"
            f"{'' if a.fp8_matmul is None else '_' + a.fp8_matmul}.json")
    for b in [int(x) for x in a.batches.split(",")]:
        params = random_params(cfg)
        if a.weights == "fp8":
            params = to_fp8(cfg, params)
        # batch 1 also measures TTFT, so its cache holds the longest prompt; a batch of b slots holds only
        # the decode contexts (b x 32K slots of A2.7B's 16 kv heads ran out of memory) plus the ~150 tokens
        # decode.measure generates past each context
        max_len = max((max(lengths) + 256) if b == 1 else 0, max(contexts) + 256)
        engine = prefill.make_engine(cfg, params, max_len, a.chunk, attention, "bfloat16", b)
        del params
        if b == 1:
            out["prefill"] = prefill.measure(engine, lengths, warm)
        out["decode"][str(b)] = decode.measure(engine, contexts, warm, linear_bytes=1 if a.weights == "fp8" else 2)
        write_json(name, out)
        del engine


if __name__ == "__main__":
    main()
