"""GPU check of the Mosaic GPU DCA prefill kernel (pallas_kernels/dca_prefill_mgpu.py): correctness, speed.

Run on the H100 from the repo root:
    PYTHONPATH=. python3 benchmarks/check_mgpu.py --out $OUT/mgpu.json

1. Correctness, bf16 inputs, vs `dca_prefill_reference` in float32 on the same inputs: DCA and plain,
   q_start not tile-aligned, T not a multiple of the 128-row CTA, batch rows with different q_start /
   kv_len, block_k 64 and 128, key splits (3, 5, 7). PASS needs ||out - ref|| / ||ref|| < 1e-2 and LSE
   max |diff| < 1e-3. Every case runs (an exception prints its traceback tail and counts as FAIL).
2. Prefill timing, B=1, 28 q / 4 kv heads, d=128, bf16, the whole prompt as the query (T = S,
   q_start = 0): S = 32K (DCA c=16384, w=2048 -> s=14336) and 128K (c=65536, w=8192 -> s=57344): dense
   cuDNN causal, the portable Pallas `dca_prefill` (zenjax/attention/pallas.py's defaults), and
   `dca_prefill_mgpu` in several (block_k, max_concurrent_steps) configs, DCA and plain. TFLOP/s =
   4 * S^2 * N * H / 2 / time for every path. A config that fails to compile prints and is skipped.
3. `--parts checks,short`: instead of 2, the short pieces the serving pacer cuts (256-2048 rows at the end
   of a 128K and a 1M prompt), one CTA per query-tile pair vs the key splits the dispatcher picks.
4. Everything goes to --out as JSON.
"""
from __future__ import annotations

import argparse
import json
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import bench
from pallas_kernels.dca_prefill import dca_prefill, dca_prefill_reference
from pallas_kernels.dca_prefill_mgpu import dca_prefill_mgpu

N, K, H = 28, 4, 128


def _inputs(seed, *, dca, B, T, S, dtype=jnp.bfloat16):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], ((3,) if dca else ()) + (B, T, N, H), dtype)
    k = jax.random.normal(ks[1], (B, S, K, H), dtype)
    v = jax.random.normal(ks[2], (B, S, K, H), dtype)
    return q, k, v


def correctness() -> list[dict]:
    cases = [  # (name, dca chunk_len or None, B, T, S, q_start, kv_len, block_k, stages[, key splits])
        ("dca s256 T300 q0=500 bk64", 256, 1, 300, 1024, [500], [800], 64, 2),
        ("dca s256 T300 q0=37 bk128", 256, 1, 300, 512, [37], [337], 128, 2),
        ("dca s128 B2 T200 q0=[250,3] bk64 s4", 128, 2, 200, 600, [250, 3], [450, 203], 64, 4),
        ("dca s128 B2 T200 q0=[250,3] bk128", 128, 2, 200, 600, [250, 3], [450, 203], 128, 2),
        ("plain T300 q0=37 bk128", None, 1, 300, 512, [37], [337], 128, 2),
        ("plain T300 q0=37 bk64 s3", None, 1, 300, 512, [37], [337], 64, 3),
        ("plain B2 T129 q0=[0,64] kv<S", None, 2, 129, 400, [0, 64], [129, 193], 128, 3),
        ("dca s256 T300 q0=500 bk64 splits3", 256, 1, 300, 1024, [500], [800], 64, 2, 3),
        ("dca s128 B2 T200 q0=[250,3] bk128 splits5", 128, 2, 200, 600, [250, 3], [450, 203], 128, 2, 5),
        ("plain T100 q0=4000 bk128 splits7", None, 1, 100, 4352, [4000], [4100], 128, 2, 7),
    ]
    results = []
    for i, (name, chunk, B, T, S, q0, kvl, bk, st, *splits) in enumerate(cases):
        row = dict(case=name)
        try:
            q, k, v = _inputs(i, dca=chunk is not None, B=B, T=T, S=S)
            q0, kvl = jnp.asarray(q0, jnp.int32), jnp.asarray(kvl, jnp.int32)
            out, lse = dca_prefill_mgpu(q, k, v, q0, kvl, chunk_len=chunk, block_k=bk,
                                        max_concurrent_steps=st, num_splits=(splits or [1])[0],
                                        interpret=False)
            ro, rl = dca_prefill_reference(q, k, v, q0, kvl, chunk_len=chunk)
            out = np.asarray(out.astype(jnp.float32))
            ro, rl, lse = np.asarray(ro), np.asarray(rl), np.asarray(lse)
            row["rel_err"] = float(np.linalg.norm(out - ro) / np.linalg.norm(ro))
            row["lse_max_abs"] = float(np.max(np.abs(lse - rl)))
            row["finite"] = bool(np.isfinite(out).all() and np.isfinite(lse).all())
            row["pass"] = row["finite"] and row["rel_err"] < 1e-2 and row["lse_max_abs"] < 1e-3
        except Exception as e:  # noqa: BLE001 - every case must run and report
            row["pass"] = False
            row["error"] = "".join(traceback.format_exception(e))[-3000:]
        print(("PASS " if row["pass"] else "FAIL ") + json.dumps(row), flush=True)
        results.append(row)
    return results


def timing(S: int, c: int, w: int, reps: int, configs) -> list[dict]:
    s = c - w
    flops = 4 * S * S * N * H / 2
    q3, k, v = _inputs(100, dca=True, B=1, T=S, S=S)
    q0, kvl = jnp.zeros(1, jnp.int32), jnp.full(1, S, jnp.int32)
    rows = []

    def run(name, f, *args):
        try:
            t = bench(jax.jit(f), *args, reps=reps)
            row = dict(S=S, path=name, ms=t * 1e3, tflops=flops / t / 1e12)
        except Exception as e:  # noqa: BLE001 - a config that fails is reported and skipped
            row = dict(S=S, path=name, error="".join(traceback.format_exception(e))[-1500:])
        print(json.dumps(row), flush=True)
        rows.append(row)

    run("cudnn dense causal", lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn"), q3[0], k, v)
    run(f"pallas-triton dca s={s} bq128 bk64 w8 s3", lambda q, k, v: dca_prefill(
        q, k, v, q0, kvl, chunk_len=s, block_q=128, block_k=64, num_warps=8, num_stages=3), q3, k, v)
    for dca, bk, st in configs:
        name = f"mgpu {'dca s=%d' % s if dca else 'plain'} bk{bk} steps{st}"
        run(name, lambda q, k, v, dca=dca, bk=bk, st=st: dca_prefill_mgpu(
            q if dca else q[0], k, v, q0, kvl, chunk_len=s if dca else None, block_k=bk,
            max_concurrent_steps=st, interpret=False), q3, k, v)
    return rows


def short_chunks(lengths, rows, reps) -> list[dict]:
    """A prefill piece of T rows at the end of an L-token prompt (q_start = L - T, kv_len = L), Qwen2.5-1M's
    DCA (s = 253952), the Mosaic kernel with one CTA per query-tile pair and head (splits 1) vs the key
    splits `prefill_num_splits` picks: the pieces the serving pacer cuts while chats stream. TFLOP/s =
    4 * T * L * N * H (every row sees ~L keys)."""
    from pallas_kernels.dca_prefill_mgpu import prefill_num_splits
    s = 262144 - 8192
    out = []
    for L in lengths:
        k = jax.random.normal(jax.random.key(1), (1, L, K, H), jnp.bfloat16)
        v = jax.random.normal(jax.random.key(2), (1, L, K, H), jnp.bfloat16)
        for T in rows:
            q3 = jax.random.normal(jax.random.key(T), (3, 1, T, N, H), jnp.bfloat16)
            q0, kvl = jnp.full(1, L - T, jnp.int32), jnp.full(1, L, jnp.int32)
            auto = prefill_num_splits(1, N, T, L, 128)
            row = dict(L=L, T=T, auto_splits=auto)
            outs = {}
            for name, n in (("splits1", 1), ("auto", auto)):
                f = jax.jit(lambda q, k, v, n=n: dca_prefill_mgpu(q, k, v, q0, kvl, chunk_len=s, block_k=128,
                                                                  num_splits=n, interpret=False))
                t = bench(f, q3, k, v, reps=reps)
                row[f"{name}_ms"] = round(t * 1e3, 3)
                row[f"{name}_tflops"] = round(4 * T * L * N * H / t / 1e12, 1)
                outs[name] = f(q3, k, v)
            (o1, l1), (o2, l2) = outs["splits1"], outs["auto"]
            o1, o2 = o1.astype(jnp.float32), o2.astype(jnp.float32)
            row["rel_diff_vs_splits1"] = float(jnp.linalg.norm(o2 - o1) / jnp.linalg.norm(o1))
            row["lse_max_diff"] = float(jnp.max(jnp.abs(l2 - l1)))
            print(json.dumps(row), flush=True)
            out.append(row)
    return out


def main(out_path: str | None, parts=("checks", "full")) -> dict:
    t0 = time.time()
    print("device:", jax.devices()[0].device_kind, flush=True)
    result = dict(device=jax.devices()[0].device_kind, checks=correctness())
    result["checks_pass"] = all(r["pass"] for r in result["checks"])
    if "short" in parts:
        result["short_chunks"] = short_chunks((131072, 1048576), (256, 512, 1024, 2048), reps=10)
    if "full" in parts:
        configs_32k = [(True, 128, 2), (True, 64, 2), (True, 64, 3), (True, 64, 4), (False, 128, 2),
                       (False, 128, 3)]
        result["timing"] = timing(32768, 16384, 2048, reps=10, configs=configs_32k)
        result["timing"] += timing(131072, 65536, 8192, reps=3,
                                   configs=[(True, 128, 2), (True, 64, 3), (False, 128, 2)])
    result["wall_s"] = time.time() - t0
    print(f"checks_pass: {result['checks_pass']}  wall {result['wall_s']:.0f} s", flush=True)
    if out_path:
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--parts", default="checks,full",
                    help="checks always run; full = the whole-prompt timings, short = short pieces, splits")
    a = ap.parse_args()
    main(a.out, tuple(a.parts.split(",")))
