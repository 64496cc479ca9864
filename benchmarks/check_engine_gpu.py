"""GPU correctness of the whole engine: the cuDNN and Pallas (Mosaic GPU prefill, Triton split-K decode)
attention paths against the reference, end to end on a
small random model with Qwen's 28/4 head layout (head_dim 64), bf16, plain RoPE and DCA, chunked prefill
crossing DCA boundaries. Prints the relative logits error and greedy agreement; exits 1 past tolerance.

    PYTHONPATH=. python3 benchmarks/check_engine_gpu.py
"""
import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np

from zenjax.config import DCAConfig, ModelConfig, engine_config
from zenjax.engine import Engine
from zenjax.model import init_params
from zenjax.sampling import SamplingParams

CFG = ModelConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_layers=2, num_heads=28,
                  num_kv_heads=4, head_dim=64, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  max_position_embeddings=4096)
TOL = 3e-2   # bf16 weights/activations: both paths round differently; measured errors are printed


def main() -> int:
    params = init_params(CFG, jax.random.key(0), jnp.bfloat16, scale=0.05)
    ids = [int(t) for t in np.random.RandomState(0).randint(0, CFG.vocab_size, 700)]
    ok = True
    for dca in (None, DCAConfig(256, 64, 256)):                  # s = 192: 700 tokens span 4 DCA chunks
        cfg = dataclasses.replace(CFG, dca=dca)
        out = {}
        for impl in ("reference", "cudnn", "pallas"):
            try:
                ec = engine_config(max_model_len=800, prefill_chunk=128, max_batch=2, attention=impl,
                                   dtype="bfloat16")
                e = Engine(cfg, params, ec, verbose=False)
                out[impl] = (e.logits(ids),
                             e.generate(ids, SamplingParams(max_new_tokens=16, ignore_eos=True)).token_ids)
            except Exception as exc:          # report and go on: one GPU run must say as much as it can
                print(f"dca={dca is not None} {impl}: FAILED {exc!r}"[:1500])
                ok = False
        lr, gr = out["reference"]
        for impl in ("cudnn", "pallas"):
            if impl not in out:
                continue
            lc, gc = out[impl]
            err = float(np.abs(lc - lr).max() / np.abs(lr).max())
            agree = float((lc.argmax(-1) == lr.argmax(-1)).mean())
            same = sum(a == b for a, b in zip(gr, gc))
            print(f"dca={dca is not None} {impl}: rel logits err {err:.2e}, argmax agreement {agree:.3f}, "
                  f"greedy {same}/16")
            ok &= bool(np.isfinite(lc).all()) and err < TOL and agree > 0.95
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
