"""Host-side bookkeeping of one sequence in a slot: its prefill plan, how far it got, its output tokens
and its text stream (stop strings, stop ids, max_new_tokens). Plain Python; no JAX.

The device mirrors only what it needs to decode several steps without the host (runner.DecodeState:
last token, position, tokens left, stop-id mask); the host stays the authority on the text, so a stop
string found after a block of device steps ends the sequence there and the block's later tokens are
dropped (never appended, never emitted).
"""
from __future__ import annotations

from typing import Sequence

from zenjax.sampling import SamplingParams


def prefill_plan(prompt_len: int, chunk: int, dca_chunk_len: int | None) -> list[tuple[int, int]]:
    """Cut [0, prompt_len) into pieces of <= chunk tokens that never cross a DCA boundary (multiples
    of s = dca_chunk_len), so every prefill step sees queries of one DCA chunk.

    Example: chunk 8, s = 12, 30 tokens -> (0,8) (8,12) (12,20) (20,24) (24,30).
    """
    pieces, start = [], 0
    while start < prompt_len:
        end = min(start + chunk, prompt_len)
        if dca_chunk_len is not None:
            end = min(end, (start // dca_chunk_len + 1) * dca_chunk_len)
        pieces.append((start, end))
        start = end
    return pieces


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
    """Host-side state of one sequence in a slot.

    Fields the scheduler may read: prompt_len, prefilled, prefill_done, output_ids, finish_reason, text.
    Fields the engine keeps: plan, position (where the next decoded token's K/V goes), last_token.
    """

    def __init__(self, slot: int, prompt_ids: Sequence[int], params: SamplingParams, *,
                 plan: list[tuple[int, int]], max_new_tokens: int, stream):
        self.slot, self.prompt_ids, self.params = slot, list(prompt_ids), params
        self.prompt_len = len(self.prompt_ids)
        self.plan = plan
        self.prefilled = 0                 # prompt tokens already in the cache
        self.position = self.prompt_len   # where the next decoded token's K/V goes
        self.last_token: int | None = None
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

    def next_piece(self) -> tuple[int, int]:
        return next(p for p in self.plan if p[1] > self.prefilled)

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
