"""DCA prefill on Hopper through Pallas Mosaic GPU: wgmma + TMA, warp-specialized (FlashAttention-3 shape).

Same contract as `pallas_kernels/dca_prefill.py::dca_prefill` (q [3,B,T,N,H] for DCA or [B,T,N,H] plain,
k/v [B,S,K,H], q_start/kv_len [B] int32 -> out [B,T,N,H] in q's dtype, lse [B,T,N] float32 natural log),
written for speed on the H100 where the portable (Triton) kernel tops out at ~450 TFLOP/s.

Walk of one CTA (grid = q heads x (query-tile pairs x key splits) x batch; pairs launched last-first, heads
fastest so the 7 q heads sharing one kv head run side by side and share its K/V in L2). With num_splits = 1
a CTA visits every key tile its rows need, [0, need); with more, its split's run [t0, t1) of them, and the
wrapper merges the partial (out, lse) by LSE; "tile 0" below then means t0:
1. Three warpgroups. Warpgroups 0 and 1 ("compute") each own 64 query rows (rows 2*block_q*pair +
   wg*block_q ...); warpgroup 2 ("memory") streams K/V tiles 0..steps-1 into a ring of
   `max_concurrent_steps` SMEM slots with TMA, waiting on the "consumed" barriers before refilling a slot.
   steps = the key tiles warpgroup 1 needs (its rows are the later ones, so it needs the most).
2. A compute warpgroup TMA-loads its query rows of every variant (intra, succ, inter) into SMEM once,
   then runs flash attention over key tiles [0, tile_hi): QK^T by wgmma into a fresh accumulator,
   online softmax in base 2 in registers, P.V by wgmma accumulating into the running output. The two
   compute warpgroups ping-pong on a schedule barrier so one's softmax overlaps the other's matmuls.
3. DCA. Key tiles are aligned to absolute positions and block_k divides the DCA chunk length s, so a key
   tile lies in one DCA chunk. The 64 rows span at most two chunks (nq_lo, nq_lo + 1), so the key range
   splits into four segments, and within a segment every row uses one fixed query variant:
       seg 0  chunks <= nq_lo-2   inter for all rows                     -> SMEM buffer INTER
       seg 1  chunk nq_lo-1       rows in nq_lo: succ, rows in nq_lo+1: inter
       seg 2  chunk nq_lo         rows in nq_lo: intra, rows in nq_lo+1: succ
       seg 3  chunk nq_lo+1       intra (rows in nq_lo are causally masked there anyway)
   When all rows lie in nq_lo ("uniform", every tile but those straddling a chunk boundary), seg 1 reads
   buffer SUCC and seg 2 buffer INTRA, seg 3 is empty: the wgmma just reads another SMEM buffer, no
   extra work. When the rows straddle a boundary at row b ("mixed"), the per-row choice is built ONCE
   per segment in SMEM, in place: at seg 1, INTER <- where(row < b, SUCC, INTER) (INTER is not needed
   after seg 0); at seg 2, SUCC <- where(row < b, INTRA, SUCC). Both cases then run the same loop, with
   the buffer index a scalar: seg 1 reads INTER if mixed else SUCC, seg 2 reads SUCC if mixed else INTRA.
   Worked example (s = 128, q_start = 100, warpgroup rows at positions 100..163, nq_lo = 0, b = 28):
   seg 0, 1 empty; seg 2 = key tiles of chunk 0 with buffer SUCC := rows 0..27 intra, 28..63 succ;
   seg 3 = key tiles of chunk 1 (keys 128..163) with INTRA, rows 0..27 fully masked there.
4. Inside a segment, tiles with every key visible to every row (key < min(first row + 1, kv_len)) run
   without a mask; only the diagonal / kv_len tail builds the causal mask. A compute warpgroup that needs
   fewer tiles than `steps` still releases the remaining slots (epilogue) so the memory warpgroup and the
   other warpgroup never wait for it.
5. Each compute warpgroup normalizes, writes its output rows by TMA (reusing its INTRA SMEM buffer) and
   its LSE straight from registers. Rows that saw no key (kv_len = 0) get out = 0, lse = -inf.

Interpret mode (CPU tests, `plgpu.InterpretGPUParams`): the interpreter runs barriers, TMA and wgmma, but
neither `pl.run_state` (the accumulate-in-place P.V wgmma) nor a wgmma operand in registers. With
interpret=True only that step changes: P goes to an SMEM scratch and P.V lands in a fresh accumulator
that is added to the output. Everything else (segments, variant buffers, masks, barriers, the pipeline)
is the GPU code.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from pallas_kernels._flash_dca import check_dca_blocks, lse_merge, pad_axis
from pallas_kernels.dca_prefill import _split_variants, _validate, dca_prefill_reference

_reference = dca_prefill_reference           # the plain-jnp reference of this kernel (same contract)

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
INTRA, SUCC, INTER = 0, 1, 2                 # variant index in q's leading axis and in the SMEM buffers
COMPUTE_WGS = 2
SMEM_BYTES = 227 * 1024                      # H100 / H200 shared memory per block


def smem_bytes(n_variants: int, block_q: int, block_k: int, head_dim: int, stages: int, itemsize: int = 2):
    """Shared memory of the kernel's buffers (GPU variant): query variants + the K/V ring.

    Mosaic adds barriers and alignment (~1-3 KB) and raises its own error past the limit; lowered on the
    CPU for d = 128: DCA fits block_k 64 x 4 slots or 128 x 2, plain 128 x 3.
    """
    q = COMPUTE_WGS * n_variants * block_q * head_dim * itemsize
    kv = 2 * stages * block_k * head_dim * itemsize
    return q + kv


def _kernel(q_start_ref, kv_len_ref, kv_rows_ref, q_ref, k_ref, v_ref, out_ref, lse_ref, scratch, *, n_variants,
            num_pairs, num_splits, block_q, block_k, head_dim, stages, chunk_len, seq_len, group, interpret):
    q_smem, k_smem, v_smem, _, p_smem, q_bars, k_bars, v_bars, k_free, v_free, sched = scratch
    b = lax.axis_index("batch")
    n = lax.axis_index("heads")
    pair = num_pairs - 1 - lax.div(lax.axis_index("q_seq"), num_splits)   # launched last-first
    split = lax.rem(lax.axis_index("q_seq"), num_splits)
    wg = lax.axis_index("wg")
    q_start = q_start_ref[b]
    kv_len = jnp.minimum(kv_len_ref[b], seq_len)
    dtype = q_ref.dtype

    def tiles_needed(first_pos):
        """Key tiles [0, tile_hi) the rows first_pos .. first_pos + block_q - 1 see."""
        end = jnp.maximum(jnp.minimum(kv_len, first_pos + block_q), 0)
        return lax.div(end + block_k - 1, block_k)

    pair_row0 = pair * (COMPUTE_WGS * block_q)
    # This CTA's key tiles [t0, t1): split `split` of the tiles the last warpgroup needs (it needs the
    # most), cut into num_splits near-equal runs at run time, so the split holds for any cache fill.
    # Worked example: 1000 tiles needed, 3 splits -> per = 334: [0, 334), [334, 668), [668, 1000).
    need = tiles_needed(q_start + pair_row0 + (COMPUTE_WGS - 1) * block_q)
    per = lax.div(need + num_splits - 1, num_splits)
    t0 = jnp.minimum(split * per, need)
    t1 = jnp.minimum(t0 + per, need)
    steps = t1 - t0                                                   # tiles the memory warpgroup streams

    def sched_barrier():
        plgpu.barrier_arrive(sched)
        plgpu.barrier_wait(sched)

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        row0 = pair_row0 + wg * block_q
        first_pos = q_start + row0
        tile_hi = jnp.clip(tiles_needed(first_pos), t0, t1)          # this warpgroup's tiles: [t0, tile_hi)
        qbuf = q_smem.at[wg]
        for r in range(n_variants):                                   # one barrier per TMA copy
            plgpu.copy_gmem_to_smem(q_ref.at[r, b, pl.ds(row0, block_q), n], qbuf.at[r],
                                    q_bars.at[wg * n_variants + r])
        for r in range(n_variants):
            plgpu.barrier_wait(q_bars.at[wg * n_variants + r])

        acc = plgpu.layout_cast(jnp.full((block_q, head_dim), 0, jnp.float32), plgpu.Layout.WGMMA)
        m_i = plgpu.layout_cast(jnp.full((block_q,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        l_i = plgpu.layout_cast(jnp.full((block_q,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))

        @pl.when(tile_hi > t0)
        def _():
            plgpu.barrier_wait(k_bars.at[0])

        pl.when(wg == 1)(sched_barrier)                               # offset the ping-pong by half a step
        qk_scale = head_dim ** -0.5 * LOG2E

        def step(t, carry, vidx, masked):
            acc, m_i, l_i = carry
            slot = lax.rem(t - t0, stages)

            def qk_fn(s_ref):
                plgpu.wgmma(s_ref, qbuf.at[vidx], k_smem.at[slot].transpose((1, 0)))
                sched_barrier()
                return s_ref[...]
            s = pl.run_scoped(qk_fn, plgpu.ACC((block_q, block_k), jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot])
            if masked:
                rows = plgpu.broadcasted_iota(jnp.int32, (block_q, block_k), 0, layout=plgpu.Layout.WGMMA)
                cols = plgpu.broadcasted_iota(jnp.int32, (block_q, block_k), 1, layout=plgpu.Layout.WGMMA)
                key = cols + t * block_k
                s = jnp.where((key <= rows + first_pos) & (key < kv_len), s, -jnp.inf)
            # Base-2 online softmax; m is kept pre-multiplied by qk_scale so p is one FMA + exp2.
            m_new = jnp.maximum(m_i, s.max(axis=1) * qk_scale)
            # A masked tile can leave a row with no key yet (a key split starting right of its diagonal):
            # m_new = -inf there, and exp2(-inf - -inf) would be NaN; offsetting by 0 instead keeps
            # alpha = p = 0. Unmasked tiles give every row a key, so only they skip the select.
            m_off = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
            alpha = jnp.exp2(m_i - m_off)
            p = jnp.exp2(s * qk_scale - lax.broadcast_in_dim(m_off, s.shape, [0]))
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            l_i = l_i * alpha + p.sum(axis=1)
            p16 = p.astype(dtype)
            acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
            plgpu.barrier_arrive(sched)                               # softmax done
            plgpu.barrier_wait(v_bars.at[slot])
            plgpu.barrier_wait(sched)                                 # tensor cores free

            def wait_next_k():
                @pl.when(t + 1 < tile_hi)
                def _():
                    plgpu.barrier_wait(k_bars.at[lax.rem(t + 1 - t0, stages)])

            if not interpret:
                def pv_fn(acc_ref):
                    plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                    wait_next_k()                                     # overlaps the P.V wgmma
                acc = pl.run_state(pv_fn)(plgpu.ACC.init(acc))
            else:
                p_smem.at[wg][...] = p16
                plgpu.commit_smem()

                def pv_fn(o_ref):
                    plgpu.wgmma(o_ref, p_smem.at[wg], v_smem.at[slot])
                    return o_ref[...]
                acc = acc + pl.run_scoped(pv_fn, plgpu.ACC((block_q, head_dim), jnp.float32))
                wait_next_k()
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_new, l_i

        # Every row sees every key below min(first_pos + 1, kv_len): those tiles need no mask.
        unmasked_end = lax.div(jnp.minimum(first_pos + 1, kv_len), block_k)

        def run_range(lo, hi, vidx, carry):
            mid = jnp.clip(unmasked_end, lo, hi)
            carry = lax.fori_loop(lo, mid, functools.partial(step, vidx=vidx, masked=False), carry)
            return lax.fori_loop(mid, hi, functools.partial(step, vidx=vidx, masked=True), carry)

        carry = (acc, m_i, l_i)
        if chunk_len is None:
            carry = run_range(t0, tile_hi, 0, carry)
        else:
            tiles_per_chunk = chunk_len // block_k
            nq_lo = lax.div(first_pos, chunk_len)
            mixed = lax.div(first_pos + block_q - 1, chunk_len) != nq_lo
            split_row = (nq_lo + 1) * chunk_len - first_pos           # first row in chunk nq_lo + 1
            edge = lambda c: jnp.clip(c * tiles_per_chunk, t0, tile_hi)
            e1, e2, e3 = edge(nq_lo - 1), edge(nq_lo), edge(nq_lo + 1)

            def segment(seg, carry):
                @pl.when(mixed & ((seg == 1) | (seg == 2)))
                def _mix():
                    # seg 1: INTER <- rows < b ? SUCC : INTER;  seg 2: SUCC <- rows < b ? INTRA : SUCC.
                    dst, src = 3 - seg, 2 - seg
                    rows = plgpu.broadcasted_iota(jnp.int32, (block_q, head_dim), 0,
                                                  layout=plgpu.Layout.WGMMA)
                    lower, upper = qbuf.at[src][...], qbuf.at[dst][...]
                    qbuf.at[dst][...] = jnp.where(rows < split_row, lower, upper)
                    plgpu.commit_smem()                               # visible to the next wgmma
                lo = jnp.where(seg == 0, t0, jnp.where(seg == 1, e1, jnp.where(seg == 2, e2, e3)))
                hi = jnp.where(seg == 0, e1, jnp.where(seg == 1, e2, jnp.where(seg == 2, e3, tile_hi)))
                vidx = jnp.where(seg == 0, INTER, jnp.where(seg == 1, jnp.where(mixed, INTER, SUCC),
                                                            jnp.where(seg == 2, jnp.where(mixed, SUCC, INTRA),
                                                                      INTRA)))
                return run_range(lo, hi, vidx, carry)
            carry = lax.fori_loop(0, 4, segment, carry)
        acc, m_i, l_i = carry

        def release(t, _):
            # Tiles the memory warpgroup loads for the other compute warpgroup only: free them and keep
            # the ping-pong's barrier count equal (two rendezvous per step). Waiting for their arrival
            # first costs nothing (the other warpgroup needs them anyway) and keeps every barrier phase
            # observed by every waiter, which interpret mode checks.
            slot = lax.rem(t - t0, stages)
            plgpu.barrier_wait(k_bars.at[slot])
            plgpu.barrier_wait(v_bars.at[slot])
            plgpu.barrier_arrive(k_free.at[slot])
            plgpu.barrier_arrive(v_free.at[slot])
            sched_barrier()
            sched_barrier()
        lax.fori_loop(tile_hi, t1, release, None)
        pl.when(wg == 0)(sched_barrier)

        # l >= 1 for a row that saw a key (its max contributes exp2(0)); l = 0 only if it saw none, then
        # acc = 0 -> out 0, and lse = m*ln2 + log(0) = -inf.
        l_safe = jnp.maximum(l_i, 1e-30)
        acc = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
        obuf = qbuf.at[INTRA]
        obuf[...] = acc.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(obuf, out_ref.at[split, b, pl.ds(row0, block_q), n])
        # LSE straight from registers to GMEM (64 floats): an SMEM staging buffer would not fit beside
        # 3 query variants and two 128-key K/V slots.
        lse_ref.at[split, b, n, pl.ds(row0, block_q)][...] = m_i * LN2 + jnp.log(l_i)
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")
        kv_head = lax.div(n, group)
        row = kv_rows_ref[b]                                          # this batch row's cache row

        def load(t, slot):
            keys = (row, pl.ds((t0 + t) * block_k, block_k), kv_head)
            plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_bars.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_bars.at[slot])

        for i in range(stages):
            pl.when(i < steps)(functools.partial(load, i, i))

        @pl.loop(0, jnp.maximum(steps - stages, 0))
        def _refill(t):
            slot = lax.rem(t, stages)
            keys = (row, pl.ds((t0 + t + stages) * block_k, block_k), kv_head)
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_bars.at[slot])
            plgpu.barrier_wait(v_free.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_bars.at[slot])

        @pl.loop(jnp.maximum(steps - stages, 0), steps)
        def _drain(t):
            # Observe the last frees too: every barrier phase seen by its waiter (interpret mode checks
            # it; on the GPU this warpgroup is idle here anyway).
            slot = lax.rem(t, stages)
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.barrier_wait(v_free.at[slot])


# Key splits for short query chunks (`prefill_num_splits`): one CTA per SM (the buffers take ~224 KB of
# SMEM), a CTA's fixed cost (query variants loaded, pipeline filled, output written) ~ START_COST_TILES
# key tiles; past MAX_SPLITS the merge's partials stop paying.
START_COST_TILES = 4
MAX_SPLITS = 8


def prefill_num_splits(batch: int, q_heads: int, rows: int, keys: int, block_k: int,
                       num_sms: int | None = None) -> int:
    """Key splits for `rows` queries of `q_heads` heads x `batch` against a cache of `keys` keys.

    The grid holds ctas = batch x q_heads x cdiv(rows, 128) CTAs (two 64-row warpgroups each) over
    tiles = cdiv(keys, block_k) key tiles. Model: one CTA per SM; time(s) = waves(s) * (cdiv(tiles, s) +
    START_COST_TILES), waves(s) = cdiv(s * ctas, num_sms); the smallest s within 5% of the least modelled
    time wins (the model is rough, and each split adds partials to merge). keys is the cache length S (the valid length is data; the
    kernel spreads the valid tiles over the splits at run time). num_sms=None: the default device's.
    Worked example (132 SMs, 128K keys = 1024 tiles of 128): 256 rows x 28 heads = 56 CTAs:
      s = 1: 1 wave x 1028;  s = 2: 1 x 516;  s = 4: 2 x 260 = 520;  s = 7: 3 x 151 = 453 -> 7.
    8192 rows (1792 CTAs, 13.6 waves) keep s = 1 (14 x 1028 = 14392, within 5% of s = 3's 41 x 346).
    """
    from pallas_kernels.dca_decode import device_num_sms
    num_sms = device_num_sms() if num_sms is None else num_sms
    for name, x in (("batch", batch), ("q_heads", q_heads), ("rows", rows), ("keys", keys),
                    ("block_k", block_k), ("num_sms", num_sms)):
        if x < 1:
            raise ValueError(f"prefill_num_splits: {name}={x} must be >= 1")
    ctas = batch * q_heads * -(-rows // (COMPUTE_WGS * 64))
    tiles = -(-keys // block_k)
    cost = lambda s: -(-s * ctas // num_sms) * (-(-tiles // s) + START_COST_TILES)
    options = range(1, min(MAX_SPLITS, tiles) + 1)
    best = min(cost(s) for s in options)
    return next(s for s in options if cost(s) <= 1.05 * best)


@functools.partial(jax.jit, static_argnames=("chunk_len", "block_q", "block_k", "max_concurrent_steps",
                                             "num_splits", "interpret"))
def _dca_prefill_mgpu(q3, k, v, q_start, kv_len, kv_rows, *, chunk_len, block_q, block_k, max_concurrent_steps,
                      num_splits, interpret):
    R, B, T, N, H = q3.shape
    S, K = k.shape[1], k.shape[2]
    rows_per_cta = COMPUTE_WGS * block_q
    q3 = pad_axis(q3, 2, rows_per_cta)
    # TMA copies whole tiles: a cache whose length is not a multiple of block_k is padded (a copy; the
    # engine's caches are whole tiles, so this only happens in tests). Keys >= kv_len are masked.
    k, v = pad_axis(k, 1, block_k), pad_axis(v, 1, block_k)
    Tp = q3.shape[2]
    num_pairs = Tp // rows_per_cta
    stages = max_concurrent_steps
    tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    kernel = functools.partial(_kernel, n_variants=R, num_pairs=num_pairs, num_splits=num_splits, block_q=block_q,
                               block_k=block_k, head_dim=H, stages=stages, chunk_len=chunk_len,
                               seq_len=S, group=N // K, interpret=interpret)

    def entry(q_start_ref, kv_len_ref, kv_rows_ref, q_ref, k_ref, v_ref, out_ref, lse_ref):
        scratch = [
            plgpu.SMEM((COMPUTE_WGS, R, block_q, H), q3.dtype, transforms=tiled),
            plgpu.SMEM((stages, block_k, H), k.dtype, transforms=tiled),
            plgpu.SMEM((stages, block_k, H), v.dtype, transforms=tiled),
            None,                                                     # (LSE goes from registers)
            # P staged through SMEM: interpret mode only (see the module docstring).
            plgpu.SMEM((COMPUTE_WGS, block_q, block_k), q3.dtype, transforms=tiled) if interpret else None,
        ]
        barriers = (
            plgpu.Barrier(num_barriers=COMPUTE_WGS * R),              # q variant loaded, per compute wg
            plgpu.Barrier(num_barriers=stages),                       # k slot loaded
            plgpu.Barrier(num_barriers=stages),                       # v slot loaded
            plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),   # k slot free
            plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),   # v slot free
            plgpu.Barrier(num_arrivals=COMPUTE_WGS),                  # ping-pong schedule
        )
        pl.run_scoped(
            lambda *refs: kernel(q_start_ref, kv_len_ref, kv_rows_ref, q_ref, k_ref, v_ref, out_ref, lse_ref, refs),
            *scratch, *barriers, collective_axes="wg")

    out, lse = plgpu.kernel(
        entry,
        out_type=[jax.ShapeDtypeStruct((num_splits, B, Tp, N, H), q3.dtype),
                  jax.ShapeDtypeStruct((num_splits, B, N, Tp), jnp.float32)],
        grid=(N, num_pairs * num_splits, B),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )(q_start, kv_len, kv_rows, q3, k, v)
    out, lse = out[:, :, :T], lse[:, :, :, :T].transpose(0, 1, 3, 2)          # [P,B,T,N,H], [P,B,T,N]
    if num_splits == 1:
        return out[0], lse[0]
    out, lse = lse_merge(out, lse, axis=0)
    return out.astype(q3.dtype), lse


def dca_prefill_mgpu(q, k, v, q_start, kv_len, *, chunk_len: int | None = None, block_q: int = 64,
                     block_k: int = 128, max_concurrent_steps: int = 2, num_splits: int = 1,
                     interpret: bool | None = None, kv_rows=None):
    """Attention of T queries (absolute positions q_start + t) against the cache, DCA or plain.

    Contract of `dca_prefill` (see there): q [3,B,T,N,H] with chunk_len = s, or [B,T,N,H] with
    chunk_len None; k, v [B,S,K,H]; q_start, kv_len [B] int32. Returns (out [B,T,N,H] in q's dtype,
    lse [B,T,N] float32 natural log), softmax scale 1/sqrt(H).
    Hopper only (wgmma): bf16 or f16 inputs, H a multiple of 64, block_q = 64 (one warpgroup's rows;
    a CTA takes 2 x 64 rows), block_k 64 or 128 dividing s, max_concurrent_steps >= 2 K/V slots, all
    fitting the 227 KB of shared memory. interpret=None: interpret mode unless the backend is a GPU.
    num_splits > 1 also splits each CTA's key range into that many runs (more CTAs for a short query
    chunk over a long cache: 256 rows x 28 heads are 56 CTAs, under half an H100's 132 SMs), merged by
    LSE in jnp. The partials are written in q's dtype, so the merge adds at most one more rounding of
    the output (bf16: 2^-9 relative, a convex combination of rounded partials); `prefill_num_splits`
    picks the count.
    kv_rows [B] int32: batch row b reads cache row kv_rows[b] of k, v [R, S, K, H] (any R; each value
    < R, which a traced value cannot be checked for: the caller's slot bookkeeping holds it), so a
    server's cache is read in place rather than through a copy of the rows (None: row b reads row b).
    """
    q3 = _split_variants(q, chunk_len)
    B = q3.shape[1]
    if kv_rows is None:
        kv_rows = jnp.arange(B, dtype=jnp.int32)
        _validate(q3, k, v, q_start, kv_len, chunk_len)
    else:
        kv_rows = jnp.asarray(kv_rows, jnp.int32)
        if kv_rows.shape != (B,):
            raise ValueError(f"dca_prefill_mgpu: kv_rows must be [B]=[{B}] cache rows; got {kv_rows.shape}")
        rows = lambda x: jax.ShapeDtypeStruct((B,) + x.shape[1:], x.dtype)   # what the queries read
        _validate(q3, rows(k), rows(v), q_start, kv_len, chunk_len)
    check_dca_blocks(chunk_len, block_q=block_q, block_k=block_k)
    H = q3.shape[-1]
    dtypes = {jnp.dtype(x.dtype) for x in (q3, k, v)}
    if len(dtypes) != 1 or dtypes.pop() not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"dca_prefill_mgpu wants q, k, v all bf16 or all f16 (wgmma operands); got "
                         f"{q3.dtype}, {k.dtype}, {v.dtype}")
    if H % 64:
        raise ValueError(f"dca_prefill_mgpu: head_dim H={H} must be a multiple of 64 (128-byte swizzle)")
    if block_q != 64:
        raise ValueError(f"dca_prefill_mgpu: block_q={block_q}; only 64 (the wgmma M of one warpgroup)")
    if block_k not in (64, 128):
        raise ValueError(f"dca_prefill_mgpu: block_k={block_k}; must be 64 or 128")
    if num_splits < 1:
        raise ValueError(f"dca_prefill_mgpu: num_splits={num_splits} must be >= 1")
    if max_concurrent_steps < 2:
        raise ValueError(f"dca_prefill_mgpu: max_concurrent_steps={max_concurrent_steps} must be >= 2")
    need = smem_bytes(q3.shape[0], block_q, block_k, H, max_concurrent_steps)
    if need > SMEM_BYTES:
        raise ValueError(f"dca_prefill_mgpu: block_k={block_k} x {max_concurrent_steps} K/V slots with "
                         f"{q3.shape[0]} query variants needs {need} bytes of shared memory > {SMEM_BYTES}; "
                         f"use fewer slots or block_k=64")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    return _dca_prefill_mgpu(q3, k, v, jnp.asarray(q_start, jnp.int32), jnp.asarray(kv_len, jnp.int32), kv_rows,
                             chunk_len=chunk_len, block_q=block_q, block_k=block_k,
                             max_concurrent_steps=max_concurrent_steps, num_splits=num_splits,
                             interpret=bool(interpret))
