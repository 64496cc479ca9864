"""The weight layout: one declaration of every parameter's path, shape and logical sharding axes.

The converter validates and writes against it, the model allocates and loads against it, and the
sharding rules (zenjax/sharding.py) map its logical axes onto a mesh. Dimension letters: see
zenjax/model.py.

Paths are tuples of strings; layer l lives under ("layers", str(l), ...). HF -> zenjax (HF nn.Linear
weights are [out, in]):

    model.embed_tokens.weight        [V, D]      -> ("embed",)                 [V, D]
    ...layers.l.input_layernorm      [D]         -> ("layers", l, "attn_norm") [D]
    ...self_attn.q_proj.weight       [N*H, D]    -> (..., "wq")                [D, N, H]   (W.T reshaped)
    ...self_attn.q_proj.bias         [N*H]       -> (..., "bq")                [N, H]
    ...self_attn.k_proj / v_proj     [K*H, D]    -> "wk" / "wv"                [D, K, H];  biases [K, H]
    ...self_attn.o_proj.weight       [D, N*H]    -> "wo"                       [N, H, D]
    ...post_attention_layernorm      [D]         -> "mlp_norm"                 [D]
    ...mlp.gate_proj / up_proj       [F, D]      -> "w_gate" / "w_up"          [D, F]
    ...mlp.down_proj                 [D, F]      -> "w_down"                   [F, D]
    model.norm.weight                [D]         -> ("final_norm",)            [D]
    lm_head.weight                   [V, D]      -> ("lm_head",)               [V, D]  (absent when tied)
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

from zenjax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str, ...]      # logical axis per dimension (see sharding.LOGICAL_AXES)
    hf_name: str               # safetensors key it comes from
    transform: str             # how the HF tensor becomes ours: "none" | "linear_in_out" | "linear_out_heads"


def layer_param_specs(cfg: ModelConfig, l: int) -> dict[str, ParamSpec]:
    D, F, N, K, H = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    p = f"model.layers.{l}."
    return {
        "attn_norm": ParamSpec((D,), ("norm",), p + "input_layernorm.weight", "none"),
        "wq": ParamSpec((D, N, H), ("embed", "q_heads", "head_dim"), p + "self_attn.q_proj.weight", "linear_in_out"),
        "bq": ParamSpec((N, H), ("q_heads", "head_dim"), p + "self_attn.q_proj.bias", "none"),
        "wk": ParamSpec((D, K, H), ("embed", "kv_heads", "head_dim"), p + "self_attn.k_proj.weight", "linear_in_out"),
        "bk": ParamSpec((K, H), ("kv_heads", "head_dim"), p + "self_attn.k_proj.bias", "none"),
        "wv": ParamSpec((D, K, H), ("embed", "kv_heads", "head_dim"), p + "self_attn.v_proj.weight", "linear_in_out"),
        "bv": ParamSpec((K, H), ("kv_heads", "head_dim"), p + "self_attn.v_proj.bias", "none"),
        "wo": ParamSpec((N, H, D), ("q_heads", "head_dim", "embed"), p + "self_attn.o_proj.weight", "linear_in_out"),
        "mlp_norm": ParamSpec((D,), ("norm",), p + "post_attention_layernorm.weight", "none"),
        "w_gate": ParamSpec((D, F), ("embed", "mlp"), p + "mlp.gate_proj.weight", "linear_in_out"),
        "w_up": ParamSpec((D, F), ("embed", "mlp"), p + "mlp.up_proj.weight", "linear_in_out"),
        "w_down": ParamSpec((F, D), ("mlp", "embed"), p + "mlp.down_proj.weight", "linear_in_out"),
    }


def param_specs(cfg: ModelConfig) -> dict[tuple[str, ...], ParamSpec]:
    """Every parameter, in the order a converter should stream them (embedding, layers, head)."""
    V, D = cfg.vocab_size, cfg.hidden_size
    specs = {("embed",): ParamSpec((V, D), ("vocab", "embed"), "model.embed_tokens.weight", "none")}
    for l in range(cfg.num_layers):
        for name, s in layer_param_specs(cfg, l).items():
            specs[("layers", str(l), name)] = s
    specs[("final_norm",)] = ParamSpec((D,), ("norm",), "model.norm.weight", "none")
    if not cfg.tie_word_embeddings:
        specs[("lm_head",)] = ParamSpec((V, D), ("vocab", "embed"), "lm_head.weight", "none")
    return specs


def hf_shape(spec: ParamSpec) -> tuple[int, ...]:
    """The shape the safetensors tensor must have for `spec`."""
    if spec.transform == "none":
        # biases are [N, H] here and flat [N*H] in HF
        return (spec.shape[0] * spec.shape[1],) if spec.hf_name.endswith(".bias") else spec.shape
    # linear_in_out: ours is [in..., out...] flattened from HF [out, in].
    if len(spec.shape) == 3 and spec.axes[0] == "embed":      # wq/wk/wv: [D, X, H] <- [X*H, D]
        return (spec.shape[1] * spec.shape[2], spec.shape[0])
    if len(spec.shape) == 3:                                  # wo: [N, H, D] <- [D, N*H]
        return (spec.shape[2], spec.shape[0] * spec.shape[1])
    return (spec.shape[1], spec.shape[0])                     # [in, out] <- [out, in]


def from_hf(spec: ParamSpec, x):
    """HF numpy tensor -> our layout (numpy in, numpy out; no copy beyond the transpose)."""
    if spec.transform == "none":
        return x.reshape(spec.shape)
    return x.T.reshape(spec.shape)


def to_hf(spec: ParamSpec, x):
    """Our layout -> the HF tensor (for exporting a trained model)."""
    if spec.transform == "none":
        return x.reshape(hf_shape(spec))
    flat_in = spec.shape[0] * (spec.shape[1] if len(spec.shape) == 3 and spec.axes[0] != "embed" else 1)
    return x.reshape(flat_in, -1).T.reshape(hf_shape(spec))


def nested_set(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def iter_paths(tree: dict, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], object]]:
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from iter_paths(v, prefix + (k,))
        else:
            yield prefix + (k,), v
