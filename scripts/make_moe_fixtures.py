"""Regenerates tests/fixtures/hf/moe*/: tiny random Qwen2-MoE checkpoints plus transformers' reference outputs.

    /tmp/hf311/bin/python scripts/make_moe_fixtures.py     # Python with torch + transformers (CPU)

Same contents as scripts/make_hf_fixtures.py (config.json, model.safetensors, reference.npz with ids_<T>,
logits_<T>, greedy_prompt, greedy_ids, greedy_gap), for Qwen2MoeForCausalLM, plus in reference.npz
    route_gap     float32 []   smallest gap between the k-th and (k+1)-th routing probability over
                               every token, layer and prompt (how safe the top-k choice is from float noise)
The weights are stored in bfloat16 (half the bytes; the converter's bf16 path) and the reference runs in
float32 on exactly those values. Weights are re-drawn as in make_hf_fixtures.py, the routers with a
larger scale (N(0, 4/D)) so routing is decisive.

The fixtures and what each covers:
    moe       28 q / 4 kv heads (Qwen2.5's layout, head_dim 4), 8 experts top-2, norm_topk_prob false,
              mlp_only_layers [1]: layer 0 sparse, layer 1 dense
    moe_norm  MHA 4/4 as Qwen1.5-MoE-A2.7B, 6 experts top-3, norm_topk_prob true, decoder_sparse_step 2
              over 3 layers: layer 1 sparse, layers 0 and 2 dense
The script asserts that in every sparse layer the 70-token prompt routes to every expert, that no
routing choice is a near tie (route_gap > 1e-4), and that the greedy path has no near tie.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "hf"
LENGTHS = (1, 7, 33, 70)
GREEDY_PROMPT_LEN, GREEDY_NEW = 7, 24
COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, rope_theta=1e6, rms_norm_eps=1e-6,
              max_position_embeddings=4096, tie_word_embeddings=False, moe_intermediate_size=16,
              shared_expert_intermediate_size=32, use_sliding_window=False)
FIXTURES = {
    "moe": dict(COMMON, num_hidden_layers=2, num_attention_heads=28, num_key_value_heads=4, head_dim=4,
                num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1,
                mlp_only_layers=[1]),
    "moe_norm": dict(COMMON, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                     num_experts=6, num_experts_per_tok=3, norm_topk_prob=True, decoder_sparse_step=2,
                     mlp_only_layers=[]),
}

SEEDS = {"moe": 2000, "moe_norm": 2002}   # picked so no routing or greedy choice is a near tie


def randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name.endswith("mlp.gate.weight"):          # router [E, D]
                p.copy_(2 * torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
            else:                                            # [out, in]; fused experts [E, out, in]
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
        model.lm_head.weight.mul_(2.0)                       # wider logits: robust greedy argmax
        for p in model.parameters():                         # the values the bf16 file will hold
            p.copy_(p.to(torch.bfloat16).float())


class RouteProbe:
    """Records, per sparse layer, the experts chosen and the k-th vs (k+1)-th probability gap."""

    def __init__(self, model, k: int):
        self.k, self.used, self.gap = k, {}, np.inf
        for l, layer in enumerate(model.model.layers):
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.register_forward_hook(self.hook(l))

    def hook(self, l):
        def fn(module, inputs, outputs):
            logits, _, idx = outputs
            prob = torch.softmax(logits.float(), dim=-1)
            top = torch.sort(prob, dim=-1, descending=True).values
            self.gap = min(self.gap, float((top[:, self.k - 1] - top[:, self.k]).min()))
            self.used.setdefault(l, set()).update(idx.flatten().tolist())
        return fn


@torch.no_grad()
def logits(model, ids: np.ndarray) -> np.ndarray:
    return model(torch.as_tensor(ids[None], dtype=torch.long)).logits[0].float().numpy()


def make(name: str, spec: dict, seed: int) -> None:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    cfg = Qwen2MoeConfig(**spec, attn_implementation="eager")
    model = Qwen2MoeForCausalLM(cfg).float().eval()
    randomize(model, gen)
    out = OUT / name
    shutil.rmtree(out, ignore_errors=True)
    # a bf16 copy is saved (per-expert keys on disk); casting `model` itself to bf16 and back would also
    # round its RoPE inv_freq buffer, so the reference would no longer be float32 RoPE
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    conf = json.loads((out / "config.json").read_text())
    conf["rope_theta"] = spec["rope_theta"]
    (out / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    if (out / "generation_config.json").exists():
        (out / "generation_config.json").unlink()

    probe = RouteProbe(model, spec["num_experts_per_tok"])
    V, E = spec["vocab_size"], spec["num_experts"]
    ref = {}
    for T in LENGTHS:
        ids = rng.integers(0, V, T).astype(np.int32)
        probe.used = {}
        ref[f"ids_{T}"], ref[f"logits_{T}"] = ids, logits(model, ids)
    for l, used in probe.used.items():                   # the 70-token prompt's routing
        assert used == set(range(E)), f"{name}: layer {l} routes to experts {sorted(used)} only"
    seq = list(ref[f"ids_{GREEDY_PROMPT_LEN}"])
    gaps = []
    for _ in range(GREEDY_NEW):
        last = logits(model, np.asarray(seq))[-1]
        top2 = np.sort(last)[-2:]
        gaps.append(top2[1] - top2[0])
        seq.append(int(last.argmax()))
    ref["greedy_prompt"] = np.asarray(seq[:GREEDY_PROMPT_LEN], np.int32)
    ref["greedy_ids"] = np.asarray(seq[GREEDY_PROMPT_LEN:], np.int32)
    ref["greedy_gap"] = np.asarray(gaps, np.float32)
    ref["route_gap"] = np.float32(probe.gap)
    np.savez_compressed(out / "reference.npz", **ref)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"{name:9s} {size / 1024:6.0f} KB  logit std {ref['logits_33'].std():.2f}  "
          f"min greedy gap {min(gaps):.4f}  min route gap {probe.gap:.2e}  sparse layers {sorted(probe.used)}")
    assert min(gaps) > 1e-3, f"{name}: greedy path has a near tie; change the seed"
    assert probe.gap > 1e-4, f"{name}: a routing choice is a near tie; change the seed"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, spec in FIXTURES.items():
        make(name, spec, seed=SEEDS[name])


if __name__ == "__main__":
    main()
