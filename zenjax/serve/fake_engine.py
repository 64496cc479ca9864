"""Scripted doubles of the engine's slot API (no JAX, no device) for the scheduler's tests and for
benchmarks/pacing_sim.py, which simulates the real Scheduler on a fake clock. They live in the package,
not in tests/, so the benchmark imports them as it imports the scheduler (no sys.path edits) and the
tests and the simulation drive the very same double.

SlotQueries: the engine's scheduler-facing queries over `self.seqs`. CostEngine: each step advances a
fake clock (Clock) by a scripted cost of its bucket and context, and is logged.
"""
from __future__ import annotations

from typing import Callable

from zenjax.config import EngineConfig
from zenjax.sequence import SlotView


class _Seq:
    def __init__(self, prompt_ids, params, reused=0):
        self.prompt_ids, self.params = list(prompt_ids), params
        self.prompt_len, self.prefilled, self.out, self.reused = len(prompt_ids), reused, [], reused

    def append(self, token):
        self.out.append(token)
        return f"<{token}>", ("length" if len(self.out) >= self.params.max_new_tokens else None)


class SlotQueries:
    """The engine's scheduler-facing queries over `self.seqs` (slot -> _Seq), shared by the doubles:
    slot_state, append_token, next_piece (pieces of <= prefill_chunk / max_tokens tokens, buckets =
    prefill_buckets), and prefix reuse of released slots (`held`: equal tokens only, no DCA)."""

    prefill_buckets = (4,)
    fuses_decode = False          # no prefill_and_decode unless a double defines it (CostEngine: fused_s)

    def slot_state(self, slot):
        q = self.seqs[slot]
        done = q.prefilled >= q.prompt_len
        return SlotView(prompt_len=q.prompt_len, prefilled=q.prefilled, reused=q.reused,
                        decoding=done and bool(q.out), cached=q.prefilled + max(0, len(q.out) - 1))

    def append_token(self, slot, token):
        return self.seqs[slot].append(token)

    def next_piece(self, slot, max_tokens=None):
        q = self.seqs[slot]
        limit = self.engine_config.prefill_chunk if max_tokens is None else min(max_tokens,
                                                                               self.engine_config.prefill_chunk)
        end = min(q.prefilled + limit, q.prompt_len)
        return q.prefilled, end, next(b for b in sorted(self.prefill_buckets) + [end - q.prefilled]
                                      if b >= end - q.prefilled)

    def reusable(self, slot, ids, min_tokens):
        held = getattr(self, "held", {}).get(slot)
        if held is None or slot in self.seqs:
            return 0
        n = 0
        while n < min(len(held), len(ids) - 1) and held[n] == ids[n]:
            n += 1
        return n if n >= min_tokens else 0

    def _start_seq(self, slot, ids, params, reuse_min):
        reused = self.reusable(slot, ids, reuse_min) if reuse_min else 0
        self.seqs[slot] = _Seq(ids, params, reused)
        return self.seqs[slot]

    def _release_seq(self, slot, keep):
        q = self.seqs.pop(slot, None)
        if not hasattr(self, "held"):
            self.held = {}
        self.held.pop(slot, None)
        if q is not None and keep:
            self.held[slot] = q.prompt_ids[: q.prefilled] + q.out[:-1]


class Clock:
    """A fake monotonic clock: CostEngine advances `t` by each step's scripted seconds."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class CostEngine(SlotQueries):
    """Slot API double: each call advances `clock` by its scripted cost (seconds); logs (kind, slot, start,
    end, bucket, clock after) for prefill pieces and (kind, slots, n, clock after) for decode calls.

    prefill_s(bucket, end): a piece padded to `bucket` rows ending at position `end`;
    decode_s(n, cached): one call of n steps over slots caching `cached` tokens in all;
    fused_s(bucket, end, cached): a piece fused with one decode step (prefill_and_decode, logged as
    ("fused", slot, start, end, bucket, decode slots, clock after)); None: the double cannot fuse."""

    def __init__(self, clock: Clock, prefill_s: Callable[[int, int], float], decode_s: Callable[[int, int], float],
                 *, buckets=(16, 64, 256), prefill_chunk=256, max_batch=2, decode_block=16,
                 max_model_len=100_000, fused_s: Callable[[int, int, int], float] | None = None):
        self.max_batch, self.clock, self.decode_block = max_batch, clock, decode_block
        self.prefill_s, self.decode_s, self.fused_s = prefill_s, decode_s, fused_s
        self.fuses_decode = fused_s is not None
        self.prefill_buckets = tuple(buckets)
        self.engine_config = EngineConfig(max_model_len=max_model_len, prefill_chunk=prefill_chunk,
                                          max_batch=max_batch)
        self.seqs, self.log = {}, []

    def start(self, slot, ids, params, reuse_min=0):
        return self._start_seq(slot, ids, params, reuse_min)

    def prefill_next(self, slot, max_tokens=None):
        q = self.seqs[slot]
        start, end, bucket = self.next_piece(slot, max_tokens)
        self.clock.t += self.prefill_s(bucket, end)
        q.prefilled = end
        self.log.append(("prefill", slot, start, end, bucket, self.clock.t))
        return q.prompt_len if end == q.prompt_len else None

    def decode_steps(self, slots, n):
        cached = sum(self.slot_state(s).cached for s in slots)
        self.clock.t += self.decode_s(n, cached)
        self.log.append(("decode", tuple(slots), n, self.clock.t))
        return self._tokens(slots, n)

    def prefill_and_decode(self, slot, decode_slots, max_tokens=None):
        q = self.seqs[slot]
        start, end, bucket = self.next_piece(slot, max_tokens)
        self.clock.t += self.fused_s(bucket, end, sum(self.slot_state(s).cached for s in decode_slots))
        q.prefilled = end
        self.log.append(("fused", slot, start, end, bucket, tuple(decode_slots), self.clock.t))
        return (q.prompt_len if end == q.prompt_len else None), self._tokens(decode_slots, 1)

    def _tokens(self, slots, n):
        out = {}
        for s in slots:
            q = self.seqs[s]
            out[s] = [q.out[-1] + 1 + i for i in range(min(n, q.params.max_new_tokens - len(q.out)))]
        return out

    def release(self, slot, keep=True):
        self._release_seq(slot, keep)
