"""Sampling parameters (host side) and the on-device sampler (pure function, jitted inside decode).

Order of logits processing follows Hugging Face `generate`: repetition penalty, then temperature,
top-k, top-p, min-p; greedy when temperature == 0.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -1e30


class SamplingError(ValueError):
    """A sampling field has a value we refuse; the message names the field."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0          # 0 -> greedy
    top_k: int = 0                    # 0 -> off
    top_p: float = 1.0                # 1 -> off
    min_p: float = 0.0                # 0 -> off
    repetition_penalty: float = 1.0   # 1 -> off (HF semantics: divide positive logits, multiply negative)
    seed: int | None = None
    stop: tuple[str, ...] = ()        # stop strings (not included in the output)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        # normalise lists given by callers into tuples so the dataclass stays hashable
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise SamplingError(f"max_new_tokens={self.max_new_tokens!r} must be an integer >= 1")
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise SamplingError(f"temperature={self.temperature!r} must be finite and >= 0")
        if self.top_k < 0:
            raise SamplingError(f"top_k={self.top_k!r} must be >= 0 (0 disables it)")
        if not (0.0 < self.top_p <= 1.0):
            raise SamplingError(f"top_p={self.top_p!r} must be in (0, 1]")
        if not (0.0 <= self.min_p <= 1.0):
            raise SamplingError(f"min_p={self.min_p!r} must be in [0, 1]")
        if not np.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise SamplingError(f"repetition_penalty={self.repetition_penalty!r} must be > 0")
        if any(not s for s in self.stop):
            raise SamplingError("stop strings must not be empty")
        if any(t < 0 for t in self.stop_token_ids):
            raise SamplingError(f"stop_token_ids={self.stop_token_ids!r} must be >= 0")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplerState:
    """Per-slot sampling state, kept on device. B = decode slots, V = vocab."""

    temperature: jax.Array   # [B] f32
    top_k: jax.Array         # [B] i32 (0 = off)
    top_p: jax.Array         # [B] f32
    min_p: jax.Array         # [B] f32
    rep_penalty: jax.Array   # [B] f32
    key: jax.Array           # [B, 2] u32 raw PRNG keys
    seen: jax.Array          # [B, V] bool: token occurred in prompt or output (repetition penalty)

    @staticmethod
    def empty(batch: int, vocab: int) -> "SamplerState":
        return SamplerState(
            temperature=jnp.zeros((batch,), jnp.float32), top_k=jnp.zeros((batch,), jnp.int32),
            top_p=jnp.ones((batch,), jnp.float32), min_p=jnp.zeros((batch,), jnp.float32),
            rep_penalty=jnp.ones((batch,), jnp.float32), key=jnp.zeros((batch, 2), jnp.uint32),
            seen=jnp.zeros((batch, vocab), jnp.bool_))


def slot_values(params: SamplingParams, prompt_ids: Sequence[int], vocab: int, default_seed: int):
    """Host-side values for one slot (numpy), written into SamplerState by the engine."""
    seed = default_seed if params.seed is None else params.seed
    seen = np.zeros((vocab,), np.bool_)
    ids = np.asarray(prompt_ids, np.int64)
    seen[ids[(ids >= 0) & (ids < vocab)]] = True
    key = np.asarray(jax.random.key_data(jax.random.key(seed & 0xFFFFFFFF)), np.uint32)
    return dict(temperature=np.float32(params.temperature), top_k=np.int32(params.top_k),
                top_p=np.float32(params.top_p), min_p=np.float32(params.min_p),
                rep_penalty=np.float32(params.repetition_penalty), key=key, seen=seen)


def apply_repetition_penalty(logits, seen, penalty):
    """HF RepetitionPenaltyLogitsProcessor: seen tokens' logits divided (if > 0) or multiplied by p."""
    p = penalty[:, None]
    penalised = jnp.where(logits > 0, logits / p, logits * p)
    return jnp.where(seen, penalised, logits)


def filter_logits(logits, temperature, top_k, top_p, min_p):
    """Temperature, top-k, top-p, min-p on [B, V] float32 logits (HF warper semantics)."""
    B, V = logits.shape
    x = logits / jnp.maximum(temperature, 1e-6)[:, None]
    sorted_x = jnp.sort(x, axis=-1)[:, ::-1]                                   # descending
    # top-k: keep logits >= the k-th largest (ties kept, as HF does)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    kth = jnp.take_along_axis(sorted_x, (k - 1)[:, None], axis=-1)
    x = jnp.where(x < kth, NEG_INF, x)
    sorted_x = jnp.where(jnp.arange(V)[None, :] < k[:, None], sorted_x, NEG_INF)
    # top-p: HF removes tokens whose ascending cumulative prob <= 1 - top_p (keeps at least one)
    probs_sorted = jax.nn.softmax(sorted_x, axis=-1)
    cum_before = jnp.cumsum(probs_sorted, axis=-1) - probs_sorted             # mass strictly above
    keep_sorted = (cum_before < top_p[:, None]) | (top_p[:, None] >= 1.0) | (jnp.arange(V)[None, :] == 0)
    n_keep = jnp.sum(keep_sorted, axis=-1)
    threshold = jnp.take_along_axis(sorted_x, (n_keep - 1)[:, None], axis=-1)
    x = jnp.where(x < threshold, NEG_INF, x)
    # min-p: drop tokens with prob < min_p * max prob
    probs = jax.nn.softmax(x, axis=-1)
    pmax = jnp.max(probs, axis=-1, keepdims=True)
    x = jnp.where((probs < min_p[:, None] * pmax) & (min_p[:, None] > 0), NEG_INF, x)
    return x


def sample(logits, state: SamplerState):
    """[B, V] logits -> ([B] int32 tokens, new state). Greedy rows take the argmax of penalised logits."""
    logits = logits.astype(jnp.float32)
    logits = apply_repetition_penalty(logits, state.seen, state.rep_penalty)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def stochastic(_):
        keys = jax.vmap(jax.random.wrap_key_data)(state.key)
        split = jax.vmap(lambda k: jax.random.split(k, 2))(keys)               # [B, 2]
        x = filter_logits(logits, state.temperature, state.top_k, state.top_p, state.min_p)
        drawn = jax.vmap(lambda k, l: jax.random.categorical(k, l))(split[:, 1], x).astype(jnp.int32)
        return jnp.where(state.temperature > 0, drawn, greedy), jax.vmap(jax.random.key_data)(split[:, 0])

    tokens, new_key = jax.lax.cond(jnp.any(state.temperature > 0), stochastic,
                                   lambda _: (greedy, state.key), None)
    seen = state.seen.at[jnp.arange(logits.shape[0]), tokens].set(True)
    return tokens, dataclasses.replace(state, key=new_key, seen=seen)
