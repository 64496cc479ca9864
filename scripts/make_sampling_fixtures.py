"""Reference logits processing from Hugging Face transformers, for tests/test_sampling.py.

Run with the Python 3.11 venv that has torch + transformers:
    /work/hfenv/bin/python scripts/make_sampling_fixtures.py
Writes tests/fixtures/sampling/hf_warpers.npz: random logits, prompt ids, and for several parameter sets
the scores after HF's processors in generate()'s order (repetition penalty, temperature, top-k, top-p,
min-p), with -inf where a token is filtered out.
"""
from pathlib import Path

import numpy as np
import torch
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

CASES = [  # temperature, top_k, top_p, min_p, repetition_penalty
    (1.0, 0, 1.0, 0.0, 1.3),
    (0.7, 20, 1.0, 0.0, 1.0),
    (1.3, 0, 0.8, 0.0, 1.0),
    (1.0, 0, 1.0, 0.1, 1.0),
    (0.9, 50, 0.9, 0.05, 1.15),
]

rng = np.random.RandomState(0)
B, V = 3, 257
logits = (rng.randn(B, V) * 3).astype(np.float32)
prompt = rng.randint(0, V, (B, 12))
out = {"logits": logits, "prompt": prompt, "cases": np.asarray(CASES, np.float32)}
for i, (t, k, p, m, r) in enumerate(CASES):
    s = torch.tensor(logits)
    ids = torch.tensor(prompt)
    if r != 1.0:
        s = RepetitionPenaltyLogitsProcessor(r)(ids, s)
    s = TemperatureLogitsWarper(t)(ids, s)
    if k:
        s = TopKLogitsWarper(int(k))(ids, s)
    if p < 1.0:
        s = TopPLogitsWarper(p)(ids, s)
    if m:
        s = MinPLogitsWarper(m)(ids, s)
    out[f"scores_{i}"] = s.numpy()
dst = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "sampling" / "hf_warpers.npz"
np.savez_compressed(dst, **out)
print("wrote", dst)
