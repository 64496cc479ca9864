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

Variants (static arguments, swept by benchmarks/check_fp8_matmul.py, chosen per shape through TUNED):
`w_nk` takes the weight as [Nd, Kd] (HF's [out, in], each output's weights contiguous along the
reduction), and `fma` replaces the 16-row tensor-core tile by float32 FMAs on the CUDA cores (at M = 1
the tile is 15/16 padding; a product of 1 row x 1 byte per weight is ~1 FMA per byte read).

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


def _kernel(x_ref, w_ref, o_ref, *, k_tiles, per, block_k, compute_dtype, w_nk, fma_rows):
    s = pl.program_id(1)
    lo = jnp.minimum(s * per, k_tiles)
    hi = jnp.minimum(lo + per, k_tiles)
    rows, cols = o_ref.shape

    def tile(t):
        ks = pl.ds(pl.multiple_of(t * block_k, block_k), block_k)
        return x_ref[:, ks], (w_ref[:, ks] if w_nk else w_ref[ks, :])      # [rows, bk], [bn, bk] | [bk, bn]

    if fma_rows:
        # CUDA cores, one accumulator row per activation row: at M <= 4 a tensor-core tile would be
        # 3/4+ padding and its operand shuffles cost more than the few FMAs per weight byte.
        def body(t, accs):
            x, w = tile(t)
            w = w.astype(jnp.float32)
            return tuple(acc + (jnp.sum(w * x[m][None, :].astype(jnp.float32), axis=1) if w_nk else
                                jnp.sum(w * x[m][:, None].astype(jnp.float32), axis=0))
                         for m, acc in enumerate(accs))
        accs = lax.fori_loop(lo, hi, body, tuple(jnp.zeros((cols,), jnp.float32) for _ in range(fma_rows)))
        for m, acc in enumerate(accs):
            o_ref[m, :] = acc
        return

    def body(t, acc):
        x, w = tile(t)
        return acc + plgpu.dot(x.astype(compute_dtype), w.astype(compute_dtype), trans_b=w_nk)

    o_ref[...] = lax.fori_loop(lo, hi, body, jnp.zeros((rows, cols), jnp.float32))


@functools.partial(jax.jit, static_argnames=("splits", "block_n", "block_k", "num_warps", "num_stages", "w_nk",
                                             "fma", "interpret"))
def _fp8_matmul(x, w8, scale, *, splits, block_n, block_k, num_warps, num_stages, w_nk, fma, interpret):
    M, Kd = x.shape
    Nd = w8.shape[0] if w_nk else w8.shape[1]
    # rows: a power of two for the FMA path (Triton's blocks), else whole 16-row tensor-core tiles
    Mp = pl.next_power_of_2(M) if fma else max(MIN_ROWS, -(-M // MIN_ROWS) * MIN_ROWS)
    xp = jnp.pad(x, ((0, Mp - M), (0, 0)))
    k_tiles, n_tiles = Kd // block_k, Nd // block_n
    per = -(-k_tiles // splits)
    kernel = functools.partial(_kernel, k_tiles=k_tiles, per=per, block_k=block_k, compute_dtype=x.dtype,
                               w_nk=w_nk, fma_rows=Mp if fma else 0)
    w_spec = (pl.BlockSpec((block_n, Kd), lambda j, s: (j, 0)) if w_nk else
              pl.BlockSpec((Kd, block_n), lambda j, s: (0, j)))
    part = pl.pallas_call(
        kernel,
        grid=(n_tiles, splits),
        in_specs=[pl.BlockSpec((Mp, Kd), lambda j, s: (0, 0)), w_spec],
        out_specs=pl.BlockSpec((None, Mp, block_n), lambda j, s: (s, 0, j)),
        out_shape=jax.ShapeDtypeStruct((splits, Mp, Nd), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="fp8_matmul",
    )(xp, w8)
    y = jnp.sum(part, axis=0)[:M] * scale[None, :]
    return y


# Measured configs (check_fp8_matmul.py writes them; load_tuned reads them): {(rows, Kd, Nd, w_nk): kwargs}.
# A shape not listed runs the defaults above with default_splits.
TUNED: dict[tuple[int, int, int, bool], dict] = {}
_CONFIG_KEYS = ("splits", "block_n", "block_k", "num_warps", "num_stages", "fma")


def load_tuned(path: str) -> int:
    """Add the configs of a check_fp8_matmul.py JSON ({"configs": [{rows, K, N, w_nk, ...}]}) to TUNED;
    returns how many."""
    import json
    with open(path) as f:
        configs = json.load(f)["configs"]
    for c in configs:
        TUNED[(c["rows"], c["K"], c["N"], bool(c["w_nk"]))] = {k: c[k] for k in _CONFIG_KEYS if k in c}
    return len(configs)


def config_for(M: int, Kd: int, Nd: int, w_nk: bool = False) -> dict:
    """The tuned kwargs of fp8_matmul for this shape: the entry of the smallest listed row count >= M
    (a config measured at 8 rows serves 5..8), else {} (the defaults)."""
    fits = sorted(r for (r, k, n, t) in TUNED if k == Kd and n == Nd and t == w_nk and r >= M)
    return dict(TUNED[(fits[0], Kd, Nd, w_nk)]) if fits else {}


def supported(M: int, Kd: int, Nd: int, *, block_k: int = BLOCK_K, block_n: int = BLOCK_N) -> bool:
    """Whether fp8_matmul takes this shape (decode-sized M, whole tiles); else use the XLA matmul."""
    return 0 < M <= MAX_ROWS and Kd % block_k == 0 and Nd % block_n == 0


def fp8_matmul(x, w8, scale, *, out_dtype=None, splits: int | None = None, block_n: int = BLOCK_N,
               block_k: int = BLOCK_K, num_warps: int = 4, num_stages: int = 3, w_nk: bool = False,
               fma: bool = False, interpret: bool | None = None):
    """x [M, Kd] (M <= 16) times e4m3 w8 [Kd, Nd] (or [Nd, Kd] with w_nk=True: HF's [out, in] layout)
    with float32 scale [Nd] -> [M, Nd] in out_dtype (x's dtype by default). Accumulation float32; the tile
    product runs in x's dtype on the tensor cores (bf16/f16 on the GPU; every e4m3 value is exact in
    bf16), or with fma=True in float32 on the CUDA cores (meant for M <= 4). Kd and Nd must be whole
    tiles (`supported`)."""
    Kd, Nd = (w8.shape[1], w8.shape[0]) if w_nk and w8.ndim == 2 else (w8.shape if w8.ndim == 2 else (None, None))
    if x.ndim != 2 or w8.ndim != 2 or x.shape[1] != Kd or scale.shape != (Nd,):
        want = "[N, K]" if w_nk else "[K, N]"
        raise ValueError(f"fp8_matmul: x {x.shape}, w8 {w8.shape}, scale {scale.shape}: want [M, K], {want}, [N]")
    if x.shape[0] > MAX_ROWS:
        raise ValueError(f"fp8_matmul: {x.shape[0]} rows > {MAX_ROWS}; large M belongs to the XLA matmul")
    if not supported(x.shape[0], Kd, Nd, block_k=block_k, block_n=block_n):
        raise ValueError(f"fp8_matmul: w8 {w8.shape} must be a whole number of {block_k} x {block_n} tiles")
    if w8.dtype != jnp.float8_e4m3fn:
        raise ValueError(f"fp8_matmul: w8 must be float8_e4m3fn, got {w8.dtype}")
    if interpret is None:
        interpret = default_interpret()
    splits = default_splits(Kd, Nd, block_k, block_n) if splits is None else splits
    y = _fp8_matmul(x, w8, scale.astype(jnp.float32), splits=splits, block_n=block_n, block_k=block_k,
                    num_warps=num_warps, num_stages=num_stages, w_nk=bool(w_nk), fma=bool(fma),
                    interpret=bool(interpret))
    return y.astype(out_dtype or x.dtype)


def fp8_matmul_reference(x, w8, scale):
    """Plain jnp, float32: (x @ w8) * scale."""
    return (x.astype(jnp.float32) @ w8.astype(jnp.float32)) * scale.astype(jnp.float32)[None, :]
