"""A paced engine double for in-process server tests (no JAX): the slot API of zenjax.engine.Engine, the
real embedded tokenizer, and a decode step that sleeps `step_s` so "endless" requests stay running until
cancelled without spinning a CPU core. Token t+1 follows t; the first token is the prompt length. Tests
never depend on the pace: they wait for events (bounded polling) and only the order matters.

`python tests/serve_doubles.py ARGS` runs `zenjax.serve.server.serve` on it (used by the signal tests).
"""
from __future__ import annotations

import sys
import threading
import time

from zenjax.config import EngineConfig, ModelConfig
from zenjax.serve.fake_engine import SlotQueries, _Seq  # noqa: F401  (shared with the simulation)


class PacedEngine(SlotQueries):
    def __init__(self, max_batch=2, max_model_len=100_000, prefill_chunk=64, step_s=0.002, tokenizer=True,
                 load_gate: threading.Event | None = None):
        self.max_batch = max_batch
        self.engine_config = EngineConfig(max_model_len=max_model_len, prefill_chunk=prefill_chunk,
                                          max_batch=max_batch)
        self.config = ModelConfig(vocab_size=1005, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=28,
                                  num_kv_heads=4, head_dim=2, rope_theta=1e4, rms_norm_eps=1e-6,
                                  tie_word_embeddings=True, max_position_embeddings=max_model_len)
        self.tokenizer = None
        if tokenizer:
            from zenjax.engine import DEFAULT_CHECKPOINT
            from zenjax.tokenizer import Tokenizer
            self.tokenizer = Tokenizer.from_dir(DEFAULT_CHECKPOINT)
        self.step_s = step_s
        self.load_gate = load_gate          # warmup() waits for it ("still loading")
        self.seqs: dict[int, _Seq] = {}
        self.started: list[list[int]] = []

    def start(self, slot, ids, params, reuse_min=0):
        self.started.append(list(ids))
        return self._start_seq(slot, ids, params, reuse_min)

    def prefill_next(self, slot, max_tokens=None):
        seq = self.seqs[slot]
        time.sleep(self.step_s)
        seq.prefilled = self.next_piece(slot, max_tokens)[1]
        return seq.prompt_len if seq.prefilled == seq.prompt_len else None

    def warmup(self):
        """The engine compiles its steps here; the double only waits for `load_gate` ("still loading")."""
        if self.load_gate is not None:
            self.load_gate.wait(120)
            self.load_gate = None

    def decode(self, slots):
        time.sleep(self.step_s)
        return [self.seqs[s].out[-1] + 1 for s in slots]

    decode_block = 4

    def decode_steps(self, slots, n):
        """Like the engine: up to n tokens per slot in one paced call, fewer where max_new_tokens ends it."""
        time.sleep(self.step_s)
        out = {}
        for s in slots:
            seq = self.seqs[s]
            left = seq.params.max_new_tokens - len(seq.out)
            out[s] = [seq.out[-1] + 1 + i for i in range(min(n, left))]
        return out

    def release(self, slot, keep=True):
        self._release_seq(slot, keep)


if __name__ == "__main__":
    from zenjax.serve.server import config_from_args, serve
    sys.exit(serve(config_from_args(sys.argv[1:]), engine=PacedEngine(tokenizer=False)))
