"""The passkey retrieval test of the Qwen2.5-1M blog, through the zenjax gRPC API.

A random 5-digit pass key is hidden at a given depth of a long, repetitive haystack; the model must
repeat it. The prompt (the classic format the blog's figure uses):

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will
    quiz you about the important information there.
    The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. (x n)
    The pass key is 71432. Remember it. 71432 is the pass key.           <- at depth d of the haystack
    The grass is green. ... (the rest)
    What is the pass key? The pass key is

Run a server first (see serve/README.md), then for example:

    python serve/examples/passkey.py --lengths 512,1024,1800 --depths 5
    python serve/examples/passkey.py --server 10.0.0.7:50051 --lengths 32k,128k,1m --depths 10 --chat

Each prompt is sized with the server's Tokenize RPC, so any tokenizer works. Output: a table of
accuracy per (length, depth) and, with --json, the raw results.
"""
from __future__ import annotations

import argparse
import json
import random
import sys

from zenjax.client import Client, Delta, Progress

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"


def parse_length(s: str) -> int:
    s = s.strip().lower()
    mult = {"k": 1024, "m": 1024 * 1024}.get(s[-1:], 1)
    return int(float(s[:-1] if mult > 1 else s) * mult)


def build_prompt(n_filler: int, depth: float, key: str) -> str:
    before = round(n_filler * depth)
    return (INSTRUCTION + FILLER * before + NEEDLE.format(key=key) + FILLER * (n_filler - before) + QUESTION)


def fit_filler(client: Client, target_tokens: int, chat: bool) -> int:
    """Largest filler count whose prompt has <= target_tokens tokens (binary search with Tokenize)."""
    def count(n):
        text = build_prompt(n, 0.5, "00000")
        return len(client.tokenize([{"role": "user", "content": text}] if chat else text))

    lo, hi = 0, 1
    while count(hi) <= target_tokens:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) <= target_tokens else (lo, mid)
    return lo


def ask(client: Client, prompt, max_new_tokens: int, show_progress: bool) -> tuple[str, int]:
    text, n_prompt = [], 0
    for ev in client.generate(prompt, max_new_tokens=max_new_tokens, temperature=0.0):
        if isinstance(ev, Progress):
            n_prompt = ev.total
            if show_progress:
                print(f"\r  prefill {ev.prefilled:,}/{ev.total:,} tokens", end="", file=sys.stderr, flush=True)
        elif isinstance(ev, Delta):
            text.append(ev.text)
    if show_progress:
        print("\r\033[K", end="", file=sys.stderr, flush=True)
    return "".join(text), n_prompt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", default="127.0.0.1:50051")
    ap.add_argument("--lengths", default="512,1024", help="prompt lengths in tokens, e.g. 2k,8k,32k,1m")
    ap.add_argument("--depths", type=int, default=5, help="needle depths evenly spaced in [0, 1]")
    ap.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0, help="seed of the pass keys")
    ap.add_argument("--json", help="write every result here")
    a = ap.parse_args(argv)
    rng = random.Random(a.seed)
    depths = [i / max(1, a.depths - 1) for i in range(a.depths)]
    results = []
    with Client(a.server) as client:
        client.wait_ready(60)
        max_len = client.model_info().max_model_len
        for length in (parse_length(s) for s in a.lengths.split(",")):
            if length + a.max_new_tokens > max_len:
                print(f"skip {length:,} tokens: the server's max_model_len is {max_len:,}", file=sys.stderr)
                continue
            n_filler = fit_filler(client, length - 16, a.chat)   # 16: room for the key's digits
            for d in depths:
                key = f"{rng.randrange(10**5):05d}"
                text = build_prompt(n_filler, d, key)
                prompt = [{"role": "user", "content": text}] if a.chat else text
                answer, n_prompt = ask(client, prompt, a.max_new_tokens, sys.stderr.isatty())
                ok = key in answer
                results.append(dict(length=length, prompt_tokens=n_prompt, depth=round(d, 3), key=key,
                                    answer=answer, correct=ok))
                print(f"{n_prompt:>9,} tokens  depth {d:4.2f}  key {key}  {'ok ' if ok else 'MISS'}  "
                      f"{answer.strip()[:40]!r}")
    by_len: dict[int, list[bool]] = {}
    for r in results:
        by_len.setdefault(r["length"], []).append(r["correct"])
    print("\nlength     accuracy")
    for length, oks in by_len.items():
        print(f"{length:>9,}  {sum(oks)}/{len(oks)} ({100 * sum(oks) / len(oks):.0f}%)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
