"""Vertical-slash sparse DCA prefill on Hopper through Pallas Mosaic GPU (wgmma + TMA), output and LSE.

The mask (same definition as zenjax/attention/sparse.py; 128-row query blocks aligned to the step's row
0, 128-key blocks aligned to absolute key 0):
    active(m, kb)  iff  a selected diagonal d has a_m - d <= 128kb + 127 and a_m + 127 - d >= 128kb
                        (a_m = q_start + 128m: the band of d over the block's rows touches key block kb)
    row p attends key j  iff  j <= p, j < kv_len, and (j is a selected column or active(m, j // 128)).
Inputs `vertical` [B,N,V] (key ids) and `slash` [B,N,D] (distances), ascending, columns unique; entries
>= S are padding.

Walk (wrapper, plain jnp, then one kernel):
1. Per (b, head) one descending list of block distances `delta` (`block_distances`): query block m's
   active key blocks are Q0 + m - delta[bstart[m] : bstart[m] + nblk[m]], ascending; no table over
   (query block, key block) pairs is built.
2. The selected columns, grouped by DCA region (inter, succ, intra: contiguous because ascending), each
   group padded to whole 128-column tiles, K/V rows gathered into dense tiles `kc`/`vc` [B,N,Vp,H] (per
   q head: each head has its own columns). `vcols` holds each slot's key id (padding: a huge id), so a
   tile has ONE query variant (`vt_region`); `nvt[b,n,m]` = tiles whose first column can be causal for
   query block m (tiles are ascending, so a prefix).
3. `keypos` [B,N,S]: j, or a huge id where j is a selected column: a key in an active block that is also
   a column is counted once (in its column tile).
4. Kernel: one CTA = 128 query rows (two compute warpgroups of 64, as dca_prefill_mgpu.py) of one q head.
   The memory warpgroup streams steps 0..nblk+nvt-1 into a 2-slot TMA ring: step t < nblk loads key
   block Q0 + m - delta[bstart + t] of the cache and its keypos slice, later steps the gathered column tile and its vcols
   slice. Only these tiles are ever loaded. The tile's key positions (keypos or vcols, 512 bytes) are
   read by the compute warpgroups straight from global memory (L2) into registers: an SMEM ring for them
   put the kernel 136 bytes over the H200's 232,448 bytes of shared memory (measured 2026-12-02; every
   SMEM buffer is padded to 1 KiB and Mosaic keeps 2 KiB). A compute warpgroup runs flash attention over the steps with
   the query variant of each tile's DCA region (block: by chunk of the block; column tile: vt_region),
   mask (pos <= row position) & (pos < kv_len) from the tile's position vector, online softmax in base 2.
   Masked logits are a large finite negative, so a tile that is fully masked for some rows (the diagonal
   block seen by the first warpgroup) adds weight that the first real key's rescale (exp2 of ~-1e29 = 0)
   erases; every real row sees its own diagonal (the nearest diagonals are always selected).
ASSUMPTION: all valid rows of a step lie in one DCA chunk (the engine cuts pieces at multiples of s; the
estimator makes the same assumption). Rows past kv_len are padding (finite, ignored).

Interpret mode (CPU tests): as dca_prefill_mgpu.py, P goes through SMEM for the P.V wgmma.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

BLOCK = 128                                   # query rows per CTA and keys per tile (the mask's blocks)
HALF = 64                                     # rows per compute warpgroup (wgmma M)
COMPUTE_WGS = 2
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
MASKED = -1e30                                # finite: see the walk, step 4
FAR = 2 ** 30                                 # position of a slot no row may attend
SMEM_BYTES = 227 * 1024


SMEM_RESERVED = 2048 + 8 * 32                 # Mosaic's own 2 KiB + barriers, as measured on the H200


def smem_bytes(n_variants: int, head_dim: int, stages: int, itemsize: int = 2) -> int:
    return (COMPUTE_WGS * n_variants * HALF * head_dim * itemsize + 2 * stages * BLOCK * head_dim * itemsize
            + SMEM_RESERVED)


# ----------------------------------------------------------------------------------------------
# Index preparation (plain jnp)
# ----------------------------------------------------------------------------------------------

def active_blocks(slash, q_start, kv_len, T: int, S: int):
    """[B, N, ceil(T/128), ceil(S/128)] bool: active(m, kb), restricted to blocks below kv_len."""
    nqb, nkb = -(-T // BLOCK), -(-S // BLOCK)
    a = q_start[:, None] + BLOCK * jnp.arange(nqb)[None, :]
    kb0 = BLOCK * jnp.arange(nkb)
    lo = a[:, :, None] - kb0[None, None, :] - BLOCK + 1
    hi = a[:, :, None] + BLOCK - 1 - kb0[None, None, :]
    d = jnp.where(slash < S, slash, FAR)
    count = lambda dd, lo, hi: jnp.searchsorted(dd, hi, side="right") - jnp.searchsorted(dd, lo, side="left")
    act = jax.vmap(jax.vmap(count, in_axes=(0, None, None)))(d, lo, hi) > 0
    return act & (kb0[None, None, None, :] < kv_len[:, None, None, None])


def block_distances(slash, q_start, kv_len, T: int, S: int):
    """The active blocks of every query block from ONE list per head (module docstring step 1).

    With a_m = q_start + 128m = 128(Q0 + m) + r (Q0 = q_start // 128, r = q_start % 128), diagonal d's
    band over block m's rows, keys [a_m - d, a_m + 127 - d], touches key blocks Q0 + m - delta for
    delta in {-floor((r - d) / 128), -floor((r + 127 - d) / 128)}: the same offsets for every m. So
    active(m, kb) iff Q0 + m - kb is in the head's set of block distances, and block m's list, ascending,
    is Q0 + m - delta over the set sorted descending, cut to 0 <= kb < cdiv(kv_len, 128). Returns
    delta [B, N, nkb + 2] int32 descending (padding: a huge negative, never in range), and per query block
    the range of it to walk: bstart, nblk [B, N, nqb]. O(N (D + nkb)) per step instead of the
    O(N T S / 128^2) table of every (query block, key block) pair (16 ms per layer at 1M keys, 32K rows).
    Worked example (q_start = 260: Q0 = 2, r = 4): d = 0 gives deltas {0, -1} (rows 260..387 hit key
    blocks 2 and 3); d = 300 gives {3, 2}: block m = 0 reaches key blocks -1 (dropped) and 0."""
    B, N, D = slash.shape
    nkb, nqb = -(-S // BLOCK), -(-T // BLOCK)
    r = (q_start % BLOCK)[:, None, None]
    d = jnp.where(slash < S, slash, FAR)
    live = (d < FAR)
    fl = lambda x: jnp.where(x >= 0, lax.div(x, BLOCK), -lax.div(-x + BLOCK - 1, BLOCK))   # floor(x / 128)
    lo, hi = -fl(r - d), -fl(r + BLOCK - 1 - d)                                          # [B, N, D] each
    W = nkb + 2                                                                          # delta in [-1, nkb]
    ib, inn = jnp.arange(B)[:, None, None], jnp.arange(N)[None, :, None]
    mark = jnp.zeros((B, N, W), bool)
    for x in (lo, hi):
        ok = live & (x >= -1) & (x <= nkb)
        mark = mark.at[ib, inn, jnp.where(ok, x + 1, W)].set(True, mode="drop")
    vals = jnp.where(mark, jnp.arange(W, dtype=jnp.int32)[None, None] - 1, -FAR)
    delta = -jnp.sort(-vals, axis=-1)                                                    # descending
    top = lax.div(q_start, BLOCK)[:, None] + jnp.arange(nqb)[None, :]                     # Q0 + m [B, nqb]
    nkv = lax.div(kv_len + BLOCK - 1, BLOCK)[:, None]
    asc = -delta                                                                         # ascending
    count_gt = lambda x: jax.vmap(jax.vmap(lambda a, y: jnp.searchsorted(a, -y, side="left"),
                                           in_axes=(0, None)), in_axes=(0, 0))(asc, x)   # #{delta > x}
    i1 = count_gt(top)                                        # delta <= Q0 + m from here on
    i2 = count_gt(top - nkv)                                  # ... and delta > Q0 + m - nkv before here
    return delta.astype(jnp.int32), i1.astype(jnp.int32), jnp.maximum(i2 - i1, 0).astype(jnp.int32)


def prepare(vertical, slash, q_start, kv_len, k, v, *, T: int, chunk_len: int | None):
    """The kernel's index tables (module docstring steps 1-3)."""
    B, S, K, H = k.shape
    N = vertical.shape[1]
    group = N // K
    nqb = -(-T // BLOCK)
    delta, bstart, nblk = block_distances(slash, q_start, kv_len, T, S)

    cols = jnp.where(vertical < jnp.minimum(kv_len, S)[:, None, None], vertical, FAR).astype(jnp.int32)
    cols = jnp.sort(cols, axis=-1)                                                       # [B, N, V]
    V = cols.shape[-1]
    valid = cols < FAR
    if chunk_len is None:
        region = jnp.zeros_like(cols)
    else:
        nq = (q_start // chunk_len)[:, None, None]
        region = jnp.clip(nq - cols // chunk_len, 0, 2)
    # groups in ascending column order: inter (2), succ (1), intra (0); each padded to whole tiles
    counts = [jnp.sum(valid & (region == r), axis=-1) for r in (2, 1, 0)]                # [B, N] each
    padded = [-(-c // BLOCK) * BLOCK for c in counts]
    start = [jnp.zeros_like(counts[0]), counts[0], counts[0] + counts[1]]
    gstart = [jnp.zeros_like(counts[0]), padded[0], padded[0] + padded[1]]
    gi = {2: 0, 1: 1, 0: 2}
    rank = jnp.arange(V)[None, None, :]
    slot = jnp.full(cols.shape, -1, jnp.int32)
    for r in (2, 1, 0):
        g = gi[r]
        sel = valid & (region == r)
        slot = jnp.where(sel, gstart[g][..., None] + rank - start[g][..., None], slot)
    Vp = -(-(V + 3 * (BLOCK - 1)) // BLOCK) * BLOCK
    ib3, in3 = jnp.arange(B)[:, None, None], jnp.arange(N)[None, :, None]
    vcols = jnp.full((B, N, Vp), FAR, jnp.int32).at[ib3, in3, jnp.where(slot >= 0, slot, Vp)].set(cols, mode="drop")
    first = vcols[:, :, ::BLOCK]                                                          # [B, N, ntiles]
    if chunk_len is None:
        vt_region = jnp.zeros(first.shape, jnp.int32)
    else:
        vt_region = jnp.where(first < FAR, jnp.clip((q_start // chunk_len)[:, None, None] - first // chunk_len,
                                                    0, 2), 0).astype(jnp.int32)
    a_last = q_start[:, None] + BLOCK * jnp.arange(nqb)[None, :] + BLOCK - 1             # [B, nqb]
    nvt = jax.vmap(jax.vmap(lambda f, x: jnp.searchsorted(f, x, side="right"), in_axes=(0, None)))(
        first, a_last).astype(jnp.int32)                                                  # [B, N, nqb]
    src = jnp.clip(vcols, 0, S - 1)
    kvh = (jnp.arange(N) // group)[None, :, None]
    kc = k[jnp.arange(B)[:, None, None], src, kvh]                                        # [B, N, Vp, H]
    vc = v[jnp.arange(B)[:, None, None], src, kvh]
    isvert = jnp.zeros((B, N, S), bool).at[ib3, in3, cols].set(True, mode="drop")
    keypos = jnp.where(isvert, FAR, jnp.arange(S, dtype=jnp.int32)[None, None, :]).astype(jnp.int32)
    return dict(delta=delta, bstart=bstart, nblk=nblk, vcols=vcols, vt_region=vt_region, nvt=nvt, kc=kc, vc=vc,
                keypos=keypos)


# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------

def _kernel(q_start_ref, kv_len_ref, delta_ref, bstart_ref, nblk_ref, nvt_ref, vt_region_ref, keypos_ref, vcols_ref,
            q_ref, k_ref, v_ref, kc_ref, vc_ref, out_ref, lse_ref, scratch, *, n_variants, num_pairs, head_dim,
            stages, chunk_len, group, interpret, columns):
    q_smem, k_smem, v_smem, p_smem, q_bars, k_bars, v_bars, k_free, v_free, sched = scratch
    b = lax.axis_index("batch")
    n = lax.axis_index("heads")
    m = num_pairs - 1 - lax.axis_index("q_seq")                      # query block, launched last-first
    wg = lax.axis_index("wg")
    q_start = q_start_ref[b]
    kv_len = kv_len_ref[b]
    dtype = q_ref.dtype
    nblk = 0 if columns else nblk_ref[b, n, m]
    steps = nvt_ref[b, n, m] if columns else nblk
    max_blk = delta_ref.shape[-1]
    top = lax.div(q_start, BLOCK) + m                                # Q0 + m (see block_distances)
    bstart = 0 if columns else bstart_ref[b, n, m]

    def block_of(t):
        return top - delta_ref[b, n, jnp.clip(bstart + t, 0, max_blk - 1)]

    def sched_barrier():
        plgpu.barrier_arrive(sched)
        plgpu.barrier_wait(sched)

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        row0 = m * BLOCK + wg * HALF
        first_pos = q_start + row0
        qbuf = q_smem.at[wg]
        for r in range(n_variants):
            plgpu.copy_gmem_to_smem(q_ref.at[r, b, pl.ds(row0, HALF), n], qbuf.at[r],
                                    q_bars.at[wg * n_variants + r])
        for r in range(n_variants):
            plgpu.barrier_wait(q_bars.at[wg * n_variants + r])

        acc = plgpu.layout_cast(jnp.full((HALF, head_dim), 0, jnp.float32), plgpu.Layout.WGMMA)
        m_i = plgpu.layout_cast(jnp.full((HALF,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        l_i = plgpu.layout_cast(jnp.full((HALF,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))

        @pl.when(steps > 0)
        def _():
            plgpu.barrier_wait(k_bars.at[0])

        pl.when(wg == 1)(sched_barrier)
        qk_scale = head_dim ** -0.5 * LOG2E
        nq = 0 if chunk_len is None else lax.div(q_start, chunk_len)

        def step(t, carry):
            acc, m_i, l_i = carry
            slot = lax.rem(t, stages)
            if chunk_len is None:
                vidx = 0
            elif columns:
                vidx = vt_region_ref[b, n, t]
            else:
                vidx = jnp.clip(nq - lax.div(block_of(t) * BLOCK, chunk_len), 0, 2)

            def qk_fn(s_ref):
                plgpu.wgmma(s_ref, qbuf.at[vidx], k_smem.at[slot].transpose((1, 0)))
                sched_barrier()
                return s_ref[...]
            s = pl.run_scoped(qk_fn, plgpu.ACC((HALF, BLOCK), jnp.float32))
            pos_ref = (vcols_ref.at[b, n, pl.ds((t - nblk) * BLOCK, BLOCK)] if columns
                       else keypos_ref.at[b, n, pl.ds(block_of(t) * BLOCK, BLOCK)])
            keypos = pos_ref[...] if interpret else plgpu.load(pos_ref, layout=plgpu.Layout.WGMMA.reduce(0),
                                                               optimized=False)
            plgpu.barrier_arrive(k_free.at[slot])
            rows = plgpu.broadcasted_iota(jnp.int32, (HALF, BLOCK), 0, layout=plgpu.Layout.WGMMA) + first_pos
            kp = lax.broadcast_in_dim(keypos, (HALF, BLOCK), [1])
            s = jnp.where((kp <= rows) & (kp < kv_len), s, MASKED)
            m_new = jnp.maximum(m_i, s.max(axis=1) * qk_scale)
            alpha = jnp.exp2(m_i - m_new)
            p = jnp.exp2(s * qk_scale - lax.broadcast_in_dim(m_new, s.shape, [0]))
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            l_i = l_i * alpha + p.sum(axis=1)
            p16 = p.astype(dtype)
            acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
            plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(v_bars.at[slot])
            plgpu.barrier_wait(sched)

            def wait_next_k():
                @pl.when(t + 1 < steps)
                def _():
                    plgpu.barrier_wait(k_bars.at[lax.rem(t + 1, stages)])

            if not interpret:
                def pv_fn(acc_ref):
                    plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                    wait_next_k()
                acc = pl.run_state(pv_fn)(plgpu.ACC.init(acc))
            else:
                p_smem.at[wg][...] = p16
                plgpu.commit_smem()

                def pv_fn(o_ref):
                    plgpu.wgmma(o_ref, p_smem.at[wg], v_smem.at[slot])
                    return o_ref[...]
                acc = acc + pl.run_scoped(pv_fn, plgpu.ACC((HALF, head_dim), jnp.float32))
                wait_next_k()
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_new, l_i

        acc, m_i, l_i = lax.fori_loop(0, steps, step, (acc, m_i, l_i))
        pl.when(wg == 0)(sched_barrier)
        l_safe = jnp.maximum(l_i, 1e-30)
        acc = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
        obuf = qbuf.at[0]
        obuf[...] = acc.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(obuf, out_ref.at[b, pl.ds(row0, HALF), n])
        # a row that met no real key in this pass (m still ~ MASKED * scale): lse = -inf for the merge
        lse_ref.at[b, n, pl.ds(row0, HALF)][...] = jnp.where(m_i > 0.5 * MASKED * qk_scale,
                                                            m_i * LN2 + jnp.log(l_i), -jnp.inf)
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")
        kv_head = lax.div(n, group)

        def load(t, slot):
            def _block():
                keys = pl.ds(block_of(t) * BLOCK, BLOCK)
                plgpu.copy_gmem_to_smem(k_ref.at[b, keys, kv_head], k_smem.at[slot], k_bars.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[b, keys, kv_head], v_smem.at[slot], v_bars.at[slot])

            def _columns():
                cols = pl.ds((t - nblk) * BLOCK, BLOCK)
                plgpu.copy_gmem_to_smem(kc_ref.at[b, n, cols], k_smem.at[slot], k_bars.at[slot])
                plgpu.copy_gmem_to_smem(vc_ref.at[b, n, cols], v_smem.at[slot], v_bars.at[slot])
            (_columns if columns else _block)()

        for i in range(stages):
            pl.when(i < steps)(functools.partial(load, i, i))

        @pl.loop(0, jnp.maximum(steps - stages, 0))
        def _refill(t):
            slot = lax.rem(t, stages)
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.barrier_wait(v_free.at[slot])
            load(t + stages, slot)

        @pl.loop(jnp.maximum(steps - stages, 0), steps)
        def _drain(t):
            slot = lax.rem(t, stages)
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.barrier_wait(v_free.at[slot])


_prepare_jit = jax.jit(prepare, static_argnames=("T", "chunk_len"))


def _vs_prefill_mgpu(q3, k, v, q_start, kv_len, vertical, slash, *, chunk_len, max_concurrent_steps, interpret):
    R, B, T, N, H = q3.shape
    K = k.shape[2]
    pad = lambda x, axis, mult: jnp.pad(x, [(0, (-x.shape[axis]) % mult if i == axis else 0)
                                            for i in range(x.ndim)])
    q3 = pad(q3, 2, BLOCK)
    k, v = pad(k, 1, BLOCK), pad(v, 1, BLOCK)
    Tp = q3.shape[2]
    num_pairs = Tp // BLOCK
    ix = _prepare_jit(vertical, slash, q_start, kv_len, k, v, T=Tp, chunk_len=chunk_len)
    stages = max_concurrent_steps
    args = (q_start, kv_len, ix["delta"], ix["bstart"], ix["nblk"], ix["nvt"], ix["vt_region"], ix["keypos"], ix["vcols"],
            q3, k, v, ix["kc"], ix["vc"])
    o1, l1 = _launch(args, columns=False, R=R, B=B, Tp=Tp, N=N, H=H, K=K, stages=stages, chunk_len=chunk_len,
                     num_pairs=num_pairs, dtype=q3.dtype, interpret=interpret)
    # Eagerly the two launches run one after the other. (Inside one jit, XLA-on-CPU may run two
    # interpret-mode kernels concurrently, which deadlocks the GPU interpreter's shared state; on the GPU,
    # under the model's jit, they queue on one stream.)
    o2, l2 = _launch(args, columns=True, R=R, B=B, Tp=Tp, N=N, H=H, K=K, stages=stages, chunk_len=chunk_len,
                     num_pairs=num_pairs, dtype=q3.dtype, interpret=interpret)
    # LSE merge of the two passes (spec 2.4); a pass that saw no key has lse -inf and weight 0
    mx = jnp.maximum(l1, l2)
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    w1, w2 = jnp.exp(l1 - mx), jnp.exp(l2 - mx)
    z = w1 + w2
    zs = jnp.where(z > 0, z, 1.0)
    wt = lambda w: (w / zs).transpose(0, 2, 1)[..., None]                                # [B, Tp, N, 1]
    out = (wt(w1) * o1.astype(jnp.float32) + wt(w2) * o2.astype(jnp.float32)).astype(q3.dtype)
    lse = jnp.where(z > 0, mx + jnp.log(zs), -jnp.inf)
    return out[:, :T], lse[:, :, :T].transpose(0, 2, 1)


# On the GPU the wrapper is jitted so that the model's 28 layers share ONE lowering of the two Mosaic
# kernels: unjitted, every call site lowered and compiled its own copy and the 7B sparse prefill step took
# ~115 s to compile on the H200 (2026-12-02) against ~12 s for the dense step, whose wrapper is jitted.
# Interpret mode stays unjitted (the two launches must not run concurrently, see above).
_vs_prefill_mgpu_jit = jax.jit(_vs_prefill_mgpu, static_argnames=("chunk_len", "max_concurrent_steps", "interpret"))


def _launch(args, *, columns, R, B, Tp, N, H, K, stages, chunk_len, num_pairs, dtype, interpret):
    """One plgpu.kernel launch: the active cache blocks (columns=False) or the gathered column tiles."""
    tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    kernel = functools.partial(_kernel, n_variants=R, num_pairs=num_pairs, head_dim=H, stages=stages,
                               chunk_len=chunk_len, group=N // K, interpret=interpret, columns=columns)
    def entry(q_start_ref, kv_len_ref, delta_ref, bstart_ref, nblk_ref, nvt_ref, vt_region_ref, keypos_ref, vcols_ref,
              q_ref, k_ref, v_ref, kc_ref, vc_ref, out_ref, lse_ref):
        scratch = [
            plgpu.SMEM((COMPUTE_WGS, R, HALF, H), dtype, transforms=tiled),
            plgpu.SMEM((stages, BLOCK, H), dtype, transforms=tiled),
            plgpu.SMEM((stages, BLOCK, H), dtype, transforms=tiled),
            plgpu.SMEM((COMPUTE_WGS, HALF, BLOCK), dtype, transforms=tiled) if interpret else None,
        ]
        barriers = (
            plgpu.Barrier(num_barriers=COMPUTE_WGS * R),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
            plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
            plgpu.Barrier(num_arrivals=COMPUTE_WGS),
        )
        pl.run_scoped(
            lambda *refs: kernel(q_start_ref, kv_len_ref, delta_ref, bstart_ref, nblk_ref, nvt_ref, vt_region_ref,
                                 keypos_ref, vcols_ref, q_ref, k_ref, v_ref, kc_ref, vc_ref, out_ref, lse_ref,
                                 refs),
            *scratch, *barriers, collective_axes="wg")

    out, lse = plgpu.kernel(
        entry,
        out_type=[jax.ShapeDtypeStruct((B, Tp, N, H), dtype),
                  jax.ShapeDtypeStruct((B, N, Tp), jnp.float32)],
        grid=(N, num_pairs, B),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )(*args)
    return out, lse


def vs_prefill_mgpu(q, k, v, q_start, kv_len, vertical, slash, *, chunk_len: int | None = None,
                    max_concurrent_steps: int = 2, interpret: bool | None = None):
    """Sparse attention of T queries (positions q_start + t) against the cache under the module's mask.

    q [3,B,T,N,H] (DCA: intra, succ, inter; chunk_len = s, a multiple of 128) or [B,T,N,H] (plain);
    k, v [B,S,K,H]; q_start, kv_len [B] int32; vertical [B,N,V], slash [B,N,D] int32 ascending (entries
    >= S are padding). Returns (out [B,T,N,H] in q's dtype, lse [B,T,N] float32 natural log).
    Hopper only: bf16/f16, H a multiple of 64. interpret=None: interpret mode unless on a GPU.
    """
    q3 = q[None] if chunk_len is None else q
    if q3.ndim != 5 or (chunk_len is not None and q3.shape[0] != 3):
        raise ValueError(f"vs_prefill_mgpu: q {q.shape}; want [3,B,T,N,H] with chunk_len, [B,T,N,H] without")
    _, B, T, N, H = q3.shape
    if k.shape != v.shape or k.ndim != 4 or k.shape[0] != B or k.shape[3] != H or N % k.shape[2]:
        raise ValueError(f"vs_prefill_mgpu: q {q.shape} does not fit k {k.shape} / v {v.shape}")
    if vertical.shape[:2] != (B, N) or slash.shape[:2] != (B, N):
        raise ValueError(f"vs_prefill_mgpu: vertical {vertical.shape} / slash {slash.shape} must be [B={B}, N={N}, .]")
    if chunk_len is not None and chunk_len % BLOCK:
        raise ValueError(f"vs_prefill_mgpu: DCA chunk length s={chunk_len} must be a multiple of {BLOCK}")
    dtypes = {jnp.dtype(x.dtype) for x in (q3, k, v)}
    if H % 64 or dtypes not in ({jnp.dtype(jnp.bfloat16)}, {jnp.dtype(jnp.float16)}):
        raise ValueError(f"vs_prefill_mgpu wants bf16 (or f16) q, k, v and H % 64 == 0; got {q3.dtype}, H={H}")
    if smem_bytes(q3.shape[0], H, max_concurrent_steps) > SMEM_BYTES:
        raise ValueError(f"vs_prefill_mgpu: {max_concurrent_steps} slots x {BLOCK} keys do not fit shared memory")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    fn = _vs_prefill_mgpu if interpret else _vs_prefill_mgpu_jit
    return fn(q3, k, v, jnp.asarray(q_start, jnp.int32), jnp.asarray(kv_len, jnp.int32),
                            jnp.asarray(vertical, jnp.int32), jnp.asarray(slash, jnp.int32), chunk_len=chunk_len,
                            max_concurrent_steps=max_concurrent_steps, interpret=bool(interpret))


def _reference(q, k, v, q_start, kv_len, vertical, slash, *, chunk_len: int | None = None):
    """Plain jnp of the same mask, built per (row, key) from active_blocks (float32, O(T*S))."""
    q3 = (q[None] if chunk_len is None else q).astype(jnp.float32)
    _, B, T, N, H = q3.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    act = active_blocks(slash, q_start, kv_len, T, S)
    act = jnp.repeat(jnp.repeat(act, BLOCK, axis=2)[:, :, :T], BLOCK, axis=3)[:, :, :, :S]   # [B,N,T,S]
    col = jnp.zeros((B, N, S), bool).at[jnp.arange(B)[:, None, None], jnp.arange(N)[None, :, None],
                                         vertical].set(True, mode="drop")
    p = q_start[:, None] + jnp.arange(T)[None, :]
    j = jnp.arange(S)
    causal = (j[None, None] <= p[:, :, None]) & (j[None, None] < kv_len[:, None, None])
    mask = causal[:, None] & (col[:, :, None] | act)
    kk = jnp.repeat(k.astype(jnp.float32), G, axis=2)
    vv = jnp.repeat(v.astype(jnp.float32), G, axis=2)
    lg = jnp.einsum("rbtnh,bsnh->rbnts", q3, kk) / math.sqrt(H)
    if chunk_len is None:
        lg = lg[0]
    else:
        region = jnp.clip(p[:, :, None] // chunk_len - j[None, None] // chunk_len, 0, 2)[:, None]
        lg = jnp.where(region == 0, lg[0], jnp.where(region == 1, lg[1], lg[2]))
    lg = jnp.where(mask, lg, -jnp.inf)
    lse = jax.nn.logsumexp(lg, axis=-1)
    w = jnp.where(mask, jnp.exp(lg - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]), 0.0)
    out = jnp.einsum("bnts,bsnh->btnh", w, vv)
    return out, lse.transpose(0, 2, 1)
