"""The step runner: weights, KV cache, sampler state and decode state on the device, and the jitted steps
that take and donate them. It knows slots and positions, not requests or text (zenjax/sequence.py keeps
those; zenjax/engine.py ties the two together).

Walk of the device work of one request in slot i:
    set_row(i, ...)          device: the slot's sampler row (seed, penalties, seen tokens) and decode row
                             (position = prompt length, tokens left, stop-id mask); live = False
    prefill(i, piece) x n    one jitted step per piece, padded to the smallest prefill bucket that holds
                             it (a 200-token prompt runs a 256-row step, not a full chunk); K/V go into
                             row i of the cache; the last piece returns the last row's logits
    sample_first(i, logits)  device: first token; decode row: token, tokens left - 1, live unless it is a
                             stop id or nothing is left. The host gets the token (the TTFT event).
    decode(mask, n)          ONE call runs up to n decode steps for the slots in `mask` that are live
                             (lax.while_loop): each step feeds the sampled token back, writes its K/V at
                             the slot's position, advances position / PRNG key / seen set / tokens left on
                             the device, and a slot that samples a stop id or runs out of tokens stops
                             (writes nothing more, emits -1). The loop ends after n steps or when no slot
                             is live. Returns [decode_block, B] tokens (-1: no token).
    prefill_decode(i, piece, mask)  a prefill piece of slot i and ONE decode step of the slots in `mask`
                             in one call (the scheduler's choice while a prompt prefills beside running
                             streams): the weights are read once for both (model.Qwen2.step's row
                             groups), so a chat beside a long prefill costs its decode rows, not a step
No host array is built per decode call: the mask of each slot set and the step counts are uploaded once
and cached; the cache, sampler and decode state are donated and replaced by the outputs, so the host
can dispatch the next call before it reads the previous one's tokens (JAX dispatch is asynchronous).

Compiled shapes (the whole list; `compiled_shapes`): prefill [1, T] for T in the prefill buckets, the
same with all-row logits (research use) and with recall probes (zenjax/refine only: per bucket and budget
set), decode [max_batch, 1] looped up to decode_block steps (ONE compilation: the step count is a traced
loop bound), prefill [1, T] + decode [max_batch, 1] per bucket (max_batch > 1), and three tiny row updates.
"""
from __future__ import annotations

import collections
import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from zenjax.config import EngineConfig, ModelConfig
from zenjax.model import KVCache, Qwen2, Rows, StepInputs
from zenjax.sampling import SamplerState, sample
from zenjax.sharding import CACHE_AXES, sharding_for

CACHE_ALIGN = 128         # cache slots are a multiple of the Mosaic GPU prefill kernel's key tile
# prefill step sizes below prefill_chunk (which is always one), so while a stream decodes the scheduler can
# take the largest piece that fits the inter-token budget. With only 256/2048/8192 a gap that 8192 did not
# fit fell to 2048, and the rest of it to 256-token pieces. Powers of two alone still left a third of a
# gap unused: on the H100 at 128K context a 100 ms gap held a 1024 piece of ~65 ms where 1536 fits (chat
# gap p50 66 ms), and every extra piece pays the ~13 ms per-call cost (RESULTS.md, session 15). Steps of
# ~1.5x between 512 and 4096 (benchmarks/pacing_sim.py, c0 = 13 ms: fused TTFT 1.219x -> 1.161x of
# alone) cost three more compilations of each prefill step (warmup), nothing per call.
PREFILL_BUCKETS = (256, 512, 768, 1024, 1536, 2048, 3072, 4096, 8192)
DECODE_BLOCK = 16         # most decode steps one device call runs


def prefill_buckets(chunk: int, dca_chunk_len: int | None) -> tuple[int, ...]:
    """Prefill step sizes: PREFILL_BUCKETS below the cap, plus the cap = prefill_chunk, or the DCA chunk
    length s when that is smaller (pieces never cross a DCA boundary, so none is longer than s).

    Examples: chunk 8192 -> (256, 512, 768, 1024, 1536, 2048, 3072, 4096, 8192); chunk 512 -> (256, 512);
    chunk 2048 with s = 1000 -> (256, 512, 768, 1000)."""
    cap = chunk if dca_chunk_len is None else min(chunk, dca_chunk_len)
    return tuple(sorted({b for b in PREFILL_BUCKETS if b < cap} | {cap}))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """Per-slot decode state kept on the device between calls. B = slots, V = vocab."""

    token: jax.Array        # [B] i32  last sampled token: the next step's input
    pos: jax.Array          # [B] i32  cache position of that token's K/V
    prompt_len: jax.Array   # [B] i32  (DCA temperature m(max(prompt_len, pos + 1)))
    remaining: jax.Array    # [B] i32  tokens the sequence may still generate
    live: jax.Array         # [B] bool decoding, no stop id sampled, tokens left
    stop: jax.Array         # [B, V] bool stop token ids (EOS unless ignore_eos, plus the request's)

    @staticmethod
    def empty(batch: int, vocab: int) -> "DecodeState":
        z = lambda: jnp.zeros((batch,), jnp.int32)                  # four buffers (each is donated)
        return DecodeState(token=z(), pos=z(), prompt_len=z(), remaining=z(), live=jnp.zeros((batch,), jnp.bool_),
                           stop=jnp.zeros((batch, vocab), jnp.bool_))


def _where_rows(active, new, old):
    return jax.tree.map(lambda n, o: jnp.where(active.reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new, old)


class Runner:
    def __init__(self, cfg: ModelConfig, params: dict, ec: EngineConfig, mesh, verbose: bool = True,
                 sparse=None):
        self.config, self.engine_config, self.mesh = cfg, ec, mesh
        self.sparse = sparse               # SparseConfig | None: budgets of the prefill_sparse step
        self.max_batch = ec.max_batch
        self.decode_block = DECODE_BLOCK
        self.buckets = prefill_buckets(ec.prefill_chunk, cfg.dca.chunk_len if cfg.dca else None)
        self._graphdef, self._state = nnx.split(Qwen2(cfg, params, mesh=mesh))
        cache_dtype = jnp.dtype(ec.cache_dtype)
        # The cache holds max_model_len slots rounded up to CACHE_ALIGN: the Hopper prefill kernel walks
        # 128-key tiles and would otherwise pad (copy) a whole layer's cache every step. The extra slots are
        # never valid keys (kv_len <= max_model_len); the first one past the end is the write sentinel of
        # padding rows. Example: max_model_len 1,010,000 -> 1,010,048 cache slots.
        self.cache_len = -(-ec.max_model_len // CACHE_ALIGN) * CACHE_ALIGN
        self.cache_bytes = KVCache.nbytes(cfg, ec.max_batch, self.cache_len, cache_dtype)
        if verbose:
            print(f"zenjax: KV cache {ec.max_batch} x {self.cache_len} tokens x {cfg.num_layers} layers, "
                  f"{cache_dtype.name}: {self.cache_bytes / 2**30:.3f} GiB; attention={ec.attention}",
                  file=sys.stderr)
        self.cache = KVCache.zeros(cfg, ec.max_batch, self.cache_len, cache_dtype,
                                   sharding_for(CACHE_AXES, mesh))
        # placed on the mesh from the start so a step's output has the same type as its input
        # (otherwise every step function compiles a second time)
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self.sampler = self._put(SamplerState.empty(ec.max_batch, cfg.vocab_size))
        self.decode_state = self._put(DecodeState.empty(ec.max_batch, cfg.vocab_size))
        # DCA temperature m(L) per length L (1.0 without DCA), float32: the host (prefill) and the device
        # (decode) read the same numbers. 4 bytes x (cache_len + 1): 4 MB at 1M.
        L = np.arange(self.cache_len + 1, dtype=np.float64)
        if cfg.dca is not None:
            m = np.maximum(1.0, 0.1 * np.log(np.maximum(L, 1) / cfg.dca.original_max_position_embeddings) + 1.0)
        else:
            m = np.ones_like(L)
        self._temps_host = m.astype(np.float32)
        self._temps = self._put(self._temps_host)
        self._masks: dict[tuple[int, ...], jax.Array] = {}
        self._counts: dict[int, jax.Array] = {}
        self._build_steps()

    def _put(self, tree):
        return jax.device_put(tree, self._replicated)

    def temperature(self, length: int) -> float:
        return float(self._temps_host[length])

    def compiled_shapes(self) -> dict[str, tuple]:
        """The bounded set of step shapes this runner compiles: prefill [1, T] per bucket; decode
        [max_batch, 1] run up to decode_block times in one call; with several slots, each prefill shape
        beside one decode step."""
        B = self.max_batch
        shapes = {"prefill": tuple((1, T) for T in self.buckets),
                  "prefill_all_logits": tuple((1, T) for T in self.buckets),
                  "decode": (B, 1), "decode_block": self.decode_block}
        if B > 1:                      # a piece of one slot beside a decode step of the others
            shapes["prefill_decode"] = tuple(((1, T), (B, 1)) for T in self.buckets)
        if self.sparse is not None:    # + per layer the estimator's top-k sizes (static, from the budgets)
            shapes["prefill_sparse"] = shapes["prefill"]
            if B > 1:
                shapes["prefill_decode_sparse"] = shapes["prefill_decode"]
        if self.trace_counts["prefill_probe"]:   # zenjax/refine used this runner: per bucket and budget set
            shapes["prefill_probe"] = shapes["prefill"]
        return shapes

    # ---------------------------------------------------------------- jitted steps
    def _build_steps(self):
        graphdef, impl, block = self._graphdef, self.engine_config.attention, self.decode_block
        # Python bodies run only when JAX traces (compiles) them: this counts compilations per step.
        self.trace_counts: collections.Counter = collections.Counter()

        def prefill(state, cache, inp, slot, last_row):
            self.trace_counts["prefill"] += 1
            return nnx.merge(graphdef, state)(inp, cache, impl=impl, slot=slot, logits_rows=last_row)

        def prefill_sparse(state, cache, inp, slot, last_row):
            self.trace_counts["prefill_sparse"] += 1
            return nnx.merge(graphdef, state)(inp, cache, impl=impl, slot=slot, logits_rows=last_row,
                                              sparse=self.sparse)

        def prefill_probe(state, cache, inp, slot, probe):
            # zenjax/refine: a dense prefill step that also returns, per layer, the log recall of the
            # probe's (static, hashable) budgets: [L, T, N] for the step's single row
            self.trace_counts["prefill_probe"] += 1
            log_recall: list = []
            _, cache = nnx.merge(graphdef, state)(inp, cache, impl=impl, slot=slot,
                                                  logits_rows=jnp.zeros((1,), jnp.int32),
                                                  recall_probe=(probe, log_recall))
            return jnp.stack(log_recall)[:, 0], cache

        def prefill_all(state, cache, inp, slot):
            self.trace_counts["prefill_all_logits"] += 1
            return nnx.merge(graphdef, state)(inp, cache, impl=impl, slot=slot, logits_rows=None)

        def decode_rows(ds, mask, temps):
            """(rows in this step, the decode step's inputs): one token per slot."""
            act = mask & ds.live
            # Slots not in this step read one key at position 0 and write a throwaway K/V at their own
            # pos: the slot's first free cache position (pos <= max_model_len - 1 < S, engine.start
            # caps prompt + new tokens at max_model_len). Nothing reads it before it is written again:
            # a live slot's next step writes its real K/V there, a prefilling slot's pieces stop below
            # it (pos = prompt length), a finished slot keeps (for prefix reuse) only positions < pos.
            # So the write is unconditional: no select, and XLA fuses the key's rotation into it.
            pos = jnp.where(act, ds.pos, 0)
            inp = StepInputs(tokens=jnp.where(act, ds.token, 0)[:, None], q_start=pos, kv_len=pos + 1,
                             write_pos=ds.pos[:, None],
                             temp=jnp.where(act, temps[jnp.maximum(ds.prompt_len, ds.pos + 1)], 1.0))
            return act, inp

        def decode_advance(logits, act, sampler, ds):
            """Sample the step's tokens and advance the slots in it: (tokens [B], -1 where none; sampler, ds)."""
            rows = jnp.arange(ds.token.shape[0])
            tok, new = sample(logits, sampler)
            # only the slots in this step advance their PRNG key and seen-token set; a slot that is
            # prefilling or finished must not (else a seeded request depends on its neighbours)
            sampler = _where_rows(act, new, sampler)
            remaining = ds.remaining - act.astype(jnp.int32)
            done = act & (ds.stop[rows, tok] | (remaining <= 0))
            ds = dataclasses.replace(ds, token=jnp.where(act, tok, ds.token),
                                     pos=ds.pos + act.astype(jnp.int32), remaining=remaining,
                                     live=ds.live & ~done)
            return jnp.where(act, tok, -1), sampler, ds

        def decode(state, cache, sampler, ds, mask, n, temps):
            self.trace_counts["decode"] += 1
            model = nnx.merge(graphdef, state)
            B = ds.token.shape[0]

            def step(carry):
                i, cache, sampler, ds, out = carry
                act, inp = decode_rows(ds, mask, temps)
                logits, cache = model(inp, cache, impl=impl, slot=None, logits_rows=jnp.zeros((B,), jnp.int32),
                                      writes_in_bounds=True)
                tok, sampler, ds = decode_advance(logits, act, sampler, ds)
                out = jax.lax.dynamic_update_index_in_dim(out, tok, i, axis=0)
                return i + 1, cache, sampler, ds, out

            def more(carry):
                i, _, _, ds, _ = carry
                return (i < n) & jnp.any(mask & ds.live)

            out = jnp.full((block, B), -1, jnp.int32)
            _, cache, sampler, ds, out = jax.lax.while_loop(more, step, (jnp.int32(0), cache, sampler, ds, out))
            return out, cache, sampler, ds

        def prefill_decode(state, cache, sampler, ds, inp, slot, last_row, mask, temps, sparse):
            # one prefill piece of `slot` and one decode step of the slots in `mask`, sharing one read of
            # the weights (Qwen2.step's row groups); the decode rows' writes go to each slot's pos, which is
            # >= the prompt length for the prefilling slot, so they never touch the piece's rows
            self.trace_counts["prefill_decode_sparse" if sparse else "prefill_decode"] += 1
            model = nnx.merge(graphdef, state)
            B = ds.token.shape[0]
            act, dinp = decode_rows(ds, mask, temps)
            groups = [Rows(inp, slot, last_row, self.sparse if sparse else None),
                      Rows(dinp, None, jnp.zeros((B,), jnp.int32), None, True)]
            (piece_logits, logits), cache = model.step(groups, cache, impl=impl)
            tok, sampler, ds = decode_advance(logits, act, sampler, ds)
            return piece_logits, tok[None], cache, sampler, ds

        def sample_first(sampler, ds, logits, slot):
            row = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, slot, 1, axis=0), sampler)
            token, row = sample(logits, row)
            sampler = jax.tree.map(lambda a, r: jax.lax.dynamic_update_slice_in_dim(a, r, slot, axis=0),
                                   sampler, row)
            tok = token[0]
            left = ds.remaining[slot] - 1
            ds = dataclasses.replace(ds, token=ds.token.at[slot].set(tok), remaining=ds.remaining.at[slot].set(left),
                                     live=ds.live.at[slot].set((left > 0) & ~ds.stop[slot, tok]))
            return tok, sampler, ds

        def set_row(sampler, ds, slot, sampler_values, decode_values):
            sampler = jax.tree.map(lambda a, v: a.at[slot].set(v), sampler, SamplerState(**sampler_values))
            ds = jax.tree.map(lambda a, v: a.at[slot].set(v), ds, DecodeState(**decode_values))
            return sampler, ds

        self._prefill = jax.jit(prefill, donate_argnums=(1,))
        self._prefill_sparse = jax.jit(prefill_sparse, donate_argnums=(1,))
        self._prefill_all = jax.jit(prefill_all, donate_argnums=(1,))
        self._prefill_probe = jax.jit(prefill_probe, donate_argnums=(1,), static_argnums=(4,))
        self._decode = jax.jit(decode, donate_argnums=(1, 2, 3))
        self._prefill_decode = jax.jit(prefill_decode, donate_argnums=(1, 2, 3), static_argnums=(9,))
        self._sample_first = jax.jit(sample_first, donate_argnums=(0, 1))
        self._set_row = jax.jit(set_row, donate_argnums=(0, 1))

    # ---------------------------------------------------------------- host calls
    def set_row(self, slot: int, sampler_values: dict, *, token: int, pos: int, prompt_len: int,
                remaining: int, live: bool, stop_ids) -> None:
        V = self.config.vocab_size
        stop = np.zeros((V,), np.bool_)
        ids = np.asarray(sorted(stop_ids), np.int64)
        stop[ids[(ids >= 0) & (ids < V)]] = True
        dv = dict(token=np.int32(token), pos=np.int32(pos), prompt_len=np.int32(prompt_len),
                  remaining=np.int32(remaining), live=np.bool_(live), stop=stop)
        self.sampler, self.decode_state = self._set_row(self.sampler, self.decode_state, jnp.int32(slot),
                                                        sampler_values, dv)

    def _piece_inputs(self, ids, start: int, end: int, total_len: int) -> StepInputs:
        n = end - start
        T = next(b for b in self.buckets if b >= n)
        tokens = np.zeros((1, T), np.int32)
        tokens[0, :n] = ids[start:end]
        write_pos = np.full((1, T), self.cache_len, np.int32)          # padding rows write nowhere
        write_pos[0, :n] = np.arange(start, end)
        return StepInputs(tokens=jnp.asarray(tokens), q_start=jnp.asarray([start], jnp.int32),
                          kv_len=jnp.asarray([end], jnp.int32), write_pos=jnp.asarray(write_pos),
                          temp=jnp.asarray([self.temperature(total_len)], jnp.float32))

    def prefill(self, slot: int, ids, start: int, end: int, sparse: bool = False) -> jax.Array:
        """Prefill ids[start:end] into row `slot` (sparse: through the vertical-slash step); returns the
        last row's logits [1, V] (device)."""
        inp = self._piece_inputs(ids, start, end, len(ids))
        row = jnp.asarray([end - start - 1], jnp.int32)
        step = self._prefill_sparse if sparse else self._prefill
        logits, self.cache = step(self._state, self.cache, inp, jnp.int32(slot), row)
        return logits

    def prefill_all_logits(self, slot: int, ids, start: int, end: int) -> np.ndarray:
        inp = self._piece_inputs(ids, start, end, len(ids))
        logits, self.cache = self._prefill_all(self._state, self.cache, inp, jnp.int32(slot))
        return np.asarray(logits[0, : end - start])

    def prefill_probe(self, slot: int, ids, start: int, end: int, probe) -> jax.Array:
        """Refinement only (zenjax/refine): prefill ids[start:end] dense into row `slot` and return the log
        recall of the SparseConfig `probe`'s budgets, [L, T, N] float32 (device; rows >= end - start are
        padding). Compiles once per prefill bucket and budget set."""
        inp = self._piece_inputs(ids, start, end, len(ids))
        log_recall, self.cache = self._prefill_probe(self._state, self.cache, inp, jnp.int32(slot), probe)
        return log_recall

    def sample_first(self, slot: int, logits) -> int:
        token, self.sampler, self.decode_state = self._sample_first(self.sampler, self.decode_state, logits,
                                                                    jnp.int32(slot))
        return int(token)

    def _mask(self, slots) -> jax.Array:
        key = tuple(sorted(slots))
        if key not in self._masks:                        # at most 2^max_batch tiny arrays, made once each
            mask = np.zeros((self.max_batch,), np.bool_)
            mask[list(key)] = True
            self._masks[key] = self._put(mask)
        return self._masks[key]

    def prefill_decode(self, slot: int, ids, start: int, end: int, slots, sparse: bool = False):
        """Prefill ids[start:end] into row `slot` and run one decode step for `slots` (not `slot`) in one
        device call: (the piece's last-row logits [1, V], the step's tokens [1, B]; both device, -1 = no
        token). Equal to prefill(...) followed by decode(slots, 1), with one weight read instead of two.
        The engine checks the slots (Engine._piece: `slot` prefilling, `slots` past prefill)."""
        inp = self._piece_inputs(ids, start, end, len(ids))
        row = jnp.asarray([end - start - 1], jnp.int32)
        logits, out, self.cache, self.sampler, self.decode_state = self._prefill_decode(
            self._state, self.cache, self.sampler, self.decode_state, inp, jnp.int32(slot), row,
            self._mask(slots), self._temps, bool(sparse))
        return logits, out

    def decode(self, slots, n: int) -> jax.Array:
        """Dispatch one call of up to n decode steps for `slots`; returns the [decode_block, B] token
        array (device, not yet synced; -1 = no token)."""
        if not 1 <= n <= self.decode_block:
            raise ValueError(f"decode steps n={n} outside [1, {self.decode_block}]")
        if n not in self._counts:
            self._counts[n] = self._put(np.int32(n))
        out, self.cache, self.sampler, self.decode_state = self._decode(
            self._state, self.cache, self.sampler, self.decode_state, self._mask(slots), self._counts[n],
            self._temps)
        return out
