"""Regenerates zenjax/assets/default/: the small checkpoint that ships inside the package.

    .venv/bin/python scripts/make_default_model.py [--keep-hf DIR]

Until a trained demo model replaces it (issue 5) this is a deterministic *random* Qwen2-architecture model:
it exists so that `zenjax.load()` and the README's run command work on a fresh CPU-only machine with no
download. Its text is gibberish by design.

Walk:
1. write a Hugging Face directory exactly as `save_pretrained` would lay it out (config.json with
   architectures ["Qwen2ForCausalLM"] and a dual_chunk_attention_config, model.safetensors written with
   numpy only, generation_config.json shaped like Qwen2.5-Instruct's) plus the Qwen-style tokenizer of
   tests/fixtures/tokenizer/ (built by scripts/make_tokenizer_fixtures.py);
2. convert it with `zenjax.convert.convert_checkpoint(..., dtype="float32")` into zenjax/assets/default/.
`--keep-hf DIR` also keeps the HF directory (e.g. to load it with transformers for a parity check).

Sizes: V = 1024 (1005 tokens rounded up to a multiple of 64, the padded rows zero like untrained rows),
D = 128, 2 layers, N = 4 q heads / K = 2 kv heads (G = 2), H = 32, F = 256, tied embeddings:
0.43 M parameters, 1.7 MB in float32.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing zenjax
TOKENIZER_SRC = ROOT / "tests" / "fixtures" / "tokenizer"
OUT = ROOT / "zenjax" / "assets" / "default"
SEED = 20260101

D, F, LAYERS, N, K, H = 128, 256, 2, 4, 2, 32


def hf_config(vocab_size: int, bos: int, eos: int) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": vocab_size,
        "hidden_size": D,
        "intermediate_size": F,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": N,
        "num_key_value_heads": K,
        "head_dim": H,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "max_position_embeddings": 2048,
        "max_window_layers": LAYERS,
        "use_sliding_window": False,
        "sliding_window": None,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": "float32",
        "dual_chunk_attention_config": {"chunk_size": 2048, "local_size": 256,
                                        "original_max_position_embeddings": 2048},
    }


def random_weights(vocab_size: int, n_tokens: int, seed: int = SEED) -> dict[str, np.ndarray]:
    """HF names and [out, in] layouts. Scales keep activations O(1) so the logits are neither flat nor
    one-hot (std ~1): linear weights N(0, 1/fan_in), embeddings N(0, 0.1), norms 1 + 0.1 N, biases 0.1 N."""
    rng = np.random.default_rng(seed)

    def lin(out_dim, in_dim):
        return (rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)).astype(np.float32)

    def vec(n, base=0.0):
        return (base + 0.1 * rng.standard_normal(n)).astype(np.float32)

    embed = (0.1 * rng.standard_normal((vocab_size, D))).astype(np.float32)
    embed[n_tokens:] = 0.0  # padded rows: no token has these ids
    w = {"model.embed_tokens.weight": embed}
    for l in range(LAYERS):
        p = f"model.layers.{l}."
        w[p + "input_layernorm.weight"] = vec(D, 1.0)
        w[p + "self_attn.q_proj.weight"] = lin(N * H, D)
        w[p + "self_attn.q_proj.bias"] = vec(N * H)
        w[p + "self_attn.k_proj.weight"] = lin(K * H, D)
        w[p + "self_attn.k_proj.bias"] = vec(K * H)
        w[p + "self_attn.v_proj.weight"] = lin(K * H, D)
        w[p + "self_attn.v_proj.bias"] = vec(K * H)
        w[p + "self_attn.o_proj.weight"] = lin(D, N * H)
        w[p + "post_attention_layernorm.weight"] = vec(D, 1.0)
        w[p + "mlp.gate_proj.weight"] = lin(F, D)
        w[p + "mlp.up_proj.weight"] = lin(F, D)
        w[p + "mlp.down_proj.weight"] = lin(D, F)
    w["model.norm.weight"] = vec(D, 1.0)
    return w


def write_hf_dir(dst: Path) -> None:
    """Step 1: the Hugging Face directory."""
    from zenjax.tokenizer import Tokenizer

    dst.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(TOKENIZER_SRC / name, dst / name)
    tok = Tokenizer.from_dir(dst)
    n_tokens = tok.vocab_size
    vocab_size = -(-n_tokens // 64) * 64
    endoftext, im_end = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")
    (dst / "config.json").write_text(json.dumps(hf_config(vocab_size, endoftext, im_end), indent=2) + "\n")
    generation = {  # Qwen2.5-Instruct's generation_config.json with this tokenizer's ids
        "bos_token_id": endoftext, "pad_token_id": endoftext, "eos_token_id": [im_end, endoftext],
        "do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    (dst / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    save_file(random_weights(vocab_size, n_tokens), str(dst / "model.safetensors"), metadata={"format": "pt"})


def build(out: Path = OUT, keep_hf: Path | None = None) -> None:
    from zenjax.convert import convert_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        hf = Path(keep_hf) if keep_hf else Path(tmp) / "hf"
        write_hf_dir(hf)
        convert_checkpoint(hf, out, dtype="float32", progress=False, force=True)
    # The converter records the absolute source path; a temporary path means nothing in a shipped asset.
    cfg_path = out / "zenjax_config.json"
    cfg = json.loads(cfg_path.read_text())
    if isinstance(cfg.get("source"), dict):
        cfg["source"]["hf_path"] = "generated by scripts/make_default_model.py (random weights, seed %d)" % SEED
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--keep-hf", type=Path, default=None, help="also write the HF directory here")
    args = ap.parse_args(argv)
    build(args.out, args.keep_hf)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {args.out}: {size / 1e6:.2f} MB", file=sys.stderr)


if __name__ == "__main__":
    main()
