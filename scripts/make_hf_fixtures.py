"""Regenerates tests/fixtures/hf/<name>/: tiny random Qwen2 checkpoints plus transformers' reference outputs.

    /work/hfenv/bin/python scripts/make_hf_fixtures.py      # Python with torch + transformers (CPU)

Each fixture directory holds what `save_pretrained` writes (config.json, model.safetensors, float32) and
reference.npz:
    ids_<T>       int32 [T]      random prompt ids, T in LENGTHS
    logits_<T>    float32 [T, V] transformers' full-sequence logits for that prompt
    greedy_prompt int32 [7]      the prompt of the greedy continuation (= ids_7)
    greedy_ids    int32 [24]     token-by-token argmax continuation (full recompute each step, no EOS stop)
    greedy_gap    float32 [24]   top-1 minus top-2 logit at each greedy step (how safe the argmax is)

Why every weight is re-drawn instead of keeping transformers' init: HF initializes norms to 1 and biases
to 0, so a model that forgot the norm weights or the q/k/v biases would still match. Here norms are
1 + 0.2 N(0,1), biases 0.5 N(0,1), linear weights N(0, 1/fan_in), embeddings N(0,1), so every weight
matters, and logits spread wide enough (std ~2) that greedy argmax is not decided by float noise.

config.json also gets a top-level "rope_theta" (as real Qwen2.5 configs have) beside the
"rope_parameters" that transformers >= 5 writes.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "hf"
LENGTHS = (1, 7, 33, 70)
GREEDY_PROMPT_LEN, GREEDY_NEW = 7, 24
COMMON = dict(vocab_size=300, intermediate_size=64, num_hidden_layers=2, rope_theta=1e6, rms_norm_eps=1e-6,
              max_position_embeddings=4096, tie_word_embeddings=False)
DCA = {"chunk_size": 64, "local_size": 16, "original_max_position_embeddings": 64}

FIXTURES = {
    # Qwen2.5-7B's head layout (28 q / 4 kv heads, group 7) at head_dim 8. hidden 32 != N*H = 224 keeps
    # the file small and makes a D vs N*H mix-up in the o_proj/q_proj transforms fail loudly.
    "gqa7": dict(COMMON, hidden_size=32, num_attention_heads=28, num_key_value_heads=4, head_dim=8),
    "mha_tied": dict(COMMON, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                     tie_word_embeddings=True),
    # head_dim 24 given explicitly (hidden/heads would be 12): not a power of two.
    "odd_head_dim": dict(COMMON, hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=24),
    "deep": dict(COMMON, hidden_size=64, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=5,
                 intermediate_size=32, vocab_size=128),
    # transformers ignores dual_chunk_attention_config (plain RoPE): the logits equal DCA only while the
    # prompt stays within one chunk (L <= chunk_size - local_size = 48); longer ones are plain RoPE.
    "dca": dict(COMMON, hidden_size=32, num_attention_heads=28, num_key_value_heads=4, head_dim=8,
                dual_chunk_attention_config=DCA),
}
LENGTHS_OF = {"dca": (1, 7, 33, 48, 64, 70)}
GENERATION = {  # gqa7 only; shaped like Qwen2.5-Instruct's generation_config.json
    "bos_token_id": 1, "pad_token_id": 2, "eos_token_id": [2, 3], "do_sample": True, "temperature": 0.7,
    "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, "transformers_version": "4.43.1"}


def randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:                                   # nn.Linear [out, in]
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
        if "lm_head.weight" in dict(model.named_parameters()):
            model.lm_head.weight.mul_(2.0)           # wider logits: robust greedy argmax


@torch.no_grad()
def logits(model, ids: np.ndarray) -> np.ndarray:
    return model(torch.as_tensor(ids[None], dtype=torch.long)).logits[0].float().numpy()


def sparse_config(layers: int, heads: int, rng: np.random.Generator) -> list:
    """Shaped like Qwen's sparse_attention_config.json: per layer, global head id -> [pattern, v, s, score]."""
    budgets = [(1000, 6096), (30, 800), (3048, 8144)]
    return [{str(h): ["vertical_and_slash", *budgets[int(rng.integers(3))], round(float(rng.random()), 3)]
             for h in range(heads)} for _ in range(layers)]


def make(name: str, spec: dict, seed: int) -> None:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    cfg = Qwen2Config(**spec, attn_implementation="eager")
    model = Qwen2ForCausalLM(cfg).float().eval()
    randomize(model, gen)
    out = OUT / name
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out, safe_serialization=True)
    conf = json.loads((out / "config.json").read_text())
    conf["rope_theta"] = spec["rope_theta"]
    (out / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    if (out / "generation_config.json").exists():
        (out / "generation_config.json").unlink()   # defaults only; ours below where wanted
    if name == "gqa7":
        (out / "generation_config.json").write_text(json.dumps(GENERATION, indent=2) + "\n")
    if name == "dca":
        (out / "sparse_attention_config.json").write_text(
            json.dumps(sparse_config(spec["num_hidden_layers"], spec["num_attention_heads"], rng)) + "\n")

    V = spec["vocab_size"]
    ref = {}
    for T in LENGTHS_OF.get(name, LENGTHS):
        ids = rng.integers(0, V, T).astype(np.int32)
        ref[f"ids_{T}"], ref[f"logits_{T}"] = ids, logits(model, ids)
    seq = list(ref[f"ids_{GREEDY_PROMPT_LEN}"])
    gaps = []
    for _ in range(GREEDY_NEW):                     # full recompute each step: no cache, no EOS stop
        last = logits(model, np.asarray(seq))[-1]
        top2 = np.sort(last)[-2:]
        gaps.append(top2[1] - top2[0])
        seq.append(int(last.argmax()))
    ref["greedy_prompt"] = np.asarray(seq[:GREEDY_PROMPT_LEN], np.int32)
    ref["greedy_ids"] = np.asarray(seq[GREEDY_PROMPT_LEN:], np.int32)
    ref["greedy_gap"] = np.asarray(gaps, np.float32)
    np.savez_compressed(out / "reference.npz", **ref)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"{name:13s} {size / 1024:6.0f} KB  logit std {ref['logits_33'].std():.2f}  "
          f"min greedy gap {min(gaps):.4f}")
    assert min(gaps) > 1e-3, f"{name}: greedy path has a near tie; change the seed"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for i, (name, spec) in enumerate(FIXTURES.items()):
        make(name, spec, seed=1000 + i)


if __name__ == "__main__":
    main()
