"""Host-side bookkeeping of one sequence in a slot: how far its prefill got, its output tokens and its
text stream (stop strings, stop ids, max_new_tokens); what a released slot's cache still holds (for
prefix reuse) and the rule deciding how much of it a new prompt may reuse. Plain Python + numpy; no JAX.

The device mirrors only what it needs to decode several steps without the host (runner.DecodeState:
last token, position, tokens left, stop-id mask); the host stays the authority on the text, so a stop
string found after a block of device steps ends the sequence there and the block's later tokens are
dropped (never appended, never emitted).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import numpy as np

from zenjax.sampling import SamplingParams


def piece_end(start: int, prompt_len: int, chunk: int, dca_chunk_len: int | None) -> int:
    """End of the prefill piece that starts at `start`: <= chunk tokens, never past the prompt, never
    across a DCA boundary (a multiple of s = dca_chunk_len)."""
    end = min(start + chunk, prompt_len)
    if dca_chunk_len is not None:
        end = min(end, (start // dca_chunk_len + 1) * dca_chunk_len)
    return end


def prefill_plan(prompt_len: int, chunk: int, dca_chunk_len: int | None, start: int = 0) -> list[tuple[int, int]]:
    """Cut [start, prompt_len) into pieces of <= chunk tokens that never cross a DCA boundary (multiples
    of s = dca_chunk_len), so every prefill step sees queries of one DCA chunk.

    Example: chunk 8, s = 12, 30 tokens -> (0,8) (8,12) (12,20) (20,24) (24,30).
    """
    pieces = []
    while start < prompt_len:
        end = piece_end(start, prompt_len, chunk, dca_chunk_len)
        pieces.append((start, end))
        start = end
    return pieces


@dataclasses.dataclass(frozen=True)
class SlotView:
    """What the scheduler may know about a slot's sequence (Engine.slot_state): a snapshot, not live.

    prompt_len  prompt tokens;  prefilled  prompt tokens in the cache (reused ones included);
    reused      prompt tokens taken from the slot's previous sequence (prefix reuse), not prefilled;
    decoding    prefill done, first token sampled, not finished;  cached  tokens in the slot's cache;
    sparse      its pieces run the sparse prefill step (another cost per piece than dense ones)."""
    prompt_len: int
    prefilled: int
    reused: int
    decoding: bool
    cached: int
    sparse: bool = False


@dataclasses.dataclass(frozen=True)
class HeldPrefix:
    """What a released slot's cache row still holds: K/V of `ids` at positions 0..len(ids)-1, written by
    a sequence whose prompt had `prompt_len` tokens (its DCA temperature, see `reusable_prefix`), prefilled
    sparse or dense. ids may be a list (release stays cheap); `array` converts it once, when needed."""
    ids: Sequence[int]
    prompt_len: int
    sparse: bool

    @functools.cached_property
    def array(self) -> np.ndarray:
        return np.asarray(self.ids, np.int32)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two int arrays."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


def reusable_prefix(held: HeldPrefix, ids: np.ndarray, applied_temps: np.ndarray, *, sparse: bool,
                    min_tokens: int) -> int:
    """How many leading tokens of the new prompt `ids` may take their K/V from `held` instead of being
    prefilled (0 if fewer than min_tokens), so that the result equals a cold prefill up to rounding.

    The rule, and why it is exact:
      * tokens must be equal (position j's K/V depends on tokens 0..j only, and their positions are
        absolute: DCA's key and query positions are functions of j and p alone, spec 2.2);
      * at most len(ids) - 1: the last prompt token is always prefilled (its logits give the first token);
      * the DCA temperature must be the one a cold run would use. The model multiplies q and k by m(L)
        (spec 2.6), and through attention m shapes every later layer's K/V, so a cache written with
        another m is not a rescaling away from the cold one. A cold prefill of the new prompt uses
        m(len(ids)) for every token; the held token at position j was written with m(max(P, j + 1))
        (P = held.prompt_len: prefill uses m(P), decode m(max(P, pos + 1))). The model applies m cast
        to its compute dtype, so the cast values are compared (`applied_temps[L]` = m(L) as applied):
        below original_max_position_embeddings m = 1 everywhere and any prefix qualifies; above it
        prompts of different lengths usually differ in float32, but share a bfloat16 m over ~8% ranges
        of L (bf16 steps of 2^-7 in m = 0.1 ln(L / L0) + 1), e.g. a 1M document with different questions;
      * the prefix must have been prefilled the way a cold run would prefill it (sparse or dense).
    Example: held 300 tokens of prompt_len 300 (m = 1), new prompt = those 300 + 50 more, all below L0:
    reuse 300. The same with the new prompt past L0 (m > 1): reuse 0."""
    if held.sparse != sparse or min_tokens <= 0:
        return 0
    r = min(common_prefix(held.array, ids), len(ids) - 1)
    if r < min_tokens:
        return 0
    target = applied_temps[len(ids)]
    if applied_temps[held.prompt_len] != target:
        return 0
    # positions j in [P, r) were written by decode with m(j + 1): non-decreasing in j, so cut at the first
    # position whose m differs
    P = held.prompt_len
    if r > P:
        later = applied_temps[P + 1: r + 1]
        bad = np.flatnonzero(later != target)
        if bad.size:
            r = P + int(bad[0])
    return r if r >= min_tokens else 0


def stop_ids_for(params: SamplingParams, eos_token_ids: Sequence[int]) -> set[int]:
    """The token ids that end a sequence: the request's stop ids, plus EOS unless ignore_eos."""
    return set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))


class IdStream:
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


def text_stream(tokenizer, params: SamplingParams, stop_ids: set[int], max_new_tokens: int):
    if tokenizer is None:
        return IdStream(stop_ids, max_new_tokens)
    from zenjax.textstream import TextStream
    return TextStream(tokenizer, stop=params.stop, stop_token_ids=stop_ids, max_new_tokens=max_new_tokens)


class SequenceState:
    """Host-side state of one sequence in a slot, kept by the engine (the scheduler sees a SlotView).

    position: where the next decoded token's K/V goes; fed: the tokens the device fed back (first token
    included), so the K/V at [prompt_len, position) belong to fed[:position - prompt_len] (a block's
    tokens past a host-side stop string are in the cache but not in output_ids)."""

    def __init__(self, slot: int, prompt_ids: Sequence[int], params: SamplingParams, *,
                 chunk: int, dca_chunk_len: int | None, max_new_tokens: int, stream, reused: int = 0,
                 sparse: bool = False):
        self.slot, self.prompt_ids, self.params = slot, list(prompt_ids), params
        self.prompt_len = len(self.prompt_ids)
        self.chunk, self.dca_chunk_len = chunk, dca_chunk_len
        self.reused = reused               # prompt tokens whose K/V the slot already held
        self.sparse = sparse               # prefilled with the sparse step
        self.prefilled = reused            # prompt tokens already in the cache
        self.position = self.prompt_len   # where the next decoded token's K/V goes
        self.last_token: int | None = None
        self.fed: list[int] = []
        self.reusable = True               # False: the cache row does not hold what the fields say
        self.output_ids: list[int] = []
        self.finish_reason: str | None = None
        self.max_new_tokens = max_new_tokens
        self._stream = stream

    @property
    def prefill_done(self) -> bool:
        return self.prefilled >= self.prompt_len

    @property
    def decoding(self) -> bool:
        """Prefill done, first token sampled, not finished: the slot takes part in decode calls."""
        return self.last_token is not None and self.finish_reason is None

    def next_piece(self, max_tokens: int | None = None) -> tuple[int, int]:
        """[start, end) of the next prefill piece: <= min(chunk, max_tokens) tokens, within a DCA chunk."""
        limit = self.chunk if max_tokens is None else max(1, min(self.chunk, int(max_tokens)))
        return self.prefilled, piece_end(self.prefilled, self.prompt_len, limit, self.dca_chunk_len)

    def view(self) -> SlotView:
        return SlotView(prompt_len=self.prompt_len, prefilled=self.prefilled, reused=self.reused,
                        decoding=self.decoding, cached=self.cached, sparse=self.sparse)

    @property
    def cached(self) -> int:
        """Tokens whose K/V are in the slot's cache row (positions 0..cached-1)."""
        return self.position if self.prefill_done else self.prefilled

    def held(self) -> HeldPrefix:
        """What the cache row holds once this sequence is released (prefix reuse)."""
        ids = self.prompt_ids[: self.prefilled] + self.fed[: self.position - self.prompt_len]
        return HeldPrefix(ids, self.prompt_len, self.sparse)

    def append(self, token: int) -> tuple[str, str | None]:
        """Record a generated token; returns (text delta, finish reason or None)."""
        if self.finish_reason is not None:
            raise ValueError(f"slot {self.slot}: sequence already finished ({self.finish_reason})")
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
