"""fp8 weight matmul for decode: a few activation rows times an e4m3 weight with per-output-channel scales.

    y[m, n] = (sum_k x[m, k] * w8[k, n]) * scale[n]        x [M, Kd] bf16/f16/f32, w8 [Kd, Nd] e4m3

Why a kernel: XLA does not fuse the e4m3 -> bf16 convert into the dot, so `x @ w8.astype(bf16)` writes a
bf16 copy of every weight in every decode step and reads 3 bytes per weight element instead of 1 (the 7B
decode step with fp8 weights measured 5.38 ms against 4.98 ms with bf16 weights, H200 2026-12-02). Decode
is bandwidth-bound (M = batch rows <= 16), so the kernel streams w8 once, converts each tile in registers
and multiplies on the tensor cores; the scale is applied once per output after the reduction.

Walk: the grid is (output tiles of `block_n` columns) x (splits of the reduction). Program (j, s) walks
key tiles [s * per, min((s + 1) * per, tiles)) of `block_k` rows of w8, accumulating x[:, tile] @ w8[tile,
j] in float32 ([16, block_n]: M is padded to 16 rows, the smallest tensor-core tile), and writes its
partial sum. The partials [splits, M, Nd] are summed and scaled in jnp (a few MB at most: splits x 16 x Nd
x 4 bytes against Kd x Nd bytes of weight). `default_splits` spreads the work over ~2 programs per SM:
e.g. Qwen2.5-7B's q projection (3584 -> 3584, 28 output tiles of 128) gets 10 splits of 3 key tiles.

Portable Pallas (Triton lowering on GPU; interpret=True on the CPU runs the same body).
`fp8_matmul_reference` is the plain-jnp reference (float32).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._flash_dca import default_interpret

MIN_ROWS = 16
MAX_ROWS = 16                       # decode-sized M; larger M is compute-bound and belongs to XLA
BLOCK_N, BLOCK_K = 128, 128
PROGRAMS_TARGET = 264               # ~2 resident programs on each of the H100/H200's 132 SMs


def default_splits(Kd: int, Nd: int, block_k: int = BLOCK_K, block_n: int = BLOCK_N) -> int:
    """Reduction splits so that output tiles x splits ~ PROGRAMS_TARGET (at least 1, at most the key tiles)."""
    n_tiles, k_tiles = -(-Nd // block_n), -(-Kd // block_k)
    return max(1, min(k_tiles, -(-PROGRAMS_TARGET // n_tiles)))


def _kernel(x_ref, w_ref, o_ref, *, k_tiles, per, block_k, compute_dtype):
    s = pl.program_id(1)
    lo = jnp.minimum(s * per, k_tiles)
    hi = jnp.minimum(lo + per, k_tiles)
    x_all_rows = o_ref.shape[0]

    def body(t, acc):
        ks = pl.ds(pl.multiple_of(t * block_k, block_k), block_k)
        x, w = x_ref[:, ks], w_ref[ks, :]
        return acc + plgpu.dot(x.astype(compute_dtype), w.astype(compute_dtype))

    acc = lax.fori_loop(lo, hi, body, jnp.zeros((x_all_rows, o_ref.shape[1]), jnp.float32))
    o_ref[...] = acc


@functools.partial(jax.jit, static_argnames=("splits", "block_n", "block_k", "num_warps", "num_stages",
                                             "interpret"))
def _fp8_matmul(x, w8, scale, *, splits, block_n, block_k, num_warps, num_stages, interpret):
    M, Kd = x.shape
    Nd = w8.shape[1]
    Mp = max(MIN_ROWS, -(-M // MIN_ROWS) * MIN_ROWS)
    xp = jnp.pad(x, ((0, Mp - M), (0, 0)))
    k_tiles, n_tiles = Kd // block_k, Nd // block_n
    per = -(-k_tiles // splits)
    kernel = functools.partial(_kernel, k_tiles=k_tiles, per=per, block_k=block_k,
                               compute_dtype=x.dtype)
    part = pl.pallas_call(
        kernel,
        grid=(n_tiles, splits),
        in_specs=[pl.BlockSpec((Mp, Kd), lambda j, s: (0, 0)),
                  pl.BlockSpec((Kd, block_n), lambda j, s: (0, j))],
        out_specs=pl.BlockSpec((None, Mp, block_n), lambda j, s: (s, 0, j)),
        out_shape=jax.ShapeDtypeStruct((splits, Mp, Nd), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="fp8_matmul",
    )(xp, w8)
    y = jnp.sum(part, axis=0)[:M] * scale[None, :]
    return y


def supported(M: int, Kd: int, Nd: int, *, block_k: int = BLOCK_K, block_n: int = BLOCK_N) -> bool:
    """Whether fp8_matmul takes this shape (decode-sized M, whole tiles); else use the XLA matmul."""
    return 0 < M <= MAX_ROWS and Kd % block_k == 0 and Nd % block_n == 0


def fp8_matmul(x, w8, scale, *, out_dtype=None, splits: int | None = None, block_n: int = BLOCK_N,
               block_k: int = BLOCK_K, num_warps: int = 4, num_stages: int = 3, interpret: bool | None = None):
    """x [M, Kd] (M <= 16) times e4m3 w8 [Kd, Nd] with float32 scale [Nd] -> [M, Nd] in out_dtype (x's
    dtype by default). Accumulation float32; the tile product runs in x's dtype (bf16/f16 on the GPU;
    every e4m3 value is exact in bf16). Kd and Nd must be whole tiles (`supported`)."""
    if x.ndim != 2 or w8.ndim != 2 or x.shape[1] != w8.shape[0] or scale.shape != (w8.shape[1],):
        raise ValueError(f"fp8_matmul: x {x.shape}, w8 {w8.shape}, scale {scale.shape}: want [M, K], [K, N], [N]")
    if x.shape[0] > MAX_ROWS:
        raise ValueError(f"fp8_matmul: {x.shape[0]} rows > {MAX_ROWS}; large M belongs to the XLA matmul")
    if not supported(x.shape[0], *w8.shape, block_k=block_k, block_n=block_n):
        raise ValueError(f"fp8_matmul: w8 {w8.shape} must be a whole number of {block_k} x {block_n} tiles")
    if w8.dtype != jnp.float8_e4m3fn:
        raise ValueError(f"fp8_matmul: w8 must be float8_e4m3fn, got {w8.dtype}")
    if interpret is None:
        interpret = default_interpret()
    splits = default_splits(w8.shape[0], w8.shape[1], block_k, block_n) if splits is None else splits
    y = _fp8_matmul(x, w8, scale.astype(jnp.float32), splits=splits, block_n=block_n, block_k=block_k,
                    num_warps=num_warps, num_stages=num_stages, interpret=bool(interpret))
    return y.astype(out_dtype or x.dtype)


def fp8_matmul_reference(x, w8, scale):
    """Plain jnp, float32: (x @ w8) * scale."""
    return (x.astype(jnp.float32) @ w8.astype(jnp.float32)) * scale.astype(jnp.float32)[None, :]
