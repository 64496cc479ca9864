"""GPU check and timing of the Pallas fp8 weight matmul (pallas_kernels/fp8_matmul.py) at decode size.

    PYTHONPATH=. python3 benchmarks/check_fp8_matmul.py [--smoke]

Qwen2.5-7B's dense projections (in -> out): q/o 3584 -> 3584, k/v 3584 -> 512, gate/up 3584 -> 18944,
down 18944 -> 3584, at M = 1 and 8 rows (and 4096, a prefill piece: no kernel there). Per shape: the
kernel (a few tile / warp configs), XLA's path for an fp8 weight (`x @ w8.astype(bf16)`, then the scale),
the "w8a8" path of zenjax.layers (activations quantized per row, e4m3 x e4m3 on fp8 tensor cores), and a
bf16 weight matmul (the bf16 model's cost). Correctness: ||kernel - fp8_matmul_reference|| / ||.|| (bf16 x: ~1e-3). GB/s counts the weight
bytes read (1 per element for e4m3, 2 for bf16) against the copy bandwidth of benchmarks/common.py.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.common import write_json
from pallas_kernels.fp8_matmul import MAX_ROWS, fp8_matmul, fp8_matmul_reference

SHAPES = {"q_o": (3584, 3584), "k_v": (3584, 512), "gate_up": (3584, 18944), "down": (18944, 3584)}
CONFIGS = [(128, 128, 4), (128, 64, 4), (256, 128, 8)]          # (block_k, block_n, num_warps)


def w8a8_row(x, w8ts, scale, ref, reps) -> dict:
    """The "w8a8" path of zenjax.layers.linear (activations quantized per row, e4m3 x e4m3 dot) on the
    out-major [N, K] values the model stores (the "TN" operand cuBLASLt's fp8 GEMM wants): time, error vs
    the fp8-weight reference, and whether XLA lowered it to an fp8 GEMM (cuBLASLt f8 custom call) rather
    than converting to bf16 first."""
    from zenjax import layers
    from zenjax.fp8 import Fp8Weight
    mode, layers.FP8_MATMUL = layers.FP8_MATMUL, "w8a8"
    try:
        f = jax.jit(lambda x, w8t, s: layers.linear("md,dn->mn", x, Fp8Weight(w8t, s)))
        got = f(x, w8ts[0], scale).astype(jnp.float32)
        hlo = f.lower(x, w8ts[0], scale).compile().as_text()
    finally:
        layers.FP8_MATMUL = mode
    return {"w8a8_tn_us": round(bench_rotating(f, x, w8ts, scale, reps=reps) * 1e6, 1),
            "w8a8_rel_err": float(f"{float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref)):.2e}"),
            "w8a8_f8_gemm": "f8" in hlo and "cublas" in hlo, "w8a8_transposes": hlo.count("transpose")}


# Kernel configs swept per shape: (w_nk, fma, block_k, block_n, num_warps, num_stages). w_nk: the weight
# stored [N, K] (HF's [out, in]); fma: CUDA-core FMAs instead of 16-row tensor-core tiles (M <= 4 only).
KERNEL_CONFIGS = [(False, False, 128, 128, 4, 3), (False, False, 256, 128, 8, 4), (False, False, 128, 64, 4, 4),
                  (True, False, 256, 64, 4, 4), (True, False, 256, 128, 8, 4), (True, False, 512, 64, 8, 3),
                  (False, True, 128, 128, 4, 3), (False, True, 64, 256, 4, 4), (False, True, 128, 64, 4, 4),
                  (True, True, 512, 32, 4, 4), (True, True, 256, 64, 4, 4)]
ROTATE_BYTES = 1 << 30             # weight copies (at most 64) of up to this many bytes per timed call (L2: 50-60 MB)


def bench_rotating(f, x, ws, *rest, reps: int) -> float:
    """Median seconds per product of f(x, w, *rest) over the weight copies ws, all in one jitted call: each
    product reads its weight from HBM (q/o at 12.8 MB and k/v at 1.8 MB would otherwise sit in the 50 MB
    L2), and one dispatch (~40 us, more than a whole k/v product) is spread over len(ws) products, as in
    the model's step where the kernels run back to back."""
    import time
    import numpy as np
    many = jax.jit(lambda x, ws, *rest: [f(x, w, *rest) for w in ws])
    jax.block_until_ready(many(x, ws, *rest))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(many(x, ws, *rest))
        times.append((time.perf_counter() - t0) / len(ws))
    return float(np.median(times))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--layouts", default="nk", choices=("nk", "kn", "both"),
                    help="kernel weight layouts to sweep (the model stores fp8 values [N, K]: nk)")
    ap.add_argument("--configs-out", default="fp8_configs.json",
                    help="best kernel config per (rows, K, N), the format of fp8_matmul.load_tuned")
    a = ap.parse_args(argv)
    interp = jax.default_backend() != "gpu"
    shapes = {"small": (256, 256)} if a.smoke else SHAPES
    configs = KERNEL_CONFIGS[:1] + KERNEL_CONFIGS[6:7] if a.smoke else KERNEL_CONFIGS
    if not a.smoke and a.layouts != "both":
        configs = [c for c in configs if c[0] == (a.layouts == "nk")]
    rows, tuned = [], []
    for name, (Kd, Nd) in shapes.items():
        w = jax.random.normal(jax.random.key(Kd + Nd), (Kd, Nd), jnp.float32) * 0.02
        scale = jnp.max(jnp.abs(w), axis=0) / 448.0
        w8, wb = (w / scale).astype(jnp.float8_e4m3fn), w.astype(jnp.bfloat16)
        del w
        n_copies = 1 if interp else min(64, max(1, -(-ROTATE_BYTES // (Kd * Nd))))
        w8s = [w8 + jnp.zeros((), w8.dtype) for _ in range(n_copies)]            # distinct buffers
        w8ts = [jnp.asarray(w8.T) for _ in range(n_copies)]
        wbs = [wb + jnp.zeros((), wb.dtype) for _ in range(max(1, n_copies // 2))]
        reps = 2 if interp else 20
        for M in [int(m) for m in a.rows.split(",")]:
            x = jax.random.normal(jax.random.key(M), (M, Kd), jnp.bfloat16)
            ref = fp8_matmul_reference(x, w8, scale)
            row = dict(shape=name, K=Kd, N=Nd, M=M, copies=n_copies)
            xla = jax.jit(lambda x, w8, s: ((x @ w8.astype(jnp.bfloat16)).astype(jnp.float32) * s).astype(x.dtype))
            xla_nk = jax.jit(lambda x, w8t, s: ((x @ w8t.astype(jnp.bfloat16).T).astype(jnp.float32) * s).astype(x.dtype))
            b16 = jax.jit(lambda x, w: x @ w)
            row["xla_fp8_us"] = round(bench_rotating(xla, x, w8s, scale, reps=reps) * 1e6, 1)
            row["xla_fp8_nk_us"] = round(bench_rotating(xla_nk, x, w8ts, scale, reps=reps) * 1e6, 1)
            if not a.smoke:
                row.update(w8a8_row(x, w8ts, scale, ref, reps))
            row["bf16_us"] = round(bench_rotating(b16, x, wbs, reps=reps) * 1e6, 1)
            best, best_by_layout = None, {}
            for nk, fma, bk, bn, nw, ns in (configs if M <= MAX_ROWS else ()):
                if fma and M > 4:
                    continue
                from pallas_kernels.fp8_matmul import default_splits
                base = default_splits(Kd, Nd, bk, bn)
                for splits in sorted({base, min(Kd // bk, 2 * base), max(1, base // 2)}):
                    cfg = dict(w_nk=nk, fma=fma, block_k=bk, block_n=bn, num_warps=nw, num_stages=ns, splits=splits)
                    key = (f"kernel_{'nk' if nk else 'kn'}{'_fma' if fma else ''}_bk{bk}_bn{bn}_w{nw}_s{ns}"
                           f"_sp{splits}")
                    f = jax.jit(lambda x, w8, s, cfg=cfg: fp8_matmul(x, w8, s, interpret=interp, **cfg))
                    try:
                        got = f(x, w8ts[0] if nk else w8s[0], scale).astype(jnp.float32)
                        t = bench_rotating(f, x, w8ts if nk else w8s, scale, reps=reps)
                    except Exception as e:              # a config Triton cannot lower: skip it
                        row[key + "_error"] = repr(e)[:200]
                        continue
                    err = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
                    row[key + "_us"], row[key + "_rel_err"] = round(t * 1e6, 1), float(f"{err:.2e}")
                    if err < 1e-2 and (best is None or t < best[0]):
                        best = (t, key, cfg)
                    if err < 1e-2 and (nk not in best_by_layout or t < best_by_layout[nk][0]):
                        best_by_layout[nk] = (t, key, cfg)
            if best is not None:
                row["best"], row["best_us"] = best[1], round(best[0] * 1e6, 1)
                row["best_tbs"] = round(Kd * Nd / best[0] / 1e12, 3)
                tuned += [dict(rows=M, K=Kd, N=Nd, us=round(t * 1e6, 1), **cfg) for t, _, cfg in best_by_layout.values()]
            row["bf16_tbs"] = round(2 * Kd * Nd / (row["bf16_us"] * 1e-6) / 1e12, 3)
            print({k: v for k, v in row.items() if not k.startswith("kernel_")}, flush=True)
            rows.append(row)
            write_json(a.configs_out, {"device": jax.devices()[0].device_kind, "configs": tuned}, echo=False)  # a cut run keeps it
        del w8s, w8ts, wbs
    device = jax.devices()[0].device_kind
    write_json("check_fp8_matmul.json", {"device": device, "rows": rows})
    write_json(a.configs_out, {"device": device, "configs": tuned})
    print(f"{'shape':8} {'M':>2} {'bf16':>7} {'xla fp8':>8} {'xla nk':>7} {'w8a8 tn':>8} {'kernel':>7}  best config")
    for r in rows:
        print(f"{r['shape']:8} {r['M']:>2} {r['bf16_us']:>7} {r['xla_fp8_us']:>8} {r['xla_fp8_nk_us']:>7} "
              f"{r.get('w8a8_tn_us', '-'):>8} {r.get('best_us', '-'):>7}  {r.get('best', '-')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
