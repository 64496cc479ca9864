"""The decoder layer's math outside attention itself, as pure functions of (weights, activations).

Every weight multiply of the model goes through `linear` (or `grouped_linear` for a stack of experts):
one seam where a weight format is decided. A weight is a float array or an fp8.Fp8Weight (e4m3 values
plus one float32 scale per output channel, zenjax/fp8.py), so the layer functions below and the MoE
block (zenjax/moe.py) do not change with the weight format.

Per decoder layer (zenjax/model.py runs the rotary, cache write and attention call between the two
projections):
    q, k, v = qkv_projection(w, rms(x))           [B, T, N|K, H]   (one fused q|k|v product)
    x += output_projection(w, attention(...))     [B, T, D]
    x += dense_mlp(w, rms(x))   or   moe_mlp(w, rms(x), cfg.moe)  (zenjax/moe.py)
`w` is the layer's {name: array} dict named as in zenjax/params.py.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from zenjax.config import is_hopper
from zenjax.fp8 import Fp8Weight


# fp8 weights at decode size (<= 16 rows): "kernel" runs the Pallas kernel pallas_kernels/fp8_matmul.py
# on the out-major [N, K] values (it streams e4m3 once; interpret mode on the CPU), "auto" uses it on a
# single GPU, "xla" never: XLA converts the e4m3 values to bf16 inside its dot. The default is "xla":
# timed inside one jit (benchmarks/check_fp8_matmul.py, H100 2026-12-06, us per 7B matrix at 1 row) XLA
# from [N, K] took q/o 16.9, k/v 8.0, gate/up 51.0 against the best kernel configs' 17.1, 12.5 and 47.5;
# the kernel wins only some shapes, with per-shape configs (pallas_kernels.fp8_matmul.load_tuned), and
# end to end (7B decode at 8K, H100 2026-12-07) it ran 4.88 ms/token against 4.71 for "xla".
# (Earlier per-call timings, one dispatch per product, measured jax's ~40 us dispatch, not the matmul.)
# Under a multi-device mesh only the XLA path runs (a Pallas call is not partitioned by GSPMD).
#
# "w8a8" runs the product on fp8 tensor cores (Hopper): each activation row is quantized to e4m3 with its
# own scale (max |x| / 448, vLLM's dynamic per-token fp8), the e4m3 x e4m3 dot accumulates in float32
# (XLA lowers it to cuBLASLt's fp8 GEMM, whose "TN" operand order the out-major values already have), and
# the row and channel scales multiply the result. It reads 1 byte per weight at every size, at the price
# of rounding the activations too (error model: tests/test_fp8_weights.py: logits error 0.06-0.15
# relative on the fixtures vs 0.04-0.11 weight-only).
# The mode is read when a step is traced: set it before the first engine is built.
FP8_MATMUL = "xla"
FP8_MATMUL_MODES = ("xla", "kernel", "auto", "w8a8")


def _flat_matmul_dims(eq: str, x_ndim: int, w_ndim: int):
    """For eq = batch + contracted (x), contracted + out (w) -> batch + out: the number of contracted
    dims, else None (the kernel's [M, K] x [K, N] form does not apply)."""
    ins, out = eq.split("->")
    xs, ws = ins.split(",")
    if "..." in xs:
        fill = "".join(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in eq)[:x_ndim - len(xs) + 3]
        xs, out = xs.replace("...", fill), out.replace("...", fill)
    if len(xs) != x_ndim or len(ws) != w_ndim:
        return None
    nc = next((i for i, c in enumerate(ws) if c not in xs), len(ws))
    if nc == 0 or not xs.endswith(ws[:nc]) or out != xs[:len(xs) - nc] + ws[nc:]:
        return None
    return nc


def _fp8_dims(eq, x, w):
    """For a plain [M, Kd] x [Kd, Nd] product (eq = batch + contracted, contracted + out -> batch + out)
    with an fp8 w (values out-major [out..., in...], scale [out...]): (batch shape, M, Kd, Nd), else None."""
    import math
    nc = _flat_matmul_dims(eq, x.ndim, w.values.ndim)
    if nc is None or w.values.ndim - w.scale.ndim != nc:
        return None
    batch = x.shape[:x.ndim - nc]
    return batch, math.prod(batch), math.prod(w.values.shape[w.scale.ndim:]), w.scale.size


def _fp8_kernel_linear(eq, x, w, out_dtype):
    """The Pallas fp8 matmul (its [N, K] weight layout) when FP8_MATMUL and the shapes allow it, else None."""
    if FP8_MATMUL == "xla" or (FP8_MATMUL == "auto" and (jax.default_backend() != "gpu" or jax.device_count() > 1)):
        return None
    from pallas_kernels.fp8_matmul import config_for, fp8_matmul, supported
    dims = _fp8_dims(eq, x, w)
    if dims is None:
        return None
    batch, M, Kd, Nd = dims
    cfg = config_for(M, Kd, Nd, w_nk=True)
    if not supported(M, Kd, Nd, block_k=cfg.get("block_k", 128), block_n=cfg.get("block_n", 128)):
        return None
    y = fp8_matmul(x.reshape(M, Kd), w.values.reshape(Nd, Kd), w.scale.reshape(Nd), out_dtype=out_dtype or x.dtype,
                   w_nk=True, **cfg)
    return y.reshape(batch + w.scale.shape)


def _w8a8_linear(eq, x, w, out_dtype):
    """x quantized per row to e4m3, times the e4m3 weight on fp8 tensor cores, both scales applied after
    the float32 accumulation: y[m, n] = (x8[m] . q[n, :]) * sx[m] * s[n] (the out-major weight is the "TN"
    operand cuBLASLt's fp8 GEMM wants). None where eq is not a plain [M, K] x [K, N] product."""
    dims = _fp8_dims(eq, x, w)
    if dims is None:
        return None
    batch, M, Kd, Nd = dims
    xf = x.reshape(M, Kd).astype(jnp.float32)
    sx = jnp.maximum(jnp.max(jnp.abs(xf), axis=1, keepdims=True), 1e-30) / 448.0          # [M, 1]
    x8 = (xf / sx).astype(jnp.float8_e4m3fn)
    y = jax.lax.dot_general(x8, w.values.reshape(Nd, Kd), (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)
    y = y * sx * w.scale.reshape(1, Nd)
    return y.astype(out_dtype or x.dtype).reshape(batch + w.scale.shape)


def fp8_eq(eq: str, w: Fp8Weight) -> str:
    """eq (weight subscripts in the float layout's [in..., out...] order) with the weight's subscripts in
    the fp8 values' out-major order: "btd,dnh->btnh" -> "btd,nhd->btnh"; "btnh,nhd->btd" -> "btnh,dnh->btd"."""
    ins, out = eq.split("->")
    xs, ws = ins.split(",")
    nin = w.values.ndim - w.scale.ndim
    return f"{xs},{ws[nin:]}{ws[:nin]}->{out}"


def linear(eq: str, x, w, *, out_dtype=None):
    """x times weight w as the einsum `eq` (x's subscripts first), e.g. "btd,dkgh->btkgh" for w_qkv.
    out_dtype: accumulate into and return this dtype (the router asks for float32).

    fp8: (x @ values) * scale, with eq's weight subscripts permuted to the values' out-major order
    (fp8_eq); every eq here ends with the weight's output subscripts, so the scale [out...] broadcasts
    over the result's trailing dims. FP8_MATMUL may route decode-sized inputs through the Pallas fp8
    kernel or the fp8 tensor cores (off by default)."""
    if isinstance(w, Fp8Weight):
        y = _w8a8_linear(eq, x, w, out_dtype) if FP8_MATMUL == "w8a8" else _fp8_kernel_linear(eq, x, w, out_dtype)
        if y is not None:
            return y
        y = jnp.einsum(fp8_eq(eq, w), x, w.values.astype(x.dtype), preferred_element_type=out_dtype)
        return (y * w.scale).astype(y.dtype)
    return jnp.einsum(eq, x, w, preferred_element_type=out_dtype)


# Grouped expert matmul: "xla" = jax.lax.ragged_dot; "mgpu" (the default) = the Mosaic GPU ragged dot that
# ships with JAX's Pallas ops (jax.experimental.pallas.ops.gpu.ragged_dot_mgpu) where it applies: one Hopper
# GPU, bf16/f16, K a multiple of 64 and N of 128; anything else (the CPU, a mesh, f32) falls back to
# ragged_dot. XLA's ragged_dot ran the Qwen1.5-MoE-A2.7B 32K prefill at 7% of the matmul rate (5.2 s vs
# transformers' 0.695 s, H200 2026-12-02): one A2.7B projection (131072 routed rows, 60 experts,
# 2048 -> 1408) 63.2 ms vs 2.02 ms for the Mosaic kernel (identical outputs). End to end with one jitted
# wrapper shared by the 72 call sites: TTFT 32K 0.633 s vs transformers 0.782 s (H100, 2026-12-06,
# benchmarks/RESULTS.md).
GROUPED_MATMUL = "mgpu"
MGPU_RAGGED = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1)


def _mgpu_ragged_dot(x, w, group_sizes):
    """The Mosaic GPU ragged dot where it applies (see GROUPED_MATMUL), else None."""
    if GROUPED_MATMUL != "mgpu" or jax.default_backend() != "gpu" or jax.device_count() > 1:
        return None
    if not is_hopper(jax.devices()[0].device_kind):                    # wgmma: Hopper only
        return None
    if x.dtype != w.dtype or x.dtype not in (jnp.bfloat16, jnp.float16):
        return None
    cfg = MGPU_RAGGED
    if x.shape[1] % cfg["block_k"] or w.shape[2] % (cfg["block_n"] * cfg["grid_block_n"]):
        return None
    return _mgpu_ragged_dot_jit(x, w, group_sizes.astype(jnp.int32))


@jax.jit
def _mgpu_ragged_dot_jit(x, w, group_sizes):
    """Jitted so that call sites of one shape share one lowering of the Mosaic kernel."""
    from jax.experimental.pallas.ops.gpu.ragged_dot_mgpu import ragged_dot
    return ragged_dot(x, w, group_sizes=group_sizes, **MGPU_RAGGED)


def grouped_linear(x, w, group_sizes, row_experts=None):
    """Rows of x [M, I] grouped by expert times that expert's weight w [E, I, O] -> [M, O].

    Rows 0..group_sizes[0]-1 use w[0], the next group_sizes[1] rows w[1], and so on (the rows must be
    sorted by expert; sum(group_sizes) == M). Shapes are static; only the group boundaries are data.
    Example: group_sizes [2, 0, 1] -> rows 0, 1 use w[0], row 2 uses w[2].
    row_experts [M]: each row's expert, needed for an fp8 w (values out-major [E, O, I]; its scale [E, O]
    is per expert)."""
    if isinstance(w, Fp8Weight):
        dims = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(((1,), (2,)), ((), ())),
                                                 lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
        y = jax.lax.ragged_dot_general(x, w.values.astype(x.dtype), group_sizes, dims)
        return (y * jnp.take(w.scale, row_experts, axis=0)).astype(y.dtype)
    y = _mgpu_ragged_dot(x, w, group_sizes)
    return jax.lax.ragged_dot(x, w, group_sizes) if y is None else y


def _gated_down(gate, up, w_down):
    """The SwiGLU tail both layouts share: (silu(gate) * up) @ w_down."""
    return linear("...f,fd->...d", jax.nn.silu(gate) * up, w_down)


def swiglu(x, w_gate, w_up, w_down):
    """SwiGLU MLP on the last axis: (silu(x @ w_gate) * (x @ w_up)) @ w_down; [..., D] -> [..., D]."""
    return _gated_down(linear("...d,df->...f", x, w_gate), linear("...d,df->...f", x, w_up), w_down)


def fused_swiglu(x, w_gate_up, w_down):
    """swiglu with gate and up as one [D, 2, F] weight (zenjax/params.py: one product, not two)."""
    gu = linear("...d,dsf->...sf", x, w_gate_up)
    return _gated_down(gu[..., 0, :], gu[..., 1, :], w_down)


def qkv_projection(w: dict, h):
    """h [B, T, D] -> q [B, T, N, H], k and v [B, T, K, H], with their biases: one product with the fused
    w_qkv [D, K, G+2, H] (per kv head its G q heads, its k, its v; zenjax/params.py), then split. q head
    n = k * G + g is kv head k's g-th q head, HF's grouping, so the reshape [K, G] -> N is the identity."""
    y = linear("btd,dkgh->btkgh", h, w["w_qkv"]) + w["b_qkv"]
    B, T, K, G2, H = y.shape
    return y[:, :, :, :G2 - 2].reshape(B, T, K * (G2 - 2), H), y[:, :, :, G2 - 2], y[:, :, :, G2 - 1]


def output_projection(w: dict, a):
    """Attention output a [B, T, N, H] -> [B, T, D] (o_proj has no bias)."""
    return linear("btnh,nhd->btd", a, w["wo"])


def dense_mlp(w: dict, h):
    """A dense layer's MLP: h [B, T, D] -> [B, T, D]."""
    return fused_swiglu(h, w["w_gate_up"], w["w_down"])
