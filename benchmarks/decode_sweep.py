"""Decode kernel sweep: which (splits, block_k, warps, stages, loop) moves the K/V cache fastest.

Run on the GPU machine from the repo root (< 90 s, compiles included):
    PYTHONPATH=. python3 benchmarks/decode_sweep.py --out $OUT/decode_sweep.json

Shapes: T = 1, B = 1, 28 q / 4 kv heads, head_dim 128, bf16, random normal data, kv_len = S (the new
token is the last key). 128K with DCA c=65536 w=8192 (s = 57344: the query is in chunk 2, so intra, succ
and inter all run); 1M with Qwen2.5-1M's c=262144 w=8192.
GB/s = K/V bytes read (2 * S * K * H * 2 = 268 MB at 128K) over the time per call, vs the 3.35 TB/s
H100 datasheet figure (--hbm-gbps for another card).

Flow:
1. 128K: a grid of ~55 configs (`grid_128k`; split counts in whole waves of the device's SMs, plus the
   old defaults for reference) is compiled in parallel threads (XLA + Triton compile release the GIL),
   then timed one by one: median over reps of `inner` calls queued per sync (host dispatch hidden, as
   in benchmarks/attention.py::bench). A config that fails to compile or run is printed and skipped.
2. 1M: the 8 best configs of 128K, the old default and the `default_num_splits` choice with each loop.
3. Per context, the best config: also the Pallas call alone (no query regroup / LSE merge) to size
   what the jnp around it costs, and a correctness check vs `dca_decode_reference` (float32) at
   kv_len = S and at a kv_len that is not a multiple of the block: ||out - ref|| / ||ref|| < 1e-2 (bf16
   operands, P rounded to bf16 before the second matmul) and the LSE max |diff|.
4. `--short S` (optional, after 2.): `grid_short` at a cache of S keys with Qwen2.5-1M's DCA, plus the
   heuristic's split count, timed within its own SHORT_BUDGET_S; its best config is checked as in 3.
A time budget (--budget-s, default 70 s from start; 128K may use the first 65%) skips the configs not
yet timed (listed as skipped) so the run always ends with its JSON. `--smoke` runs a tiny grid in
interpret mode on the CPU.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp

from benchmarks.common import bench
from pallas_kernels.dca_decode import (LOOPS, _decode_partials, dca_decode, dca_decode_reference,
                                       default_num_splits, device_num_sms)

HBM_SPEC_GBPS = 3350.0                                               # H100 SXM datasheet
REL_TOL = 1e-2                                                        # bf16 operands vs float32 reference
SHORT_BUDGET_S = 40.0      # --short: 13 configs on an H100, kernels of ~10 us each; the time is compiling


class Config(NamedTuple):
    splits: int
    block_k: int
    warps: int
    stages: int
    loop: str

    @property
    def name(self) -> str:
        return f"splits{self.splits} bk{self.block_k} w{self.warps} s{self.stages} {self.loop}"


class Case(NamedTuple):
    """One context: cache length S, DCA (c, w), heads; chunk length s = c - w."""
    S: int
    c: int
    w: int
    N: int = 28
    K: int = 4
    H: int = 128

    @property
    def chunk_len(self) -> int:
        return self.c - self.w

    @property
    def nbytes(self) -> int:
        return 2 * self.S * self.K * self.H * 2


GPU_CASES = (Case(131072, 65536, 8192), Case(1 << 20, 262144, 8192))
# Smoke (CPU, interpret): Qwen's head layout, tiny head_dim, s = 48 (100 keys reach DCA chunk 2), caches
# not a multiple of the block.
SMOKE_CASES = (Case(100, 64, 16, H=16), Case(70, 64, 16, H=16))


def _dedupe(configs):
    seen, out = set(), []
    for c in configs:
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


def grid_128k(num_sms: int, kv_heads: int = 4) -> list[Config]:
    """~55 configs, most informative first. Split counts put p programs per SM in one wave:
    splits = p * SMs / (B * K), p = 1, 2, 3, 4, 8 (33, 66, 99, 132, 264 on an H100); 64 / 128 are the
    run-3 figures (131 / 157 us) and `default_num_splits`' pick is added by the caller."""
    w = lambda p: max(1, round(p * num_sms / kv_heads))
    waves = [w(p) for p in (1, 2, 3, 4, 8)]
    two, four = w(2), w(4)
    g = [Config(128, 64, 2, 3, "cond"), Config(64, 64, 2, 4, "cond")]            # run-3 reference rows
    g += [Config(s, 64, 2, 3, lp) for lp in ("segments", "single", "cond") for s in waves]
    g += [Config(s, 64, 2, st, lp) for lp in ("segments", "single") for s in (two, four) for st in (2, 4, 5)]
    g += [Config(s, 128, 4, st, lp) for lp in ("segments", "single") for s in (w(1), two) for st in (2, 3)]
    g += [Config(two, 128, 4, 2, "cond"), Config(two, 128, 2, 3, "segments"), Config(two, 128, 2, 3, "single")]
    g += [Config(s, 32, 2, st, lp) for lp in ("segments", "single") for s in (two, four) for st in (3, 5)]
    g += [Config(s, 64, 4, 3, lp) for lp in ("segments", "single") for s in (two, four)]
    g += [Config(two, 64, 1, 4, lp) for lp in ("segments", "single")]
    return _dedupe(g)


def grid_short(num_sms: int, kv_heads: int = 4) -> list[Config]:
    """A short cache (`--short`, e.g. 8K = 128 tiles of 64): the per-program start cost, not the key stream,
    sets the time, so the question is how few programs still hide it. Split counts from 4 (16 programs)
    up to two waves, both T = 1 loops, and 128-key tiles (half the tiles, one more warp)."""
    w = lambda p: max(1, round(p * num_sms / kv_heads))
    splits = sorted({4, 8, 16, w(0.5), w(1), w(2)})
    g = [Config(s, 64, 2, 3, lp) for lp in ("segments", "single") for s in splits]
    g += [Config(s, 128, 4, 2, "segments") for s in (8, 16, w(0.5), w(1))]
    return _dedupe(g)


def smoke_grid(num_sms: int, kv_heads: int = 4) -> list[Config]:
    # block 32 does not divide s = 48: must be reported as failed and skipped, not stop the run.
    return [Config(5, 16, 2, 3, "segments"), Config(3, 32, 2, 3, "single")]


def _inputs(case: Case, seed: int):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    q3 = jax.random.normal(k1, (3, 1, 1, case.N, case.H), jnp.bfloat16)
    k = jax.random.normal(k2, (1, case.S, case.K, case.H), jnp.bfloat16)
    v = jax.random.normal(k3, (1, case.S, case.K, case.H), jnp.bfloat16)
    return q3, k, v


def _call(case: Case, cfg: Config, interpret: bool, kernel_only: bool = False):
    """A jitted f(q3, k, v, q_start, kv_len) -> out (whole call) or the split partials (kernel only)."""
    if kernel_only:
        return jax.jit(lambda q, k, v, qs, kl: _decode_partials(
            q, k, v, qs, kl, chunk_len=case.chunk_len, block_k=cfg.block_k, num_splits=cfg.splits,
            num_warps=cfg.warps, num_stages=cfg.stages, loop=cfg.loop, interpret=interpret)[0])
    return jax.jit(lambda q, k, v, qs, kl: dca_decode(
        q, k, v, qs, kl, chunk_len=case.chunk_len, block_k=cfg.block_k, num_splits=cfg.splits,
        num_warps=cfg.warps, num_stages=cfg.stages, loop=cfg.loop, interpret=interpret)[0])


def sweep(case: Case, configs, *, interpret: bool, deadline: float, hbm_gbps: float,
          reps: int, inner: int) -> list[dict]:
    """Compile every config in parallel, then time them one by one. One row per config."""
    q3, k, v = _inputs(case, case.S)
    kl = jnp.full((1,), case.S, jnp.int32)
    qs = kl - 1
    call_args = (q3, k, v, qs, kl)

    def compile_one(cfg):
        return _call(case, cfg, interpret).lower(*call_args).compile()

    rows = []
    workers = 1 if interpret else 8
    with cf.ThreadPoolExecutor(workers) as pool:
        futures = [(cfg, pool.submit(compile_one, cfg)) for cfg in configs]
        for cfg, fut in futures:
            row = {"context": case.S, **cfg._asdict(), "name": cfg.name}
            rows.append(row)
            if time.perf_counter() > deadline:
                fut.cancel()
                row["skipped"] = "time budget"
                continue
            try:
                try:
                    f = fut.result()
                except Exception:                                    # noqa: BLE001 - a thread-safety
                    f = compile_one(cfg)                             # doubt must not sink the one run
                t = bench(f, *call_args, reps=reps, inner=inner)
            except Exception as e:                                   # noqa: BLE001 - report and go on
                row["error"] = f"{type(e).__name__}: {e}"[:400]
                print(f"  {case.S} {cfg.name}: FAILED {row['error'][:200]}", flush=True)
                continue
            gbps = case.nbytes / t / 1e9
            row.update(us=round(t * 1e6, 2), GBps=round(gbps, 1), pct_hbm=round(100 * gbps / hbm_gbps, 1))
            print(f"  {case.S} {cfg.name:<36} {row['us']:>9.1f} us {row['GBps']:>7.0f} GB/s "
                  f"{row['pct_hbm']:>5.1f}%", flush=True)
    del q3, k, v
    return rows


def check_best(case: Case, cfg: Config, *, interpret: bool, reps: int, inner: int) -> dict:
    """The best config: kernel alone vs whole call, and its error vs the float32 reference."""
    q3, k, v = _inputs(case, case.S)
    out: dict = {}
    kl = jnp.full((1,), case.S, jnp.int32)
    try:
        whole = bench(_call(case, cfg, interpret), q3, k, v, kl - 1, kl, reps=reps, inner=inner)
        alone = bench(_call(case, cfg, interpret, kernel_only=True), q3, k, v, kl - 1, kl, reps=reps, inner=inner)
        out.update(whole_us=round(whole * 1e6, 2), kernel_only_us=round(alone * 1e6, 2),
                   outside_kernel_pct=round(100 * (whole - alone) / whole, 1))
    except Exception as e:                                           # noqa: BLE001
        out["timing_error"] = f"{type(e).__name__}: {e}"[:400]
    # kv_len = S (as timed) and a ragged one: not a multiple of the block, a few tiles short of S.
    for label, n in (("full", case.S), ("ragged", case.S - 3 * cfg.block_k - 5)):
        kl = jnp.full((1,), n, jnp.int32)
        try:
            got, lse = _call_with_lse(case, cfg, interpret)(q3, k, v, kl - 1, kl)
            ref, ref_lse = dca_decode_reference(q3, k, v, kl - 1, kl, chunk_len=case.chunk_len)
            rel = float(jnp.linalg.norm(got.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
            out[f"rel_{label}"] = rel
            out[f"lse_maxabs_{label}"] = float(jnp.max(jnp.abs(lse - ref_lse)))
        except Exception as e:                                       # noqa: BLE001
            out[f"check_error_{label}"] = f"{type(e).__name__}: {e}"[:400]
    out["pass"] = all(out.get(f"rel_{x}", 1.0) < REL_TOL for x in ("full", "ragged"))
    return out


def _call_with_lse(case: Case, cfg: Config, interpret: bool):
    return jax.jit(lambda q, k, v, qs, kl: dca_decode(
        q, k, v, qs, kl, chunk_len=case.chunk_len, block_k=cfg.block_k, num_splits=cfg.splits,
        num_warps=cfg.warps, num_stages=cfg.stages, loop=cfg.loop, interpret=interpret))


def _best(rows):
    timed = [r for r in rows if "us" in r]
    return sorted(timed, key=lambda r: r["us"])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="write the results here (JSON)")
    ap.add_argument("--budget-s", type=float, default=70.0, help="stop timing new configs after this")
    ap.add_argument("--hbm-gbps", type=float, default=HBM_SPEC_GBPS)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode (CPU): the script runs")
    ap.add_argument("--short", type=int, default=0, help="also sweep `grid_short` at this cache length "
                    "(Qwen2.5-1M's DCA; e.g. 8192), after the two long contexts")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    deadline = t0 + a.budget_s
    interpret = a.smoke
    cases, grid = (SMOKE_CASES, smoke_grid) if a.smoke else (GPU_CASES, grid_128k)
    reps, inner = (1, 1) if a.smoke else (7, 10)
    sms = device_num_sms()
    dev = jax.devices()[0]
    res: dict = {"jax": jax.__version__, "device": str(dev.device_kind), "num_sms": sms,
                 "hbm_gbps": a.hbm_gbps, "rows": [], "best": {}, "default_splits": {}}
    first, second = cases
    # The wrapper's defaults before this sweep (128 splits, bk64 w2 s3, cond) and the split heuristic's pick.
    block, old_default = (16, None) if a.smoke else (64, Config(128, 64, 2, 3, "cond"))
    heur = {c.S: default_num_splits(1, c.K, c.S, block, sms) for c in cases}
    res["default_splits"] = {str(s): n for s, n in heur.items()}

    loops, n_top = (("single",), 1) if a.smoke else (LOOPS, 8)          # smoke: few interpret compiles
    configs = grid(sms, first.K) + [Config(heur[first.S], block, 2, 3, lp) for lp in loops]
    configs = _dedupe(configs)
    print(f"{res['device']} ({sms} SMs): {len(configs)} configs at S={first.S}", flush=True)
    # 128K gets the first 65% of the budget, so the 1M phase always runs.
    rows = sweep(first, configs, interpret=interpret, deadline=t0 + 0.65 * a.budget_s, hbm_gbps=a.hbm_gbps,
                 reps=reps, inner=inner)
    res["rows"] += rows
    top = [Config(*(r[f] for f in Config._fields)) for r in _best(rows)[:n_top]]
    configs2 = _dedupe(top + ([] if a.smoke else [old_default])
                       + [Config(heur[second.S], block, 2, 3, lp) for lp in loops])
    print(f"{len(configs2)} configs at S={second.S}", flush=True)
    res["rows"] += sweep(second, configs2, interpret=interpret, deadline=deadline, hbm_gbps=a.hbm_gbps,
                         reps=reps, inner=inner)

    if a.short:
        short = SMOKE_CASES[0]._replace(S=a.short) if a.smoke else Case(a.short, 262144, 8192)
        configs3 = (smoke_grid if a.smoke else grid_short)(sms, short.K)
        heuristic = Config(default_num_splits(1, short.K, short.S, block, sms), block, 2, 3, "segments")
        configs3 = _dedupe(configs3 + [heuristic])
        print(f"{len(configs3)} configs at S={short.S}", flush=True)
        res["rows"] += sweep(short, configs3, interpret=interpret, deadline=time.perf_counter() + SHORT_BUDGET_S,
                             hbm_gbps=a.hbm_gbps, reps=reps, inner=inner)
        cases = (*cases, short)
    for case in cases:
        ranked = _best([r for r in res["rows"] if r["context"] == case.S])
        if not ranked:
            res["best"][str(case.S)] = None
            continue
        b = ranked[0]
        cfg = Config(*(b[f] for f in Config._fields))
        entry = {**b, **check_best(case, cfg, interpret=interpret, reps=reps, inner=inner)}
        res["best"][str(case.S)] = entry
        print(f"best at S={case.S}: {cfg.name} {b['us']:.1f} us = {b['pct_hbm']:.1f}% of "
              f"{a.hbm_gbps:.0f} GB/s; {entry}", flush=True)
    res["skipped"] = sum("skipped" in r for r in res["rows"])
    res["failed"] = sum("error" in r for r in res["rows"])
    res["elapsed_s"] = round(time.perf_counter() - t0, 1)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    print(f"\n{'context':>8} | {'config':<36} | {'us':>9} | {'GB/s':>7} | % of {a.hbm_gbps:.0f}")
    for r in sorted(res["rows"], key=lambda r: (r["context"], r.get("us", 1e12))):
        rate = (f"{r['us']:>9.1f} | {r['GBps']:>7.0f} | {r['pct_hbm']:.1f}" if "us" in r
                else f"{'-':>9} | {'-':>7} | {r.get('skipped') or 'FAILED: ' + r['error'][:60]}")
        print(f"{r['context']:>8} | {r['name']:<36} | {rate}")
    print(f"elapsed {res['elapsed_s']} s, {res['failed']} failed, {res['skipped']} skipped")
    return res


if __name__ == "__main__":
    main()
