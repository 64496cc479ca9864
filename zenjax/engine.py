"""The engine: a loaded model behind a slot API, and one-call generation on top of it.

Data flow of one request (`engine.generate`, or the server's scheduler driving the same calls):

    prompt (text | ids | chat messages) --encode_prompt (prompt.py)--> ids
    start(slot, ids, params)      host: a SequenceState (sequence.py: prefill progress, text stream);
                                  device: the slot's sampler and decode rows (runner.py). With reuse_min > 0
                                  the prompt's leading tokens that the slot's cache still holds from its
                                  previous sequence (prefix reuse, below) count as prefilled
    prefill_next(slot[, max]) xN  device: one jitted step per piece (<= prefill_chunk and <= max tokens,
                                  padded to the smallest prefill bucket; blocks until done, so the caller's
                                  clock measures it); after the last piece the first token is sampled on the
                                  device and returned
    decode_steps(slots, n)        device: ONE call of up to n decode steps for all slots, sampling and stop-id
                                  / max_new_tokens checks on the device
    prefill_and_decode(slot, slots[, max])  the two above in one device call: a piece of `slot` and one
                                  decode step of `slots` read the weights once (the scheduler, while a
                                  prompt prefills beside running streams)
    append_token(slot, token)     host: detokenize, check stop strings; a token past a finish is dropped
    release(slot)                 the row keeps its K/V; the engine remembers which tokens they belong to
                                  (sequence.HeldPrefix) until the slot is started again

Who does what: runner.Runner owns the device (weights, cache, jitted steps, compiled shapes);
sequence.SequenceState the host bookkeeping of one sequence; prompt.encode_prompt the prompt checks;
textstream.TextStream the text. The Engine only routes between them; the scheduler uses only the slot API
(start, prefill_next, prefill_and_decode, decode_steps, append_token, release) and the queries slot_state (a frozen
SlotView), next_piece, reusable and prefill_buckets; it never reads a SequenceState.

Prefix reuse: a released slot's cache row still holds the K/V of its last sequence's prompt and fed-back
tokens. `reusable(slot, ids, min_tokens)` says how many leading tokens of a new prompt can be taken from it
(sequence.reusable_prefix states the rule: equal tokens, the same DCA temperature as applied, same
sparse/dense prefill) and `start(..., reuse_min=...)` starts prefilling after them; the sampler state is
fresh. stats()["reused_prompt_tokens"] counts them. Anything that writes a row outside a sequence
(logits(), assume_prefilled, a failed step) forgets what the row held.

Pieces never cross a DCA chunk boundary (multiples of s = chunk_size - local_size), so every prefill step
sees queries of one DCA chunk (what the cuDNN DCA path relies on) at the cost of at most one extra step
per DCA chunk.

Sparse prefill (zenjax/attention/sparse.py): with a SparseConfig, every piece of a prompt longer than
its threshold runs the runner's `prefill_sparse` step (same bucket shapes; per layer the indices are
estimated from the piece's last queries); `stats()` counts prompt tokens prefilled sparse and dense.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from zenjax.config import DCAConfig, EngineConfig, ModelConfig, SparseConfig, engine_config, resolve_sparse, with_dca
from zenjax.prompt import encode_prompt
from zenjax.runner import CACHE_ALIGN, DECODE_BLOCK, Runner  # noqa: F401  (re-exported)
from zenjax.sampling import SamplingParams, slot_values
from zenjax.sequence import (HeldPrefix, IdStream as _IdStream, SequenceState, SlotView, prefill_plan,  # noqa: F401
                             reusable_prefix, stop_ids_for, text_stream)
from zenjax.sharding import make_mesh, sharding_for
from zenjax.tokenizer import PromptError  # noqa: F401  (one error class for every bad prompt)

DEFAULT_CHECKPOINT = Path(__file__).parent / "assets" / "default"


@dataclasses.dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str            # "stop" | "length"
    prompt_tokens: int
    ttft_s: float
    total_s: float


@dataclasses.dataclass
class DecodeCall:
    """A dispatched decode call: its token array (device) and the sequences it decoded."""
    out: jax.Array
    seqs: dict[int, SequenceState]


class Engine:
    def __init__(self, cfg: ModelConfig, params: dict, ec: EngineConfig, *, tokenizer=None,
                 eos_token_ids: Sequence[int] = (), mesh=None, verbose: bool = True,
                 sparse: SparseConfig | None = None):
        self.config, self.engine_config, self.tokenizer = cfg, ec, tokenizer
        # sparse prefill (prompts longer than sparse.threshold); counts prompt tokens per kind for stats()
        self.sparse = sparse
        self._stats = collections.Counter(sparse_prefill_tokens=0, dense_prefill_tokens=0, reused_prompt_tokens=0)
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.mesh = mesh if mesh is not None else make_mesh(1)
        self.max_batch = ec.max_batch
        self.runner = Runner(cfg, params, ec, self.mesh, verbose=verbose, sparse=sparse)
        self.cache_len, self.cache_bytes = self.runner.cache_len, self.runner.cache_bytes
        self.decode_block = self.runner.decode_block
        self._seqs: dict[int, SequenceState] = {}
        self._held: dict[int, HeldPrefix] = {}          # released slots: what their cache rows hold
        self._last_ids: tuple | None = None             # (prompt object, its int32 array): see _id_array
        # m(L) as the model applies it (q and k are multiplied by m cast to their dtype, model.py): the
        # values prefix reuse compares (sequence.reusable_prefix)
        act = jnp.result_type(params["embed"].dtype, params["layers"]["0"]["b_qkv"].dtype)
        self._applied_temps = np.asarray(self.runner._temps_host).astype(act)

    @property
    def trace_counts(self):
        return self.runner.trace_counts

    @property
    def _cache(self):
        return self.runner.cache

    def compiled_shapes(self) -> dict[str, tuple]:
        """The bounded set of step shapes this engine compiles (see zenjax/runner.py)."""
        return self.runner.compiled_shapes()

    def stats(self) -> dict[str, int]:
        """Counters since start: prompt tokens prefilled sparse and dense, and reused from a slot's cache."""
        return dict(self._stats)

    def prefills_sparse(self, prompt_len: int) -> bool:
        """Whether a prompt of this length is prefilled sparse (vLLM: longer than the threshold)."""
        return self.sparse is not None and prompt_len > self.sparse.threshold

    # ---------------------------------------------------------------- host helpers
    def prefill_plan(self, prompt_len: int) -> list[tuple[int, int]]:
        """Cut [0, prompt_len) into pieces of <= prefill_chunk tokens that never cross a DCA boundary.

        Example: prefill_chunk 8, DCA chunk_len s = 12, 30 tokens -> (0,8) (8,12) (12,20) (20,24) (24,30).
        """
        return prefill_plan(prompt_len, self.engine_config.prefill_chunk,
                            self.config.dca.chunk_len if self.config.dca else None)

    def temperature(self, length: int) -> float:
        return self.runner.temperature(length)

    def text_stream(self, params: SamplingParams, max_new_tokens: int):
        return text_stream(self.tokenizer, params, stop_ids_for(params, self.eos_token_ids), max_new_tokens)

    def encode_prompt(self, prompt) -> list[int]:
        """str -> tokenizer ids; list of ints -> checked ids; list of {role, content} -> chat template."""
        return encode_prompt(prompt, self.tokenizer, self.config.vocab_size, self.engine_config.max_model_len)

    # ---------------------------------------------------------------- slot API (the scheduler's)
    @property
    def prefill_buckets(self) -> tuple[int, ...]:
        """The compiled prefill step sizes (a piece of T tokens costs a step of the smallest bucket >= T)."""
        return self.runner.buckets

    def start(self, slot: int, prompt_ids: Sequence[int], params: SamplingParams, *,
              reuse_min: int = 0) -> SequenceState:
        """Start a sequence in a free slot and return the engine's state of it (library use and tests;
        the scheduler reads slot_state). reuse_min > 0: take the K/V of the longest prefix (of at least
        reuse_min tokens, `reusable`) that the slot's row still holds instead of prefilling it."""
        S = self.engine_config.max_model_len
        if not 0 <= slot < self.max_batch:
            raise ValueError(f"slot={slot} outside [0, {self.max_batch})")
        if slot in self._seqs:
            raise ValueError(f"slot={slot} is in use; release it first")
        if not prompt_ids or len(prompt_ids) >= S:
            raise PromptError(f"prompt: {len(prompt_ids)} tokens; need 1..{S - 1}")
        n = len(prompt_ids)
        max_new = min(params.max_new_tokens, S - n)
        stop_ids = stop_ids_for(params, self.eos_token_ids)
        reused = self.reusable(slot, prompt_ids, reuse_min) if reuse_min > 0 else 0
        self._held.pop(slot, None)                         # the new sequence overwrites the row from `reused` on
        seq = SequenceState(slot, prompt_ids, params, chunk=self.engine_config.prefill_chunk,
                            dca_chunk_len=self.config.dca.chunk_len if self.config.dca else None,
                            max_new_tokens=max_new, stream=text_stream(self.tokenizer, params, stop_ids, max_new),
                            reused=reused, sparse=self.prefills_sparse(n))
        # params.seed wins; an unseeded request draws a fresh seed
        values = slot_values(params, prompt_ids, self.config.vocab_size, int.from_bytes(os.urandom(4), "little"))
        self.runner.set_row(slot, values, token=0, pos=n, prompt_len=n, remaining=max_new, live=False,
                            stop_ids=stop_ids)
        self._seqs[slot] = seq
        self._stats["reused_prompt_tokens"] += reused
        return seq

    def sequence(self, slot: int) -> SequenceState:
        """The engine's own state of a slot's sequence (tests, benchmarks; the scheduler uses slot_state)."""
        return self._seqs[slot]

    # ---------------------------------------------------------------- queries (the scheduler's view)
    def slot_state(self, slot: int) -> SlotView:
        return self._seqs[slot].view()

    def next_piece(self, slot: int, max_tokens: int | None = None) -> tuple[int, int, int]:
        """(start, end, bucket) of the piece prefill_next(slot, max_tokens) would run; bucket = the
        compiled step size it pads to (what it costs)."""
        start, end = self._seqs[slot].next_piece(max_tokens)
        return start, end, next(b for b in self.runner.buckets if b >= end - start)

    def reusable(self, slot: int, prompt_ids: Sequence[int], min_tokens: int) -> int:
        """Leading tokens of prompt_ids whose K/V the free slot's row holds and a cold run would compute
        the same (sequence.reusable_prefix); 0 if fewer than min_tokens or the slot holds nothing."""
        held = self._held.get(slot)
        if held is None or slot in self._seqs or min_tokens <= 0 or len(held.ids) < min_tokens:
            return 0
        head = min(min_tokens, len(prompt_ids))        # cheap rejection before converting a long prompt
        if list(held.ids[:head]) != list(prompt_ids[:head]):
            return 0
        return reusable_prefix(held, self._id_array(prompt_ids), self._applied_temps,
                               sparse=self.prefills_sparse(len(prompt_ids)), min_tokens=min_tokens)

    def _id_array(self, prompt_ids) -> np.ndarray:
        """prompt_ids as int32, converted once per prompt object: the scheduler asks `reusable` for every
        free slot and `start` asks again (~70 ms per conversion of a 1M-token list)."""
        if isinstance(prompt_ids, np.ndarray):
            return prompt_ids.astype(np.int32, copy=False)
        last = self._last_ids
        if last is None or last[0] is not prompt_ids or len(last[1]) != len(prompt_ids):
            last = self._last_ids = (prompt_ids, np.asarray(prompt_ids, np.int32))
        return last[1]

    # ---------------------------------------------------------------- slot API, continued
    def prefill_next(self, slot: int, max_tokens: int | None = None) -> int | None:
        """Run the next prefill piece of `slot` (<= max_tokens tokens if given) and wait for it; after the
        last one, sample and return the first token."""
        return self._piece(slot, max_tokens, ())[0]

    @property
    def fuses_decode(self) -> bool:
        """Whether prefill_and_decode can run (a decoding slot beside a prefilling one needs two slots)."""
        return self.max_batch > 1

    def prefill_and_decode(self, slot: int, decode_slots: Sequence[int],
                           max_tokens: int | None = None) -> tuple[int | None, dict[int, list[int]]]:
        """prefill_next(slot, max_tokens) and decode_steps(decode_slots, 1) in ONE device call (the weights
        are read once for both): (the first token after the prompt's last piece, else None; {slot: tokens}).
        Same results as the two calls one after the other."""
        return self._piece(slot, max_tokens, decode_slots)

    def _piece(self, slot: int, max_tokens: int | None, decode_slots) -> tuple[int | None, dict[int, list[int]]]:
        seq = self._seqs[slot]
        if slot in decode_slots:
            raise ValueError(f"slot {slot} is prefilling; it cannot also decode")
        seqs = self._decoding(decode_slots)
        start, end = seq.next_piece(max_tokens)
        sparse = seq.sparse
        was, seq.reusable = seq.reusable, False    # until the step is done: a failure leaves the row unknown
        if seqs:
            logits, out = self.runner.prefill_decode(slot, seq.prompt_ids, start, end, list(seqs), sparse=sparse)
        else:
            logits, out = self.runner.prefill(slot, seq.prompt_ids, start, end, sparse=sparse), None
        jax.block_until_ready(logits)          # so the caller's clock measures the piece (ITL budget)
        seq.reusable = was
        tokens = self.decode_collect(DecodeCall(out, seqs)) if seqs else {}
        self._stats["sparse_prefill_tokens" if sparse else "dense_prefill_tokens"] += end - start
        seq.prefilled = end
        if end < seq.prompt_len:
            return None, tokens
        seq.last_token = self.runner.sample_first(slot, logits)
        seq.fed.append(seq.last_token)
        return seq.last_token, tokens

    def append_token(self, slot: int, token: int) -> tuple[str, str | None]:
        """Record a generated token of `slot` on the host: (text delta, finish reason or None)."""
        return self._seqs[slot].append(token)

    def assume_prefilled(self, slot: int, context: int, token: int = 1) -> None:
        """Benchmarks only: mark `slot` as if its prompt (`context` tokens) were prefilled and `token`
        sampled, without running the prefill (decode cost does not depend on the cache's values)."""
        seq = self._seqs[slot]
        seq.reusable = False                   # the row does not hold this prompt's K/V
        seq.prefilled = seq.prompt_len = context
        seq.position, seq.last_token = context, int(token)
        self.runner.set_row(slot, slot_values(seq.params, seq.prompt_ids, self.config.vocab_size, slot), token=token,
                            pos=context, prompt_len=context, remaining=seq.max_new_tokens - 1, live=True,
                            stop_ids=stop_ids_for(seq.params, self.eos_token_ids))

    def decode_launch(self, slots: Sequence[int], n: int = DECODE_BLOCK) -> DecodeCall:
        """Dispatch one device call of up to n decode steps for `slots` (each past prefill, not finished)
        and return at once; `decode_collect` reads its tokens. A second call may be launched before the
        first is collected: it continues from the first's device state."""
        seqs = self._decoding(slots)
        return DecodeCall(self.runner.decode(list(slots), n), seqs)

    def _decoding(self, slots: Sequence[int]) -> dict[int, SequenceState]:
        """{slot: sequence} of slots that may decode: each past prefill and not finished."""
        seqs = {}
        for s in slots:
            seq = self._seqs.get(s)
            if seq is None or seq.last_token is None:
                raise ValueError(f"slot {s} has not finished prefill")
            if seq.finish_reason is not None:
                raise ValueError(f"slot {s} has finished ({seq.finish_reason})")
            seqs[s] = seq
        return seqs

    def decode_collect(self, call: DecodeCall) -> dict[int, list[int]]:
        """Tokens of a launched call per slot (fewer than n where the device saw a stop id or the
        sequence's max_new_tokens); advances each sequence's position. Slots released or restarted since
        the launch get nothing."""
        out = np.asarray(call.out)                                        # [decode_block, B]; -1 = none
        result = {}
        for s, seq in call.seqs.items():
            if self._seqs.get(s) is not seq:
                continue
            toks = [int(t) for t in out[:, s] if t >= 0]
            if toks:
                seq.position += len(toks)
                seq.last_token = toks[-1]
                seq.fed.extend(toks)
            result[s] = toks
        return result

    def decode_steps(self, slots: Sequence[int], n: int = DECODE_BLOCK) -> dict[int, list[int]]:
        """Up to n decode steps for `slots` in one device call: {slot: tokens}."""
        return self.decode_collect(self.decode_launch(slots, n))

    def decode(self, slots: Sequence[int]) -> list[int]:
        """One decode step for `slots` (each has finished prefill and not yet finished)."""
        got = self.decode_steps(slots, 1)
        if any(len(got[s]) != 1 for s in slots):
            done = [s for s in slots if len(got[s]) != 1]
            raise ValueError(f"slots {done} are finished (stop token or max_new_tokens reached)")
        return [got[s][0] for s in slots]

    def release(self, slot: int, keep: bool = True) -> None:
        """Free the slot. keep: remember what its row holds for prefix reuse; False after a failure (or
        on a free slot: forget what it held). Releasing a free slot with keep=True changes nothing."""
        seq = self._seqs.pop(slot, None)
        if seq is None and keep:
            return
        self._held.pop(slot, None)
        if seq is not None and keep and seq.reusable and seq.cached > 0:
            self._held[slot] = seq.held()

    def warmup(self, slot: int = 0) -> None:
        """Compile every step a request can use (one prompt per prefill bucket, then a decode call, and with
        several slots each bucket's piece beside a decode step), so no request pays a compile (~10 s per
        bucket on the H200). The slot (and with several slots the next one) must be free; both are released."""
        top = self.engine_config.max_model_len - 2
        params = SamplingParams(max_new_tokens=2, ignore_eos=True)
        for b in self.runner.buckets:
            self.start(slot, [0] * min(b, top), params)
            try:
                while self.prefill_next(slot) is None:
                    pass
                self.decode([slot])
            finally:
                self.release(slot, keep=False)
        if not self.fuses_decode:
            return
        # prefill_and_decode per bucket: `slot` decodes while the next slot prefills one piece of each size
        other = (slot + 1) % self.max_batch
        self.start(slot, [0], SamplingParams(max_new_tokens=4 * len(self.runner.buckets) + 2, ignore_eos=True))
        try:
            self.prefill_next(slot)
            for b in self.runner.buckets:
                self.start(other, [0] * min(b, top), params)
                try:
                    while self.prefill_and_decode(other, [slot])[0] is None:
                        pass
                finally:
                    self.release(other, keep=False)
        finally:
            self.release(slot, keep=False)

    # ---------------------------------------------------------------- high level
    def logits(self, ids: Sequence[int], slot: int = 0) -> np.ndarray:
        """[len(ids), V] float32 logits of a short input (computes all rows; research use)."""
        ids = self.encode_prompt(list(ids))
        if slot in self._seqs:
            raise ValueError(f"slot={slot} is in use")
        self._held.pop(slot, None)             # this overwrites the row outside a sequence
        return np.concatenate([self.runner.prefill_all_logits(slot, ids, start, end)
                               for start, end in self.prefill_plan(len(ids))], axis=0)

    def stream(self, prompt, params: SamplingParams | None = None, *, slot: int = 0,
               _result: dict | None = None) -> Iterator[str]:
        """Yield text deltas of one generation. Decode calls are pipelined: the next call is dispatched
        before the host detokenizes the previous one's tokens, so the device never waits for the host
        (a call launched after the sequence finished on the device returns at once, no steps run)."""
        params = params or SamplingParams()
        ids = self.encode_prompt(prompt)
        t0 = time.perf_counter()
        seq = self.start(slot, ids, params)
        try:
            token = None
            while token is None:
                token = self.prefill_next(slot)
            ttft = time.perf_counter() - t0
            delta, reason = seq.append(token)
            if delta:
                yield delta
            pending = self.decode_launch([slot]) if reason is None else None
            while reason is None:
                ahead = self.decode_launch([slot])
                for token in self.decode_collect(pending)[slot]:
                    delta, reason = seq.append(token)
                    if delta:
                        yield delta
                    if reason is not None:
                        break
                pending = ahead
            if _result is not None:
                _result.update(seq=seq, ttft=ttft, total=time.perf_counter() - t0)
        finally:
            self.release(slot)

    def generate(self, prompt, params: SamplingParams | None = None) -> GenerationResult:
        info: dict = {}
        text = "".join(self.stream(prompt, params, _result=info))
        seq = info["seq"]
        return GenerationResult(text=text, token_ids=list(seq.output_ids), finish_reason=seq.finish_reason,
                                prompt_tokens=seq.prompt_len, ttft_s=info["ttft"], total_s=info["total"])


def load(path=None, *, max_model_len: int | None = None, prefill_chunk: int = 8192, max_batch: int = 1,
         attention: str = "auto", dtype: str | None = None, cache_dtype: str | None = None,
         dca: DCAConfig | None | bool = True, tensor_parallel: int = 1, expert_parallel: int = 1,
         verbose: bool = True,
         quantization: str | None = None, sparse: "bool | str | SparseConfig | Path" = "auto") -> Engine:
    """Load a converted checkpoint (None: the embedded default) into an Engine.

    quantization: None keeps the checkpoint's weights (fp8 if it was converted with --quantization fp8);
    "fp8" quantizes a float checkpoint's linear layers to e4m3 + scales on the host, tensor by tensor.

    dca: True keeps the checkpoint's dual_chunk_attention_config; False turns DCA off; a DCAConfig
    enables or overrides it for any Qwen2 checkpoint.
    sparse: "auto" = True when the attention implementation has a validated sparse path
    (zenjax.attention.sparse_ready), else dense; True uses the checkpoint's sparse_attention_config.json
    when it has one (vLLM's default); False prefills dense; a path or a SparseConfig gives the budgets
    (zenjax.config.resolve_sparse).
    """
    from zenjax.checkpoint import load_checkpoint, read_config
    path = Path(path) if path is not None else DEFAULT_CHECKPOINT
    cfg, meta = read_config(path)
    cfg = with_dca(cfg, dca)
    sparse_cfg = resolve_sparse(True if sparse == "auto" else sparse, cfg, checkpoint_dir=path, meta=meta)
    dtype = dtype or meta.get("dtype", "bfloat16")
    ec = engine_config(max_model_len=max_model_len or min(cfg.max_position_embeddings, 32768),
                       prefill_chunk=prefill_chunk, max_batch=max_batch, attention=attention, dtype=dtype,
                       cache_dtype=cache_dtype, platform=jax.default_backend())
    if sparse == "auto" and sparse_cfg is not None:
        from zenjax.attention import sparse_ready
        if not sparse_ready(ec.attention):
            if verbose:
                print(f"zenjax: {sparse_cfg.source}: sparse prefill stays off with attention={ec.attention} "
                      "(no validated sparse path; pass sparse=True to force it)", file=sys.stderr)
            sparse_cfg = None
    mesh = make_mesh(tensor_parallel, cfg=cfg, ep=expert_parallel)   # checked against the heads (sharding.py)

    def put(path_tuple, spec, array):
        if spec.dtype is not None:        # fp8 values / scales keep their dtype
            return jax.device_put(np.asarray(array), sharding_for(spec.axes, mesh))
        return jax.device_put(np.asarray(array).astype(jnp.dtype(dtype)), sharding_for(spec.axes, mesh))

    quantizer = None
    if quantization is not None and meta.get("quantization") is None:
        from zenjax.fp8 import QuantizeAtLoad
        put = quantizer = QuantizeAtLoad(cfg, quantization, put)
    _, _, params = load_checkpoint(path, put=put)
    if quantizer is not None:
        params = quantizer.merge(params)
    tokenizer = None
    if (path / "tokenizer.json").exists():
        from zenjax.tokenizer import Tokenizer
        tokenizer = Tokenizer.from_dir(path)
    eos = meta.get("generation", {}).get("eos_token_id")
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    return Engine(cfg, params, ec, tokenizer=tokenizer, eos_token_ids=eos, mesh=mesh, verbose=verbose,
                  sparse=sparse_cfg)
