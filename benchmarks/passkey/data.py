"""Training batches of passkey prompts for benchmarks/passkey/train.py.

The prompts come from zenjax.eval.passkey.make_prompt (the generator the evaluation uses, so training and
evaluation see the same distribution at <= 2K tokens). One training sequence is

    prompt ids (instruction, haystack, key sentence at a random depth, question)  +  " 71432."  +  EOS

right-padded with EOS to the batch's bucket length T. Two weight masks select what the loss sees:
`answer` (the 7 answer tokens and EOS, each predicted from the token before it) and `other` (every other
real token: the haystack is cheap to learn, and the key's second occurrence "71432 is the pass key" is a
short-range copy that helps the retrieval heads form).

Tokenizer: the repository's small Qwen-style byte-level BPE (tests/fixtures/tokenizer, built by
scripts/make_tokenizer_fixtures.py with `tokenizers`): digits are single tokens (Qwen2's split regex),
<|endoftext|> / <|im_start|> / <|im_end|> are its special tokens and it carries Qwen2.5's chat template,
so the trained model drops in as zenjax's embedded default.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
from pathlib import Path

import numpy as np

from zenjax.eval.passkey import KEY_SENTENCE, answer_ids, make_prompt
from zenjax.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER_DIR = ROOT / "tests" / "fixtures" / "tokenizer"
MIN_PROMPT = 120          # the instruction, key sentence and question take ~102 tokens of this tokenizer


@dataclasses.dataclass
class Batch:
    tokens: np.ndarray     # [B, T] int32 inputs
    targets: np.ndarray    # [B, T] int32 next tokens
    answer: np.ndarray     # [B, T] float32 1 where the target is an answer token (digits, '.', EOS)
    other: np.ndarray      # [B, T] float32 1 where the target is any other real token
    digits: np.ndarray     # [B, 5] int32 positions t whose target is one of the 5 key digits


def load_tokenizer(path: Path = TOKENIZER_DIR) -> Tokenizer:
    return Tokenizer.from_dir(path)


def check_concatenation(tok: Tokenizer, n: int = 20) -> None:
    """make_prompt(exact=False) concatenates per-piece ids; prove it equals encoding the whole text."""
    cache: dict = {}
    for i in range(n):
        length = 130 + 97 * i
        a = make_prompt(tok, length, (i % 7) / 6, 10_000 + i, _cache=cache)
        b = make_prompt(tok, length, (i % 7) / 6, 10_000 + i, exact=False, _cache=cache)
        if a.ids != b.ids:
            raise RuntimeError(f"tokenizer merges across prompt pieces (length {length}); use exact=True")


def make_batch(tok: Tokenizer, rng: np.random.Generator, batch: int, T: int, min_len: int,
               cache: dict) -> Batch:
    """`batch` sequences of total length uniform in [min_len, T] (answer included), padded to T."""
    eos = tok.token_to_id("<|endoftext|>")
    tokens = np.full((batch, T + 1), eos, np.int32)
    answer = np.zeros((batch, T), np.float32)
    other = np.zeros((batch, T), np.float32)
    digits = np.zeros((batch, 5), np.int32)
    # token offsets inside " The pass key is 71432. Remember it. 71432 is the pass key." (any key:
    # digits are single tokens): where the second occurrence's first digit sits, counted from the end
    probe = tok.encode(" " + KEY_SENTENCE.format(key="12345"))
    key_len = len(probe)
    second_offset = key_len - [i for i, t in enumerate(probe) if t == probe[probe.index(tok.encode("1")[0])]][1]
    for b in range(batch):
        total = int(rng.integers(max(min_len, MIN_PROMPT + 8), T + 1))
        depth = float(rng.random())
        p = make_prompt(tok, total - 8, depth, int(rng.integers(2**62)), exact=False, _cache=cache)
        ans = answer_ids(tok, p.key) + [eos]           # " ", 5 digits, ".", EOS = 8 tokens
        seq = p.ids + ans
        n = len(seq)
        tokens[b, :n] = seq
        # target at t is tokens[t + 1]: the answer's targets sit at t = len(prompt) - 1 ... n - 2
        start = len(p.ids) - 1
        answer[b, start:n - 1] = 1.0
        other[b, :start] = 1.0
        # the key's second occurrence ("71432. Remember it. 71432 is ...") is a short-range copy of the
        # first: weighting its digits like the answer gives the copy circuit a strong early gradient
        second = p.key_token_start + key_len - second_offset
        answer[b, second - 1:second + 4] = 1.0
        other[b, second - 1:second + 4] = 0.0
        digits[b] = np.arange(start + 1, start + 6)    # targets of these rows are the 5 digits
    return Batch(tokens[:, :-1], tokens[:, 1:], answer, other, digits)


class Prefetcher:
    """Builds batches on a background thread (tokenization releases the GIL; the training loop mostly
    waits on the device) so that data never stalls a GPU step. `get(T)` returns a batch of bucket T."""

    def __init__(self, tok: Tokenizer, seed: int, tokens_per_batch: int, buckets: list[int], depth: int = 6):
        self.tok, self.tokens_per_batch, self.buckets = tok, tokens_per_batch, buckets
        self.rng = np.random.default_rng(seed)
        self.cache: dict = {}
        self.queues = {T: queue.Queue(maxsize=depth) for T in buckets}
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def batch_size(self, T: int) -> int:
        return max(1, self.tokens_per_batch // T)

    def _run(self):
        while not self._stop:
            for T in self.buckets:
                q = self.queues[T]
                if not q.full():
                    q.put(make_batch(self.tok, self.rng, self.batch_size(T), T, T // 2, self.cache))
            if all(q.full() for q in self.queues.values()):
                threading.Event().wait(0.002)

    def get(self, T: int) -> Batch:
        return self.queues[T].get()

    def close(self):
        self._stop = True
