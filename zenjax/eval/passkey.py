"""Passkey retrieval: the prompt generator, the evaluation loop and its table / JSON / heatmap.

The task (Mohtashami & Jaggi's passkey test, as in the Qwen2.5-1M / DCA blog figures): an instruction,
a long repetitive haystack with a little variety, one sentence

    "The pass key is 71432. Remember it. 71432 is the pass key."

inserted at a given depth of the haystack, then the question "What is the pass key? The pass key is".
A model passes a prompt when the first number it generates is exactly the 5-digit key.

Walk of `make_prompt(tokenizer, length, depth, seed)`:
1. a seeded numpy Generator draws the key and then filler sentences one by one;
2. every piece is counted in tokens OF THE GIVEN TOKENIZER (" " + sentence, cached), and sentences are
   added while the whole prompt (instruction + haystack + key sentence + question) fits in `length`;
3. the key sentence goes at the sentence boundary whose token offset in the haystack is closest to
   depth * haystack tokens (depth 0: right after the instruction, 1: right before the question);
4. the assembled text is encoded once more and, should a tokenizer merge across pieces so that the
   count exceeds `length`, filler sentences are dropped until it fits. The result is deterministic in
   (tokenizer, length, depth, seed) and has length - (one sentence) < tokens <= length.

Worked example with the demo tokenizer, length=200, depth=0.5: 58 instruction tokens, 31 key-sentence
tokens and 13 question tokens leave 98 tokens of haystack: ~10 sentences, the key after the 5th or so.

`evaluate(backend, lengths, depths, samples)` runs every (length, depth, sample) cell through a backend
(`LocalBackend`: zenjax.load of a checkpoint, one engine per length; `ServerBackend`: a running zenjax
gRPC server) and returns a JSON-ready dict; `format_table` and `save_heatmap` render it.
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there.")
KEY_SENTENCE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
# The blog's five sentences first (half of all draws), then some variety. No digits anywhere: the only
# numbers in a prompt are the key's.
BLOG_FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
               "There and back again.")
EXTRA_FILLER = (
    "The river is quiet in the morning.", "A golden window in the kitchen.", "The mountain is tall.",
    "Winter is cold and summer is warm.", "The garden is full of flowers.", "Birds sing in the spring.",
    "The night is dark and the stars are bright.", "Leaves turn orange in autumn.", "The sea is calm.",
    "A silver moon rises slowly.", "The coffee is hot.", "Clouds drift over the city.",
    "The road is long and the evening is happy.", "Rain falls on the house.", "The wind is soft.")
ANSWER_RESERVE = 16      # tokens of an evaluation length left for the answer (prompt = length - 16)
MAX_NEW_TOKENS = 8       # " 71432." plus EOS fits; the first number is what counts


@dataclasses.dataclass(frozen=True)
class PasskeyPrompt:
    text: str
    ids: list[int]
    key: str                 # 5 digits
    depth: float             # requested depth in [0, 1]
    key_token_start: int     # token index where the key sentence starts
    haystack_tokens: int     # filler tokens (excluding instruction, key sentence, question)


def as_encoder(tokenizer) -> Callable[[str], list[int]]:
    """A text -> ids function for a zenjax Tokenizer, a `tokenizers.Tokenizer`, a transformers tokenizer
    or a plain callable. Never adds special tokens: the prompt is raw text."""
    if callable(tokenizer) and not hasattr(tokenizer, "encode"):
        return lambda s: list(tokenizer(s))

    def encode(text: str) -> list[int]:
        try:
            out = tokenizer.encode(text, add_special_tokens=False)
        except TypeError:
            out = tokenizer.encode(text)
        return list(out.ids) if hasattr(out, "ids") else list(out)
    return encode


def _filler_stream(rng: np.random.Generator, block: int = 64):
    """Endless filler sentences: half from the blog's five, half from the extra ones (drawn in blocks:
    one numpy call per 64 sentences instead of two per sentence)."""
    while True:
        blog = rng.random(block) < 0.5
        pick = rng.random(block)
        for b, u in zip(blog, pick):
            pool = BLOG_FILLER if b else EXTRA_FILLER
            yield pool[int(u * len(pool))]


def make_prompt(tokenizer, length: int, depth: float, seed: int, *, exact: bool = True,
                _cache: dict | None = None) -> PasskeyPrompt:
    """The passkey prompt of at most `length` tokens of `tokenizer` with the key at `depth` (0..1).

    exact=False (training): the ids are the concatenation of the pieces' cached ids instead of one encode
    of the whole text - identical for tokenizers that never merge across a space before a word (Qwen2's
    split regex puts the space in front of the next word); benchmarks/passkey/data.py checks it.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must be in [0, 1]")
    enc = as_encoder(tokenizer)
    cache = _cache if _cache is not None else {}

    def piece(text: str) -> list[int]:
        if text not in cache:
            cache[text] = enc(text)
        return cache[text]

    rng = np.random.default_rng(seed)
    key = str(int(rng.integers(10000, 100000)))
    key_sentence = KEY_SENTENCE.format(key=key)
    key_ids = enc(" " + key_sentence)
    fixed = len(piece(INSTRUCTION)) + len(key_ids) + len(piece(" " + QUESTION))
    budget = length - fixed
    if budget < 0:
        raise ValueError(f"length={length} tokens is too short for a passkey prompt: the instruction, key "
                         f"sentence and question alone take {fixed} tokens of this tokenizer")
    sentences, counts, total = [], [], 0
    for s in _filler_stream(rng):
        c = len(piece(" " + s))
        if total + c > budget:
            break
        sentences.append(s)
        counts.append(c)
        total += c
    while True:
        offsets = np.cumsum([0] + counts)
        at = int(np.argmin(np.abs(offsets - depth * total)))
        pieces = [INSTRUCTION] + sentences[:at] + [key_sentence] + sentences[at:] + [QUESTION]
        text = " ".join(pieces)
        if not exact:
            ids = list(piece(INSTRUCTION))
            for s in sentences[:at]:
                ids += piece(" " + s)
            key_start = len(ids)
            ids += key_ids
            for s in sentences[at:]:
                ids += piece(" " + s)
            ids += piece(" " + QUESTION)
            break
        ids = enc(text)
        if len(ids) <= length or not sentences:
            key_start = len(enc(" ".join([INSTRUCTION] + sentences[:at])))
            break
        sentences.pop()          # a tokenizer merged across pieces: drop filler until it fits
        total -= counts.pop()
    if len(ids) > length:
        raise ValueError(f"length={length}: the prompt without filler is already {len(ids)} tokens")
    return PasskeyPrompt(text=text, ids=ids, key=key, depth=float(depth), key_token_start=key_start,
                         haystack_tokens=int(total))


def answer_ids(tokenizer, key: str) -> list[int]:
    """The tokens of the expected completion " 71432." (training target; EOS is the caller's)."""
    return as_encoder(tokenizer)(" " + key + ".")


def is_correct(key: str, output: str) -> bool:
    """Exact match of the first number in the output with the 5-digit key."""
    m = re.search(r"\d+", output)
    return m is not None and m.group(0) == key


def parse_length(s: str) -> int:
    """'2k' -> 2048, '128K' -> 131072, '3000' -> 3000."""
    s = s.strip().lower()
    m = re.fullmatch(r"(\d+)(k?)", s)
    if not m or int(m.group(1)) <= 0:
        raise ValueError(f"length {s!r}: expected a positive integer, optionally with k (x1024), e.g. 2k")
    return int(m.group(1)) * (1024 if m.group(2) else 1)


def format_length(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def depth_grid(n: int) -> list[float]:
    """n evenly spaced depths from 0 to 1 (n=1: the middle)."""
    if n < 1:
        raise ValueError(f"--depths {n}: need at least 1")
    return [0.5] if n == 1 else [round(i / (n - 1), 4) for i in range(n)]


def cell_seed(seed: int, length: int, depth_index: int, sample: int) -> int:
    return int(np.random.SeedSequence([seed, length, depth_index, sample]).generate_state(1)[0])


# ------------------------------------------------------------------------------------------ backends

class LocalBackend:
    """zenjax.load of a checkpoint; one engine per evaluation length (max_model_len = length)."""

    def __init__(self, checkpoint=None, *, dca=True, attention: str = "reference",
                 prefill_chunk: int = 2048, dtype: str = "float32", sparse="auto"):
        """dca: True (the checkpoint's config), False (off) or a DCAConfig (override), as zenjax.load.
        prefill_chunk is the engine's: it pads each piece only to the smallest prefill bucket that holds
        it (never past the DCA chunk length), so no cap is needed here."""
        from zenjax.checkpoint import read_config
        from zenjax.config import with_dca
        from zenjax.tokenizer import Tokenizer
        self.checkpoint, self.dca, self.attention = checkpoint, dca, attention
        self.prefill_chunk, self.dtype, self.sparse = prefill_chunk, dtype, sparse
        path = Path(checkpoint) if checkpoint is not None else None
        if path is None:
            from zenjax.engine import DEFAULT_CHECKPOINT
            path = DEFAULT_CHECKPOINT
        self.cfg, _ = read_config(path)
        self.cfg = with_dca(self.cfg, dca)
        self.tokenizer = Tokenizer.from_dir(path)
        self._engine, self._engine_len = None, None

    def describe(self) -> dict:
        dca = self.cfg.dca.to_hf() if self.cfg.dca else None
        return {"backend": "local", "checkpoint": str(self.checkpoint or "embedded-default"), "dca": dca,
                "attention": self.attention, "prefill_chunk": self.prefill_chunk, "dtype": self.dtype,
                "sparse": {True: "on", False: "off"}.get(self.sparse, str(self.sparse))}

    def answer(self, prompt: PasskeyPrompt, length: int) -> str:
        import zenjax
        if self._engine_len != length:
            self._engine = None          # free the previous cache before allocating the next
            self._engine = zenjax.load(self.checkpoint, max_model_len=length,
                                       prefill_chunk=self.prefill_chunk, attention=self.attention,
                                       dtype=self.dtype, dca=self.dca, sparse=self.sparse, verbose=False)
            self._engine_len = length
        out = self._engine.generate(prompt.ids, zenjax.SamplingParams(max_new_tokens=MAX_NEW_TOKENS))
        return out.text


class ServerBackend:
    """A running zenjax gRPC server (zenjax.client): prompts are tokenized by the server's Tokenize RPC
    and sent as token ids; decoding is greedy. DCA is whatever the server was started with."""

    def __init__(self, target: str, timeout: float = 3600.0):
        from zenjax.client import Client
        self.target, self.timeout = target, timeout
        self.client = Client(target)
        self.client.wait_ready(timeout=120)
        self.info = self.client.model_info()
        self.tokenizer = lambda text: self.client.tokenize(text)

    def describe(self) -> dict:
        dca = None
        if self.info.HasField("dca"):
            dca = {"chunk_size": self.info.dca.chunk_size, "local_size": self.info.dca.local_size,
                   "original_max_position_embeddings": self.info.dca.original_max_position_embeddings}
        return {"backend": "server", "server": self.target, "model": self.info.model, "dca": dca,
                "max_model_len": self.info.max_model_len}

    def answer(self, prompt: PasskeyPrompt, length: int) -> str:
        if length > self.info.max_model_len:
            raise ValueError(f"length {length} exceeds the server's max_model_len={self.info.max_model_len}")
        out = self.client.complete(prompt.ids, timeout=self.timeout, max_new_tokens=MAX_NEW_TOKENS,
                                   temperature=0.0)
        return out.text


# ------------------------------------------------------------------------------------------ the loop

class _Progress:
    """A one-line bar on stderr, only when stderr is a terminal."""

    def __init__(self, total: int, enabled: bool | None = None):
        self.total, self.done, self.t0 = total, 0, time.time()
        self.enabled = sys.stderr.isatty() if enabled is None else enabled

    def step(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        width = 30
        fill = int(width * self.done / max(self.total, 1))
        sys.stderr.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} {label} "
                         f"{time.time() - self.t0:.0f}s ")
        sys.stderr.flush()
        if self.done == self.total:
            sys.stderr.write("\n")


def evaluate(backend, lengths: Sequence[int], depths: Sequence[float], samples: int = 1, seed: int = 0,
             max_seconds: float | None = None, progress: bool | None = None) -> dict:
    """Accuracy per (length, depth). Cells not reached within max_seconds are None (and listed)."""
    if samples < 1:
        raise ValueError(f"samples={samples} must be >= 1")
    t0 = time.time()
    bar = _Progress(len(lengths) * len(depths) * samples, progress)
    cache: dict = {}
    acc = [[None] * len(depths) for _ in lengths]
    cells, skipped = [], []
    for li, length in enumerate(lengths):
        for di, depth in enumerate(depths):
            if max_seconds is not None and time.time() - t0 > max_seconds:
                skipped.append({"length": length, "depth": depth})
                bar.step(f"{format_length(length)} skipped")
                continue
            correct, answers = 0, []
            for si in range(samples):
                p = make_prompt(backend.tokenizer, length - ANSWER_RESERVE, depth,
                                cell_seed(seed, length, di, si), _cache=cache)
                out = backend.answer(p, length)
                ok = is_correct(p.key, out)
                correct += ok
                answers.append({"key": p.key, "output": out, "correct": bool(ok), "prompt_tokens": len(p.ids)})
                bar.step(f"{format_length(length)} depth {depth:.0%}")
            acc[li][di] = correct / samples
            cells.append({"length": length, "depth": depth, "correct": correct, "total": samples,
                          "answers": answers})
    per_length = {format_length(L): (None if any(a is None for a in row) else float(np.mean(row)))
                  for L, row in zip(lengths, acc)}
    return {"task": "passkey", **backend.describe(), "lengths": list(lengths), "depths": list(depths),
            "samples": samples, "seed": seed, "accuracy": acc, "per_length": per_length, "cells": cells,
            "skipped": skipped, "seconds": round(time.time() - t0, 1)}


def format_table(result: dict) -> str:
    """Rows = depth, columns = length, like the heatmap; '-' = not measured."""
    lengths = [format_length(L) for L in result["lengths"]]
    lines = ["depth  " + "".join(f"{L:>8}" for L in lengths)]
    for di, d in enumerate(result["depths"]):
        row = [result["accuracy"][li][di] for li in range(len(lengths))]
        lines.append(f"{d:>5.0%}  " + "".join("       -" if a is None else f"{a:>8.0%}" for a in row))
    mean = ["       -" if v is None else f"{v:>8.1%}" for v in result["per_length"].values()]
    lines.append("mean   " + "".join(mean))
    return "\n".join(lines)


def save_heatmap(result: dict, path: str | Path, title: str | None = None) -> bool:
    """PNG heatmap (x = context length, y = depth, colour = accuracy). False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'zenjax[plot]'): skipping the PNG heatmap",
              file=sys.stderr)
        return False
    acc = np.array([[np.nan if a is None else a for a in row] for row in result["accuracy"]], float).T
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(result["lengths"]), 1.4 + 0.38 * len(result["depths"])))
    im = ax.imshow(acc, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(result["lengths"])), [format_length(L) for L in result["lengths"]])
    ax.set_yticks(range(len(result["depths"])), [f"{d:.0%}" for d in result["depths"]])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("passkey depth")
    for (y, x), v in np.ndenumerate(acc):
        ax.text(x, y, "-" if np.isnan(v) else f"{v:.0%}", ha="center", va="center", fontsize=8)
    if title is None:
        title = f"passkey retrieval, DCA {'on' if result.get('dca') else 'off'}"
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_outputs(result: dict, out_dir: str | Path, name: str) -> list[Path]:
    """<out_dir>/<name>.json and, with matplotlib, <name>.png. Returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.json"]
    paths[0].write_text(json.dumps(result, indent=1) + "\n")
    if save_heatmap(result, out_dir / f"{name}.png"):
        paths.append(out_dir / f"{name}.png")
    return paths
