"""The engine: a loaded model, its KV cache, the jitted steps, and host-side sequence bookkeeping.

Data flow of one request (`engine.generate`, or the server's scheduler driving the same calls):

    prompt (text | ids | chat messages) --encode_prompt--> ids
    start(slot, ids, params)       host: plan prefill pieces; device: reset the slot's sampler state
    prefill_next(slot) x pieces    device: one jitted step per piece of <= prefill_chunk tokens, padded
                                   to prefill_chunk, writing K/V into the slot's cache rows; the last
                                   piece returns the last row's logits -> first token sampled on device
    decode(slots) until finished   device: one jitted step for all slots (inactive ones write nothing),
                                   sampling on device; host: seq.append(token) detokenizes incrementally
                                   and checks EOS / stop strings / max_new_tokens
    release(slot)                  the slot's cache rows are simply overwritten by the next request

Pieces never cross a DCA chunk boundary (multiples of s = chunk_size - local_size), so every prefill step
sees queries of one DCA chunk (what the cuDNN DCA path relies on) at the cost of at most one extra step
per DCA chunk.

Sparse prefill (zenjax/attention/sparse.py): with a SparseConfig, every piece of a prompt longer than
its threshold runs the `prefill_sparse` step (same shape; per layer the indices are estimated from the
piece's last queries); `stats()` counts prompt tokens prefilled sparse and dense.

Compiled shapes (the whole list; see `compiled_shapes`): prefill [1, prefill_chunk] with last-row logits,
the same with all-row logits (only for `engine.logits`, research use), decode [max_batch, 1], and two
tiny sampler updates. The cache is [max_batch, cache_len, K, H] per layer for k and v (cache_len =
max_model_len rounded up to CACHE_ALIGN = 128), allocated once
and donated to every step.
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
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from zenjax.config import DCAConfig, EngineConfig, ModelConfig, SparseConfig, engine_config, resolve_sparse, with_dca
from zenjax.model import KVCache, Qwen2, StepInputs
from zenjax.sampling import SamplerState, SamplingParams, sample, slot_values
from zenjax.sharding import CACHE_AXES, make_mesh, sharding_for

DEFAULT_CHECKPOINT = Path(__file__).parent / "assets" / "default"


from zenjax.tokenizer import PromptError  # noqa: E402  (one error class for every bad prompt)


@dataclasses.dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str            # "stop" | "length"
    prompt_tokens: int
    ttft_s: float
    total_s: float


class SequenceState:
    """Host-side state of one sequence in a slot."""

    def __init__(self, engine: "Engine", slot: int, prompt_ids: list[int], params: SamplingParams):
        self.slot, self.prompt_ids, self.params = slot, list(prompt_ids), params
        self.prompt_len = len(prompt_ids)
        self.plan = engine.prefill_plan(self.prompt_len)
        self.prefilled = 0                 # prompt tokens already in the cache
        self.position = self.prompt_len   # where the next decoded token's K/V goes
        self.last_token: int | None = None
        self.output_ids: list[int] = []
        self.finish_reason: str | None = None
        room = engine.engine_config.max_model_len - self.prompt_len
        self.max_new_tokens = min(params.max_new_tokens, room)
        self._stream = engine.text_stream(params, self.max_new_tokens)

    @property
    def prefill_done(self) -> bool:
        return self.prefilled >= self.prompt_len

    def append(self, token: int) -> tuple[str, str | None]:
        """Record a generated token; returns (text delta, finish reason or None)."""
        self.output_ids.append(int(token))
        delta, reason = self._stream.push(int(token))
        if reason is None and len(self.output_ids) >= self.max_new_tokens:
            reason = "length"
        if reason is not None:
            self.finish_reason = reason
            delta += self._stream.flush()
        return delta, reason

    @property
    def text(self) -> str:
        return self._stream.text


class _IdStream:
    """Stand-in for TextStream when the checkpoint has no tokenizer: no text, stop on stop ids."""

    def __init__(self, stop_ids, max_new_tokens):
        self.stop_ids, self.max_new, self.n, self.text = set(stop_ids), max_new_tokens, 0, ""

    def push(self, token):
        self.n += 1
        if token in self.stop_ids:
            return "", "stop"
        return "", ("length" if self.n >= self.max_new else None)

    def flush(self):
        return ""


CACHE_ALIGN = 128    # cache slots are a multiple of the Mosaic GPU prefill kernel's key tile


class Engine:
    def __init__(self, cfg: ModelConfig, params: dict, ec: EngineConfig, *, tokenizer=None,
                 eos_token_ids: Sequence[int] = (), mesh=None, verbose: bool = True,
                 sparse: SparseConfig | None = None):
        self.config, self.engine_config, self.tokenizer = cfg, ec, tokenizer
        # sparse prefill (prompts longer than sparse.threshold); counts prompt tokens per kind for stats()
        self.sparse = sparse
        self._stats = collections.Counter(sparse_prefill_tokens=0, dense_prefill_tokens=0)
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.mesh = mesh if mesh is not None else make_mesh(1)
        self.max_batch = ec.max_batch
        model = Qwen2(cfg, params)
        self._graphdef, self._state = nnx.split(model)
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
        self._cache = KVCache.zeros(cfg, ec.max_batch, self.cache_len, cache_dtype,
                                    sharding_for(CACHE_AXES, self.mesh))
        # placed on the mesh from the start so the first step's output has the same type as its input
        # (otherwise every step function compiles a second time)
        self._sampler = jax.device_put(SamplerState.empty(ec.max_batch, cfg.vocab_size),
                                       NamedSharding(self.mesh, PartitionSpec()))
        self._seqs: dict[int, SequenceState] = {}
        self._build_steps()

    # ---------------------------------------------------------------- jitted steps
    def _build_steps(self):
        graphdef, impl = self._graphdef, self.engine_config.attention
        # Python bodies run only when JAX traces (compiles) them: this counts compilations per step.
        self.trace_counts: collections.Counter = collections.Counter()

        def prefill(state, cache, inp, slot, last_row):
            self.trace_counts["prefill"] += 1
            model = nnx.merge(graphdef, state)
            return model(inp, cache, impl=impl, slot=slot, logits_rows=last_row)

        def prefill_sparse(state, cache, inp, slot, last_row):
            self.trace_counts["prefill_sparse"] += 1
            model = nnx.merge(graphdef, state)
            return model(inp, cache, impl=impl, slot=slot, logits_rows=last_row, sparse=self.sparse)

        def prefill_all(state, cache, inp, slot):
            self.trace_counts["prefill_all_logits"] += 1
            model = nnx.merge(graphdef, state)
            return model(inp, cache, impl=impl, slot=slot, logits_rows=None)

        def decode(state, cache, sampler, inp):
            self.trace_counts["decode"] += 1
            model = nnx.merge(graphdef, state)
            logits, cache = model(inp, cache, impl=impl, slot=None,
                                  logits_rows=jnp.zeros((inp.tokens.shape[0],), jnp.int32))
            tokens, new = sample(logits, sampler)
            # only the slots in this step advance their PRNG key and seen-token set; a slot that is
            # still prefilling must not (else a seeded request depends on its neighbours)
            active = inp.write_pos[:, 0] < cache.k[0].shape[1]
            sampler = jax.tree.map(lambda n, o: jnp.where(active.reshape((-1,) + (1,) * (n.ndim - 1)), n, o),
                                   new, sampler)
            return tokens, cache, sampler

        def sample_slot(sampler, logits, slot):
            row = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, slot, 1, axis=0), sampler)
            token, row = sample(logits, row)
            sampler = jax.tree.map(lambda a, r: jax.lax.dynamic_update_slice_in_dim(a, r, slot, axis=0),
                                   sampler, row)
            return token[0], sampler

        def set_slot(sampler, slot, values):
            return jax.tree.map(lambda a, v: a.at[slot].set(v), sampler, SamplerState(**values))

        self._prefill = jax.jit(prefill, donate_argnums=(1,))
        self._prefill_sparse = jax.jit(prefill_sparse, donate_argnums=(1,))
        self._prefill_all = jax.jit(prefill_all, donate_argnums=(1,))
        self._decode = jax.jit(decode, donate_argnums=(1, 2))
        self._sample_slot = jax.jit(sample_slot, donate_argnums=(0,))
        self._set_slot = jax.jit(set_slot, donate_argnums=(0,))

    def compiled_shapes(self) -> dict[str, tuple[int, int]]:
        """The bounded set of step shapes [rows, tokens] this engine compiles."""
        ec = self.engine_config
        shapes = {"prefill": (1, ec.prefill_chunk), "prefill_all_logits": (1, ec.prefill_chunk),
                  "decode": (ec.max_batch, 1)}
        if self.sparse is not None:      # + per layer the estimator's top-k sizes (static, from the budgets)
            shapes["prefill_sparse"] = (1, ec.prefill_chunk)
        return shapes

    def stats(self) -> dict[str, int]:
        """Counters since start: prompt tokens prefilled sparse and dense."""
        return dict(self._stats)

    def prefills_sparse(self, prompt_len: int) -> bool:
        """Whether a prompt of this length is prefilled sparse (vLLM: longer than the threshold)."""
        return self.sparse is not None and prompt_len > self.sparse.threshold

    # ---------------------------------------------------------------- host helpers
    def prefill_plan(self, prompt_len: int) -> list[tuple[int, int]]:
        """Cut [0, prompt_len) into pieces of <= prefill_chunk tokens that never cross a DCA boundary.

        Example: prefill_chunk 8, DCA chunk_len s = 12, 30 tokens -> (0,8) (8,12) (12,20) (20,24) (24,30).
        """
        chunk = self.engine_config.prefill_chunk
        s = self.config.dca.chunk_len if self.config.dca else None
        pieces, start = [], 0
        while start < prompt_len:
            end = min(start + chunk, prompt_len)
            if s is not None:
                end = min(end, (start // s + 1) * s)
            pieces.append((start, end))
            start = end
        return pieces

    def temperature(self, length: int) -> float:
        return self.config.dca.temperature(length) if self.config.dca else 1.0

    def text_stream(self, params: SamplingParams, max_new_tokens: int):
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
        if self.tokenizer is None:
            return _IdStream(stop_ids, max_new_tokens)
        from zenjax.textstream import TextStream
        return TextStream(self.tokenizer, stop=params.stop, stop_token_ids=stop_ids,
                          max_new_tokens=max_new_tokens)

    def encode_prompt(self, prompt) -> list[int]:
        """str -> tokenizer ids; list of ints -> checked ids; list of {role, content} -> chat template."""
        if isinstance(prompt, str):
            if not prompt:
                raise PromptError("prompt: empty text")
            if self.tokenizer is None:
                raise PromptError("prompt: this checkpoint has no tokenizer; pass token ids")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            if self.tokenizer is None:
                raise PromptError("messages: this checkpoint has no tokenizer/chat template")
            ids = self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True)
        elif isinstance(prompt, (list, tuple, np.ndarray)):
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise PromptError(f"prompt token ids: {bad[:5]} outside [0, {self.config.vocab_size})")
        else:
            raise PromptError(f"prompt: expected text, token ids or chat messages, got {type(prompt).__name__}")
        if not ids:
            raise PromptError("prompt: encodes to zero tokens")
        if len(ids) >= self.engine_config.max_model_len:
            raise PromptError(f"prompt: {len(ids)} tokens leave no room to generate within "
                              f"max_model_len={self.engine_config.max_model_len}")
        return list(ids)

    def _inputs(self, tokens, q_start, kv_len, write_pos, temp) -> StepInputs:
        return StepInputs(tokens=jnp.asarray(tokens, jnp.int32), q_start=jnp.asarray(q_start, jnp.int32),
                          kv_len=jnp.asarray(kv_len, jnp.int32), write_pos=jnp.asarray(write_pos, jnp.int32),
                          temp=jnp.asarray(temp, jnp.float32))

    def _piece_inputs(self, ids: Sequence[int], start: int, end: int, total_len: int) -> StepInputs:
        T = self.engine_config.prefill_chunk
        n = end - start
        tokens = np.zeros((1, T), np.int32)
        tokens[0, :n] = ids[start:end]
        write_pos = np.full((1, T), self.cache_len, np.int32)          # padding rows write nowhere
        write_pos[0, :n] = np.arange(start, end)
        return self._inputs(tokens, [start], [end], write_pos, [self.temperature(total_len)])

    # ---------------------------------------------------------------- slot API (the scheduler's)
    def start(self, slot: int, prompt_ids: Sequence[int], params: SamplingParams) -> SequenceState:
        if not 0 <= slot < self.max_batch:
            raise ValueError(f"slot={slot} outside [0, {self.max_batch})")
        if slot in self._seqs:
            raise ValueError(f"slot={slot} is in use; release it first")
        if not prompt_ids or len(prompt_ids) >= self.engine_config.max_model_len:
            raise PromptError(f"prompt: {len(prompt_ids)} tokens; need 1..{self.engine_config.max_model_len - 1}")
        seq = SequenceState(self, slot, prompt_ids, params)
        # params.seed wins; an unseeded request draws a fresh seed
        values = slot_values(params, prompt_ids, self.config.vocab_size, int.from_bytes(os.urandom(4), "little"))
        self._sampler = self._set_slot(self._sampler, jnp.int32(slot), values)
        self._seqs[slot] = seq
        return seq

    def sequence(self, slot: int) -> SequenceState:
        return self._seqs[slot]

    def prefill_next(self, slot: int) -> int | None:
        """Run the next prefill piece of `slot`; after the last one, sample and return the first token."""
        seq = self._seqs[slot]
        start, end = next(p for p in seq.plan if p[1] > seq.prefilled)
        inp = self._piece_inputs(seq.prompt_ids, start, end, seq.prompt_len)
        last = end == seq.prompt_len
        row = jnp.asarray([end - start - 1 if last else 0], jnp.int32)
        sparse = self.prefills_sparse(seq.prompt_len)
        step = self._prefill_sparse if sparse else self._prefill
        logits, self._cache = step(self._state, self._cache, inp, jnp.int32(slot), row)
        self._stats["sparse_prefill_tokens" if sparse else "dense_prefill_tokens"] += end - start
        seq.prefilled = end
        if not last:
            return None
        token, self._sampler = self._sample_slot(self._sampler, logits, jnp.int32(slot))
        seq.last_token = int(token)
        return seq.last_token

    def decode(self, slots: Sequence[int]) -> list[int]:
        """One decode step for `slots` (each has finished prefill and not yet finished)."""
        B, S = self.max_batch, self.engine_config.max_model_len
        tokens = np.zeros((B, 1), np.int32)
        pos = np.zeros((B,), np.int32)
        write = np.full((B, 1), self.cache_len, np.int32)            # idle slots write nowhere
        temp = np.ones((B,), np.float32)
        for s in slots:
            seq = self._seqs[s]
            if seq.last_token is None:
                raise ValueError(f"slot {s} has not finished prefill")
            if seq.position >= S:
                raise ValueError(f"slot {s} is full (max_model_len={S})")
            tokens[s, 0], pos[s], write[s, 0] = seq.last_token, seq.position, seq.position
            temp[s] = self.temperature(max(seq.prompt_len, seq.position + 1))
        inp = self._inputs(tokens, pos, pos + 1, write, temp)
        out, self._cache, self._sampler = self._decode(self._state, self._cache, self._sampler, inp)
        out = np.asarray(out)
        result = []
        for s in slots:
            seq = self._seqs[s]
            seq.position += 1
            seq.last_token = int(out[s])
            result.append(seq.last_token)
        return result

    def release(self, slot: int) -> None:
        self._seqs.pop(slot, None)

    # ---------------------------------------------------------------- high level
    def logits(self, ids: Sequence[int], slot: int = 0) -> np.ndarray:
        """[len(ids), V] float32 logits of a short input (computes all rows; research use)."""
        ids = self.encode_prompt(list(ids))
        if slot in self._seqs:
            raise ValueError(f"slot={slot} is in use")
        out = []
        for start, end in self.prefill_plan(len(ids)):
            inp = self._piece_inputs(ids, start, end, len(ids))
            logits, self._cache = self._prefill_all(self._state, self._cache, inp, jnp.int32(slot))
            out.append(np.asarray(logits[0, : end - start]))
        return np.concatenate(out, axis=0)

    def stream(self, prompt, params: SamplingParams | None = None, *, slot: int = 0,
               _result: dict | None = None) -> Iterator[str]:
        """Yield text deltas of one generation."""
        params = params or SamplingParams()
        ids = self.encode_prompt(prompt)
        t0 = time.perf_counter()
        seq = self.start(slot, ids, params)
        try:
            token = None
            while token is None:
                token = self.prefill_next(slot)
            ttft = time.perf_counter() - t0
            while True:
                delta, reason = seq.append(token)
                if delta:
                    yield delta
                if reason is not None:
                    break
                token = self.decode([slot])[0]
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
         dca: DCAConfig | None | bool = True, tensor_parallel: int = 1, verbose: bool = True,
         sparse: "bool | str | SparseConfig | Path" = "auto") -> Engine:
    """Load a converted checkpoint (None: the embedded default) into an Engine.

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
    mesh = make_mesh(tensor_parallel)

    def put(path_tuple, spec, array):
        return jax.device_put(np.asarray(array).astype(jnp.dtype(dtype)), sharding_for(spec.axes, mesh))

    _, _, params = load_checkpoint(path, put=put)
    tokenizer = None
    if (path / "tokenizer.json").exists():
        from zenjax.tokenizer import Tokenizer
        tokenizer = Tokenizer.from_dir(path)
    eos = meta.get("generation", {}).get("eos_token_id")
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    return Engine(cfg, params, ec, tokenizer=tokenizer, eos_token_ids=eos, mesh=mesh, verbose=verbose,
                  sparse=sparse_cfg)
