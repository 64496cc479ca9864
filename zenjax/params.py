"""The weight layout: one declaration of every parameter's path, shape, logical sharding axes, and the
Hugging Face tensors it is made of with the transform that makes it.

The converter validates and writes against it, the model allocates and loads against it, and the
sharding rules (zenjax/sharding.py) map its logical axes onto a mesh. Dimension letters: see
zenjax/model.py. Nothing here is inferred from a tensor's rank: each ParamSpec states the HF shape and
one of two transforms (HF nn.Linear weights are [out, in]):

    COPY    ours = hf.reshape(shape)                 norms, embeddings, biases ([N*H] -> [N, H])
    LINEAR  ours = hf.T.reshape(shape)               [out, in] -> [in..., out...]
            (fp8 values: hf.reshape(shape), out_major [out..., in...]; see below)

and a parameter comes from one tensor, or is `stacked`: E tensors, one per expert, transformed one by
one into rows 0..E-1 of our axis 0 (the converter reads them in turn into one array), or is `fused`:
several tensors that multiply the same input, each transformed into its `parts[i]` entries of axis
`part_axis`, one after the other (q|k|v and gate|up: one matmul instead of three or two).

Why fused: a decode step multiplies one row by every weight, and a small product cannot fill the GPU:
timed inside one jit on an H100 (RESULTS.md, session 9) 7B's k_proj (3584 -> 512, 3.7 MB) took 25.9 us,
about as long as q_proj (25.7 MB, 27.2 us). With q|k|v and gate|up fused, 7B decode at 8K went from
6.237 to 5.999 ms/token at batch 1 and from 7.38 to 6.98 ms/step at batch 8 (H100, same lease,
2026-12-07), and the step's 113 matmuls then stream their weights at the copy rate. The layout of
w_qkv groups by kv head so that tensor parallelism over kv heads splits it as it splits the KV cache:
kv head k's slice [:, k] holds its G q heads, then its key, then its value. When tensor_parallel exceeds
K (kv heads replicated, zenjax/sharding.py), each device of a kv head computes the G q heads of its
group and keeps its own share.

Paths are tuples of strings; layer l lives under ("layers", str(l), ...). HF -> zenjax:

    model.embed_tokens.weight        [V, D]      -> ("embed",)                 [V, D]      COPY
    ...layers.l.input_layernorm      [D]         -> ("layers", l, "attn_norm") [D]         COPY
    ...self_attn.q_proj.weight       [N*H, D]  \
    ...self_attn.k_proj.weight       [K*H, D]   > -> (..., "w_qkv")           [D, K, G+2, H]  LINEAR, fused
    ...self_attn.v_proj.weight       [K*H, D]  /      (parts G, 1, 1 along axis 2)
    ...q_proj / k_proj / v_proj .bias            -> (..., "b_qkv")             [K, G+2, H]     COPY, fused
    ...self_attn.o_proj.weight       [D, N*H]    -> "wo"                       [N, H, D]   LINEAR
    ...post_attention_layernorm      [D]         -> "mlp_norm"                 [D]
  dense layer (Qwen2; Qwen2-MoE's mlp_only_layers / off-step layers):
    ...mlp.gate_proj + up_proj       [F, D] x 2  -> "w_gate_up"                [D, 2, F]   LINEAR, fused
    ...mlp.down_proj                 [D, F]      -> "w_down"                   [F, D]      LINEAR
  MoE layer (Qwen2-MoE, spec 1.2; F = moe_intermediate_size, Fs = shared_expert_intermediate_size):
    ...mlp.gate.weight               [E, D]      -> "router"                   [D, E]      LINEAR
    ...mlp.experts.{e}.gate_proj     [F, D] x E  -> "experts_w_gate"           [E, D, F]   LINEAR, stacked
    ...mlp.experts.{e}.up_proj       [F, D] x E  -> "experts_w_up"             [E, D, F]   LINEAR, stacked
    ...mlp.experts.{e}.down_proj     [D, F] x E  -> "experts_w_down"           [E, F, D]   LINEAR, stacked
    ...mlp.shared_expert.gate_proj   [Fs, D]     -> "shared_w_gate"            [D, Fs]     LINEAR
    ...mlp.shared_expert.up_proj     [Fs, D]     -> "shared_w_up"              [D, Fs]     LINEAR
    ...mlp.shared_expert.down_proj   [D, Fs]     -> "shared_w_down"            [Fs, D]     LINEAR
    ...mlp.shared_expert_gate.weight [1, D]      -> "shared_gate"              [D]         LINEAR
    model.norm.weight                [D]         -> ("final_norm",)            [D]
    lm_head.weight                   [V, D]      -> ("lm_head",)               [V, D]  (absent when tied)

Examples: expert 3's gate_proj of layer 0, [F, D] in HF, becomes experts_w_gate[3] = gate_proj.T [D, F].
With 28 q / 4 kv heads (G = 7), w_qkv[:, 1, 0:7] = q_proj.T's heads 7..13, w_qkv[:, 1, 7] = k_proj.T's
head 1, w_qkv[:, 1, 8] = v_proj.T's head 1.

fp8 weights (`quantization="fp8"`, zenjax/fp8.py): every name in FP8_WEIGHTS is stored as float8_e4m3fn
values `out_major`, in HF's own [out..., in...] order (after the expert axis), plus a float32
"<name>_scale" with one entry per output channel (and expert): w_qkv [D, K, G+2, H] -> e4m3
[K, G+2, H, D] and w_qkv_scale [K, G+2, H]; experts_w_down [E, F, D] -> e4m3 [E, D, F] and scale
[E, D]. Why out-major: a decode step multiplies one or a few rows by each weight, so the matmul streams
the weight once and each output channel reduces over a contiguous run of in-values; measured on an H100
(2026-12-06, RESULTS.md) XLA's convert-and-dot of 7B's q_proj at 1 row took 16.9 us from [N, K] against
22.7 us from [K, N] (bf16: 27.2).
Scales have no HF tensor (hf_names is empty): the converter or the loader derives them from the weight.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterator

from zenjax.config import ModelConfig

COPY, LINEAR = "copy", "linear"
TRANSFORMS = (COPY, LINEAR)
QUANTIZATIONS = ("fp8",)
FP8_DTYPE = "float8_e4m3fn"
# The linear layers stored in fp8. Not quantized: embeddings, norms, biases, the lm_head (the logits'
# precision sets greedy ties), and the MoE router and shared-expert gate (tiny; routing is discontinuous).
FP8_WEIGHTS = frozenset({"w_qkv", "wo", "w_gate_up", "w_down", "experts_w_gate", "experts_w_up",
                         "experts_w_down", "shared_w_gate", "shared_w_up", "shared_w_down"})


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]         # ours
    axes: tuple[str, ...]          # logical axis per dimension (see sharding.RULES)
    hf_names: tuple[str, ...]      # the safetensors keys it is made of (one, or E when stacked)
    hf_shape: tuple[int, ...]      # the shape of each of those tensors
    transform: str                 # COPY | LINEAR, applied to each tensor
    stacked: bool = False          # hf_names[e] becomes row e of our axis 0
    dtype: str | None = None       # stored dtype when fixed (fp8 values, float32 scales); None: the checkpoint's
    out_major: bool = False        # LINEAR stored [E?, out..., in...] (HF's order, no transpose): fp8 values
    parts: tuple[int, ...] = ()    # fused: hf_names[i] fills parts[i] entries of axis part_axis, in turn
    part_axis: int = 0             # (an output axis of element_shape); hf_shape is then the HF tensors
                                   # concatenated along out: ((sum of outs), in) or ((sum,)) for biases

    def __post_init__(self):
        if self.transform not in TRANSFORMS:
            raise ValueError(f"transform {self.transform!r}: expected one of {TRANSFORMS}")
        if len(self.axes) != len(self.shape):
            raise ValueError(f"{self.hf_names[:1]}: axes {self.axes} do not match shape {self.shape}")
        n = self.shape[0] if self.stacked else len(self.parts) or 1
        if self.derived:
            return
        if self.parts and (self.stacked or sum(self.parts) != self.element_shape[self.part_axis]):
            raise ValueError(f"{self.hf_names[0]}: parts {self.parts} do not fill axis {self.part_axis} of "
                             f"{self.element_shape}" + (" (stacked and fused)" if self.stacked else ""))
        if len(self.hf_names) != n:
            raise ValueError(f"{self.hf_names[0]}: {len(self.hf_names)} HF tensors for {n} rows")
        if math.prod(self.hf_shape) != math.prod(self.element_shape):
            raise ValueError(f"{self.hf_names[0]}: HF shape {self.hf_shape} cannot become {self.element_shape}")

    @property
    def derived(self) -> bool:
        """No HF tensor: made from another parameter (an fp8 scale)."""
        return not self.hf_names

    @property
    def in_dims(self) -> int:
        """LINEAR: how many leading dims of element_shape are the input (their product is the HF [out, in]
        tensor's in; the trailing dims when out_major). wq [D, N, H] -> 1; wo [N, H, D] -> 2; wo's fp8 values
        [D, N, H] -> 2."""
        if self.transform != LINEAR:
            raise ValueError(f"{self.hf_names}: not a linear layer")
        dims = self.element_shape[::-1] if self.out_major else self.element_shape
        n, prod = 0, 1
        while prod != self.hf_shape[1]:
            prod *= dims[n]
            n += 1
        return n

    @property
    def element_shape(self) -> tuple[int, ...]:
        """Our shape of what one HF tensor becomes (one expert's row when stacked)."""
        return self.shape[1:] if self.stacked else self.shape

    @property
    def fused(self) -> bool:
        return bool(self.parts)

    def part(self, i: int) -> "ParamSpec":
        """A fused parameter's i-th tensor as a parameter of its own (its slice of part_axis)."""
        shape = list(self.shape)
        shape[self.part_axis] = self.parts[i]
        total = sum(self.parts)
        hf_shape = ((self.hf_shape[0] * self.parts[i] // total,) + self.hf_shape[1:] if self.transform == LINEAR
                    else (math.prod(shape),))
        return dataclasses.replace(self, shape=tuple(shape), hf_names=(self.hf_names[i],), hf_shape=hf_shape,
                                   parts=(), part_axis=0)

    def hf_shapes(self) -> dict[str, tuple[int, ...]]:
        """{HF name: the shape that tensor must have}."""
        if self.fused:
            return {n: self.part(i).hf_shape for i, n in enumerate(self.hf_names)}
        return {n: self.hf_shape for n in self.hf_names}

    @property
    def hf_name(self) -> str:
        """The one HF key of an unstacked parameter."""
        if len(self.hf_names) != 1:
            raise ValueError(f"{self.hf_names[0]}...: a stacked or fused parameter has {len(self.hf_names)} HF tensors")
        return self.hf_names[0]


def _copy(shape, axes, name, hf_shape=None) -> ParamSpec:
    return ParamSpec(tuple(shape), tuple(axes), (name,), tuple(hf_shape or shape), COPY)


def _linear(ins, outs, axes, name) -> ParamSpec:
    """HF [prod(outs), prod(ins)] -> ours [*ins, *outs]."""
    return ParamSpec(tuple(ins) + tuple(outs), tuple(axes), (name,), (math.prod(outs), math.prod(ins)), LINEAR)


def _fused_linear(ins, outs, axis, parts, axes, names) -> ParamSpec:
    """HF tensors [prod(outs) * parts[i] / sum(parts), prod(ins)] -> ours [*ins, *outs], tensor i filling
    its parts[i] entries of outs[axis]."""
    return ParamSpec(tuple(ins) + tuple(outs), tuple(axes), tuple(names), (math.prod(outs), math.prod(ins)),
                     LINEAR, parts=tuple(parts), part_axis=len(ins) + axis)


def _fused_copy(shape, axis, parts, axes, names) -> ParamSpec:
    return ParamSpec(tuple(shape), tuple(axes), tuple(names), (math.prod(shape),), COPY, parts=tuple(parts),
                     part_axis=axis)


def _stacked_linear(E, ins, outs, axes, names) -> ParamSpec:
    return ParamSpec((E,) + tuple(ins) + tuple(outs), tuple(axes), tuple(names),
                     (math.prod(outs), math.prod(ins)), LINEAR, stacked=True)


def scale_name(name: str) -> str:
    return name + "_scale"


def out_major_order(spec: ParamSpec) -> tuple[int, ...]:
    """The permutation of an in-major LINEAR parameter's dims that makes it out-major:
    [E?, in..., out...] -> [E?, out..., in...]. wo [N, H, D] -> (2, 0, 1)."""
    lead, cut, n = (1 if spec.stacked else 0), (1 if spec.stacked else 0) + spec.in_dims, len(spec.shape)
    return tuple(range(lead)) + tuple(range(cut, n)) + tuple(range(lead, cut))


def fp8_specs(name: str, spec: ParamSpec) -> dict[str, ParamSpec]:
    """The in-major weight `name` as out-major e4m3 values plus its per-output-channel float32 scale."""
    lead = 1 if spec.stacked else 0
    cut = lead + spec.in_dims
    scale = ParamSpec(spec.shape[:lead] + spec.shape[cut:], spec.axes[:lead] + spec.axes[cut:], (), (),
                      COPY, dtype="float32")
    order = out_major_order(spec)
    values = dataclasses.replace(spec, shape=tuple(spec.shape[i] for i in order),
                                 axes=tuple(spec.axes[i] for i in order), dtype=FP8_DTYPE, out_major=True,
                                 part_axis=order.index(spec.part_axis) if spec.fused else 0)
    return {name: values, scale_name(name): scale}


def _quantized(specs: dict[str, ParamSpec], quantization: str | None) -> dict[str, ParamSpec]:
    if quantization is None:
        return specs
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r}: expected one of {QUANTIZATIONS} or None")
    out: dict[str, ParamSpec] = {}
    for name, spec in specs.items():
        out.update(fp8_specs(name, spec) if name in FP8_WEIGHTS else {name: spec})
    return out


def layer_param_specs(cfg: ModelConfig, l: int, quantization: str | None = None) -> dict[str, ParamSpec]:
    return _quantized(_layer_param_specs(cfg, l), quantization)


def _layer_param_specs(cfg: ModelConfig, l: int) -> dict[str, ParamSpec]:
    D, F, N, K, H = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    G = N // K
    p = f"model.layers.{l}."
    qkv = [p + f"self_attn.{x}_proj." for x in "qkv"]
    specs = {
        "attn_norm": _copy((D,), ("norm",), p + "input_layernorm.weight"),
        "w_qkv": _fused_linear((D,), (K, G + 2, H), 1, (G, 1, 1), ("embed", "kv_heads", "qkv", "head_dim"),
                               [x + "weight" for x in qkv]),
        "b_qkv": _fused_copy((K, G + 2, H), 1, (G, 1, 1), ("kv_heads", "qkv", "head_dim"), [x + "bias" for x in qkv]),
        "wo": _linear((N, H), (D,), ("q_heads", "head_dim", "embed"), p + "self_attn.o_proj.weight"),
        "mlp_norm": _copy((D,), ("norm",), p + "post_attention_layernorm.weight"),
    }
    if not cfg.is_moe_layer(l):
        specs.update({
            "w_gate_up": _fused_linear((D,), (2, F), 0, (1, 1), ("embed", "gate_up", "mlp"),
                                       [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]),
            "w_down": _linear((F,), (D,), ("mlp", "embed"), p + "mlp.down_proj.weight"),
        })
        return specs
    moe = cfg.moe
    E, Fe, Fs = moe.num_experts, moe.moe_intermediate_size, moe.shared_expert_intermediate_size
    ex = [f"{p}mlp.experts.{e}." for e in range(E)]
    specs.update({
        "router": _linear((D,), (E,), ("embed", "router"), p + "mlp.gate.weight"),
        "experts_w_gate": _stacked_linear(E, (D,), (Fe,), ("experts", "embed", "expert_mlp"),
                                          [x + "gate_proj.weight" for x in ex]),
        "experts_w_up": _stacked_linear(E, (D,), (Fe,), ("experts", "embed", "expert_mlp"),
                                        [x + "up_proj.weight" for x in ex]),
        "experts_w_down": _stacked_linear(E, (Fe,), (D,), ("experts", "expert_mlp", "embed"),
                                          [x + "down_proj.weight" for x in ex]),
        "shared_w_gate": _linear((D,), (Fs,), ("embed", "mlp"), p + "mlp.shared_expert.gate_proj.weight"),
        "shared_w_up": _linear((D,), (Fs,), ("embed", "mlp"), p + "mlp.shared_expert.up_proj.weight"),
        "shared_w_down": _linear((Fs,), (D,), ("mlp", "embed"), p + "mlp.shared_expert.down_proj.weight"),
        "shared_gate": _linear((D,), (), ("embed",), p + "mlp.shared_expert_gate.weight"),
    })
    return specs


def param_specs(cfg: ModelConfig, quantization: str | None = None) -> dict[tuple[str, ...], ParamSpec]:
    """Every parameter, in the order a converter should stream them (embedding, layers, head)."""
    V, D = cfg.vocab_size, cfg.hidden_size
    specs = {("embed",): _copy((V, D), ("vocab", "embed"), "model.embed_tokens.weight")}
    for l in range(cfg.num_layers):
        for name, s in layer_param_specs(cfg, l, quantization).items():
            specs[("layers", str(l), name)] = s
    specs[("final_norm",)] = _copy((D,), ("norm",), "model.norm.weight")
    if not cfg.tie_word_embeddings:
        specs[("lm_head",)] = _copy((V, D), ("vocab", "embed"), "lm_head.weight")
    return specs


def from_hf(spec: ParamSpec, x):
    """One HF numpy tensor -> our layout of it (`spec.element_shape`; numpy in, numpy out; no copy beyond
    the transpose). A stacked parameter is the E results stacked (the converter fills the rows); a fused
    one is its parts' results concatenated (from_hf_tensors)."""
    if spec.fused:
        raise ValueError(f"{spec.hf_names}: a fused parameter is made of {len(spec.parts)} tensors (from_hf_tensors)")
    if tuple(x.shape) != spec.hf_shape:
        raise ValueError(f"{spec.hf_names[0]}: got shape {list(x.shape)}, expected {list(spec.hf_shape)}")
    return (x if spec.transform == COPY or spec.out_major else x.T).reshape(spec.element_shape)


def assemble(spec: ParamSpec, load) -> "np.ndarray":
    """The parameter `spec` from load(hf_name, spec_of_that_tensor) -> that tensor in our layout: one
    tensor as is, a fused one's parts concatenated along its part axis (q|k|v, gate|up), a stacked one
    filled row by row (only one expert tensor held besides the result). The converter and
    `from_hf_tensors` both build parameters through this."""
    import numpy as np
    if spec.fused:
        return np.concatenate([load(n, spec.part(i)) for i, n in enumerate(spec.hf_names)], axis=spec.part_axis)
    if not spec.stacked:
        return np.ascontiguousarray(load(spec.hf_name, spec))
    first = load(spec.hf_names[0], spec)
    out = np.empty((len(spec.hf_names),) + first.shape, first.dtype)
    out[0] = first
    for e, name in enumerate(spec.hf_names[1:], start=1):
        out[e] = load(name, spec)
    return out


def from_hf_tensors(spec: ParamSpec, tensors) -> "np.ndarray":
    """The parameter `spec` from {HF name: numpy tensor} (every kind: one tensor, stacked, fused)."""
    return assemble(spec, lambda name, s: from_hf(s, tensors[name]))


def to_hf_tensors(spec: ParamSpec, x) -> dict:
    """Our layout -> {HF name: tensor} (for exporting a trained model): the inverse of from_hf_tensors."""
    if spec.fused:
        import numpy as np
        cuts = np.cumsum(spec.parts)[:-1]
        out = {}
        for i, piece in enumerate(np.split(np.asarray(x), cuts, axis=spec.part_axis)):
            out.update(to_hf_tensors(spec.part(i), piece))
        return out
    rows = list(x) if spec.stacked else [x]
    out = {}
    for name, r in zip(spec.hf_names, rows):
        if spec.transform == COPY or spec.out_major:
            out[name] = r.reshape(spec.hf_shape)
        else:                                   # [in..., out...] -> [in, out] -> [out, in]
            out[name] = r.reshape(spec.hf_shape[1], spec.hf_shape[0]).T
    return out


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
