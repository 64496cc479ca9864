"""The frozen configs of zenjax, one per concern, and the one function that builds each.

* `ModelConfig`  - the architecture, built from a Hugging Face `config.json` by `model_config_from_hf`.
* `DCAConfig`    - Dual Chunk Attention (spec: shared/spec/long-context.md section 2), part of the model
                   config when the checkpoint carries `dual_chunk_attention_config`.
* `MoEConfig`    - the sparse MLP of Qwen2-MoE (spec section 1.2), part of the model config of a
                   `Qwen2MoeForCausalLM` checkpoint.
* `SparseConfig` - vertical-slash sparse prefill budgets per layer and head (spec section 3.4), built by
                   `sparse_config_from_json` from Qwen's `sparse_attention_config.json` at load
                   (`resolve_sparse` picks the file).
* `EngineConfig` - how one engine instance runs a model (cache length, chunk size, slots, attention
                   implementation), built by `engine_config` from `zenjax.load`'s keyword arguments.

No config trees: a variant is `dataclasses.replace(cfg, field=value)`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM")
ATTENTION_IMPLS = ("auto", "reference", "cudnn", "pallas")


class ConfigError(ValueError):
    """A config field is missing or has a value zenjax cannot run; the message names the field."""


@dataclasses.dataclass(frozen=True)
class DCAConfig:
    """Dual Chunk Attention. Names follow the HF `dual_chunk_attention_config`.

    chunk_size (c): the pretraining window; local_size (w): exact-distance window across a chunk
    boundary; the sequence is cut every `chunk_len = c - w` tokens (s in the spec), NOT every c.
    Example (Qwen2.5-7B-Instruct-1M): c=262144, w=8192 -> s=253952.
    """

    chunk_size: int
    local_size: int
    original_max_position_embeddings: int

    def __post_init__(self):
        if self.chunk_size <= 0 or self.local_size < 0:
            raise ConfigError(f"dual_chunk_attention_config: chunk_size={self.chunk_size} must be > 0 "
                              f"and local_size={self.local_size} >= 0")
        if self.local_size >= self.chunk_size:
            raise ConfigError(f"dual_chunk_attention_config: local_size={self.local_size} must be < "
                              f"chunk_size={self.chunk_size}")
        if self.original_max_position_embeddings <= 0:
            raise ConfigError("dual_chunk_attention_config: original_max_position_embeddings must be > 0")

    @staticmethod
    def parse(text: str, original_max_position_embeddings: int | None = None) -> "DCAConfig":
        """'CHUNK,LOCAL,ORIG' -> DCAConfig (the --dca option of the server and the eval). 'CHUNK,LOCAL' is
        accepted when the caller supplies ORIG (e.g. the checkpoint's trained length)."""
        try:
            nums = [int(x) for x in text.split(",")]
        except ValueError:
            raise ConfigError(f"dca {text!r}: expected integers CHUNK,LOCAL,ORIGINAL_MAX") from None
        if len(nums) == 2 and original_max_position_embeddings is not None:
            nums.append(original_max_position_embeddings)
        if len(nums) != 3:
            raise ConfigError(f"dca {text!r}: expected CHUNK,LOCAL,ORIGINAL_MAX")
        return DCAConfig(*nums)

    @property
    def chunk_len(self) -> int:
        """s = c - w: where the sequence is cut."""
        return self.chunk_size - self.local_size

    @property
    def succ_cap(self) -> int:
        """Largest successive-chunk query position (vLLM clamps to c, spec section 2.2)."""
        return self.chunk_size

    @property
    def inter_pos(self) -> int:
        """Constant query position against chunks two or more back: min(2s - 1, c)."""
        return min(2 * self.chunk_len - 1, self.chunk_size)

    def temperature(self, length: int) -> float:
        """m(L) = max(1, 0.1 ln(L / L0) + 1); logits are multiplied by m^2 (spec section 2.6).

        Worked example: L0 = 262144, L = 1,000,000 -> m = 1.1339, m^2 = 1.2857.
        """
        return max(1.0, 0.1 * math.log(max(length, 1) / self.original_max_position_embeddings) + 1.0)

    def to_hf(self) -> dict:
        return {"chunk_size": self.chunk_size, "local_size": self.local_size,
                "original_max_position_embeddings": self.original_max_position_embeddings}


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Qwen2-MoE's sparse MLP (spec 1.2). Names follow the HF config.

    Layer l is sparse iff l not in mlp_only_layers and (l + 1) % decoder_sparse_step == 0; the other
    layers keep the dense SwiGLU of width ModelConfig.intermediate_size. Example (Qwen1.5-MoE-A2.7B):
    60 experts, top-4, expert width 1408, shared expert 5632, norm_topk_prob false, every layer sparse.
    """

    num_experts: int                   # E
    num_experts_per_tok: int           # k: experts each token is routed to
    moe_intermediate_size: int         # F of one routed expert
    shared_expert_intermediate_size: int   # F of the always-on shared expert
    norm_topk_prob: bool = False       # renormalise the k routing weights to sum to 1
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "mlp_only_layers", tuple(int(l) for l in self.mlp_only_layers))
        for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                     "shared_expert_intermediate_size", "decoder_sparse_step"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config field {name}={getattr(self, name)} must be > 0")
        if self.num_experts_per_tok > self.num_experts:
            raise ConfigError(f"num_experts_per_tok={self.num_experts_per_tok} exceeds "
                              f"num_experts={self.num_experts}")

    def is_sparse(self, layer: int) -> bool:
        return layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Qwen2 decoder. Dimension letters (see zenjax/model.py) in comments."""

    vocab_size: int            # V (padded rows kept: 152064 > 151665 tokens for Qwen2.5-7B)
    hidden_size: int           # D
    intermediate_size: int     # F
    num_layers: int
    num_heads: int             # N
    num_kv_heads: int          # K
    head_dim: int              # H
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    dca: DCAConfig | None = None
    architecture: str = "Qwen2ForCausalLM"
    moe: MoEConfig | None = None      # Qwen2-MoE; None: every layer dense

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config field {name}={getattr(self, name)} must be > 0")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_attention_heads={self.num_heads} is not a multiple of "
                              f"num_key_value_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.moe is not None:
            bad = [l for l in self.moe.mlp_only_layers if not 0 <= l < self.num_layers]
            if bad:
                raise ConfigError(f"mlp_only_layers={list(self.moe.mlp_only_layers)}: layers {bad} do not "
                                  f"exist (num_hidden_layers={self.num_layers})")

    def is_moe_layer(self, layer: int) -> bool:
        """Whether layer `layer` uses the sparse MoE MLP (else the dense SwiGLU)."""
        return self.moe is not None and self.moe.is_sparse(layer)

    @property
    def group(self) -> int:
        """G = N / K query heads per kv head."""
        return self.num_heads // self.num_kv_heads

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["dca"] = self.dca.to_hf() if self.dca else None
        if self.moe is None:
            d.pop("moe")            # dense checkpoints keep the config they had before MoE existed
        else:
            d["moe"]["mlp_only_layers"] = list(self.moe.mlp_only_layers)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        d = dict(d)
        dca, moe = d.pop("dca", None), d.pop("moe", None)
        return cls(**d, dca=DCAConfig(**dca) if dca else None, moe=MoEConfig(**moe) if moe else None)


def _req(hf: Mapping[str, Any], key: str):
    if key not in hf or hf[key] is None:
        raise ConfigError(f"config.json: required field '{key}' is missing")
    return hf[key]


def model_config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """The only place that reads Hugging Face config field names."""
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else hf.get("model_type", "<none>")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(f"config.json: architecture '{arch}' is not supported "
                          f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    hidden = int(_req(hf, "hidden_size"))
    heads = int(_req(hf, "num_attention_heads"))
    head_dim = hf.get("head_dim") or (hidden // heads)
    # transformers >= 5 writes rope settings as "rope_parameters" (no top-level rope_theta)
    rope_params = hf.get("rope_parameters") or {}
    rope_theta = hf.get("rope_theta", rope_params.get("rope_theta", 10000.0))
    for key, rope_scaling in (("rope_scaling", hf.get("rope_scaling")), ("rope_parameters", rope_params)):
        if rope_scaling and (rope_scaling.get("type") or rope_scaling.get("rope_type")) not in (None, "default"):
            raise ConfigError(f"config.json: {key}={rope_scaling!r} is not supported; Qwen2.5-1M models "
                              "extrapolate with dual_chunk_attention_config instead (spec pitfall 6)")
    dca_hf = hf.get("dual_chunk_attention_config")
    dca = None
    if dca_hf:
        dca = DCAConfig(int(_req(dca_hf, "chunk_size")), int(_req(dca_hf, "local_size")),
                        int(_req(dca_hf, "original_max_position_embeddings")))
    return ModelConfig(
        vocab_size=int(_req(hf, "vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(_req(hf, "intermediate_size")),
        num_layers=int(_req(hf, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rope_theta=float(rope_theta),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        dca=dca,
        architecture=arch,
        moe=_moe_from_hf(hf) if arch == "Qwen2MoeForCausalLM" else None,
    )


def _moe_from_hf(hf: Mapping[str, Any]) -> MoEConfig | None:
    """The Qwen2-MoE fields (HF defaults where the config omits one, as Qwen2MoeConfig does)."""
    if hf.get("qkv_bias") is False:
        raise ConfigError("config.json: qkv_bias=false is not supported (Qwen2-MoE attention has q/k/v biases)")
    if int(_req(hf, "num_experts")) == 0:
        return None                          # HF: num_experts 0 makes every layer dense
    return MoEConfig(
        num_experts=int(hf["num_experts"]),
        num_experts_per_tok=int(_req(hf, "num_experts_per_tok")),
        moe_intermediate_size=int(_req(hf, "moe_intermediate_size")),
        shared_expert_intermediate_size=int(_req(hf, "shared_expert_intermediate_size")),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        decoder_sparse_step=int(hf.get("decoder_sparse_step", 1)),
        mlp_only_layers=tuple(hf.get("mlp_only_layers") or ()),
    )


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How an engine runs a model. Every compiled shape derives from these numbers (see
    `zenjax.engine.compiled_shapes`)."""

    max_model_len: int = 4096        # S: KV cache slots per sequence
    prefill_chunk: int = 8192        # T of one prefill step (the last chunk is padded and masked)
    max_batch: int = 1               # B: decode slots (sequences decoding together)
    attention: str = "reference"     # resolved impl: reference | cudnn | pallas
    dtype: str = "bfloat16"          # activations and weights
    cache_dtype: str = "bfloat16"    # KV cache

    def __post_init__(self):
        if self.max_model_len <= 0:
            raise ConfigError(f"max_model_len={self.max_model_len} must be > 0")
        if self.prefill_chunk <= 0:
            raise ConfigError(f"prefill_chunk={self.prefill_chunk} must be > 0")
        if self.max_batch <= 0:
            raise ConfigError(f"max_batch={self.max_batch} must be > 0")
        if self.attention not in ATTENTION_IMPLS[1:]:
            raise ConfigError(f"attention={self.attention!r}: expected one of {ATTENTION_IMPLS}")


HOPPER_KINDS = ("h100", "h200", "h800", "h20", "gh200")


def is_hopper(device_kind: str) -> bool:
    """Whether a jax device_kind names a Hopper GPU (wgmma / TMA: the Mosaic GPU kernels' target)."""
    return any(k in device_kind.lower() for k in HOPPER_KINDS)


def with_dca(cfg: ModelConfig, dca: "DCAConfig | bool | None") -> ModelConfig:
    """Apply a load-time DCA choice: True / None keep the checkpoint's config, False turns DCA off, a
    DCAConfig replaces it (any Qwen2 checkpoint)."""
    if dca is False:
        return dataclasses.replace(cfg, dca=None)
    if isinstance(dca, DCAConfig):
        return dataclasses.replace(cfg, dca=dca)
    return cfg


def resolve_attention(impl: str, platform: str, device_kind: str = "") -> str:
    """'auto' -> pallas on a Hopper GPU, cudnn on other GPUs, reference elsewhere.

    Why pallas on Hopper (benchmarks/RESULTS.md, H100, 2026-11-23): the Mosaic GPU DCA prefill kernel runs
    at 97-108% of dense cuDNN causal and the split-K decode kernel 2-3x faster than cuDNN's decode, and the
    engine's pallas path matches the reference on the GPU (benchmarks/check_engine_gpu.py)."""
    if impl not in ATTENTION_IMPLS:
        raise ConfigError(f"attention={impl!r}: expected one of {ATTENTION_IMPLS}")
    if impl == "auto":
        if platform != "gpu":
            return "reference"
        return "pallas" if is_hopper(device_kind) else "cudnn"
    return impl


def _device_kind(platform: str) -> str:
    if platform != "gpu":
        return ""
    import jax
    return jax.devices()[0].device_kind


def engine_config(*, max_model_len: int, prefill_chunk: int = 8192, max_batch: int = 1,
                  attention: str = "auto", dtype: str = "bfloat16", cache_dtype: str | None = None,
                  platform: str = "cpu") -> EngineConfig:
    """The one function that builds an EngineConfig (from zenjax.load's or the server's arguments)."""
    return EngineConfig(max_model_len=max_model_len, prefill_chunk=min(prefill_chunk, max_model_len),
                        max_batch=max_batch, attention=resolve_attention(attention, platform, _device_kind(platform)),
                        dtype=dtype, cache_dtype=cache_dtype or dtype)


# ----------------------------------------------------------------------------------------------
# Sparse (MInference vertical-slash) prefill, spec section 3.4 / 3.5
# ----------------------------------------------------------------------------------------------

SPARSE_FILE = "sparse_attention_config.json"
SPARSE_PATTERNS = ("vertical_and_slash", "a_shape")   # a_shape: [n_init, n_local] (spec 3.1)


@dataclasses.dataclass(frozen=True)
class SparseConfig:
    """Per-head vertical-slash budgets and the knobs vLLM reads from `dual_chunk_attention_config`.

    budgets[l][h] = (vertical, slash) of layer l, head head_offset + h, as in the file (the 30 -> 130
    quirk is applied by `layer`). threshold: only prompts LONGER than this are prefilled sparse.
    last_q: queries per prefill piece used to estimate indices. sink / local: keys 0..sink-1 and the
    `local` nearest diagonals are always kept. Example (Qwen2.5-7B-Instruct-1M, layer 0, head 6):
    ["vertical_and_slash", 30, 800, 0.997] -> 130 vertical columns and 800 diagonals.
    """

    budgets: tuple
    source: str = ""
    threshold: int = 32768
    last_q: int = 64
    sink: int = 30
    local: int = 100
    head_offset: int = 0
    patterns: tuple = ()     # patterns[l][h] when some head is "a_shape"; () = every head vertical_and_slash

    def __post_init__(self):
        for name in ("threshold", "last_q", "sink", "local"):
            if getattr(self, name) < 0 or (name == "last_q" and self.last_q == 0):
                raise ConfigError(f"sparse attention: {name}={getattr(self, name)} must be "
                                  f"{'> 0' if name == 'last_q' else '>= 0'}")

    def __str__(self) -> str:
        return (f"vertical_and_slash ({self.source or 'budgets given'}; threshold {self.threshold}, "
                f"last_q {self.last_q})")

    @property
    def num_layers(self) -> int:
        return len(self.budgets)

    @property
    def num_heads(self) -> int:
        return len(self.budgets[0]) if self.budgets else 0

    def layer(self, l: int, rope_theta: float) -> "SparseLayer":
        a_shape = tuple(p == "a_shape" for p in self.patterns[l]) if self.patterns else ()
        # vLLM's quirk (spec 3.4) applies to vertical-slash heads; an A-shape head keeps n_init as given
        vert = tuple(v if a_shape and a_shape[h] else (130 if v == 30 else v)
                     for h, (v, _) in enumerate(self.budgets[l]))
        return SparseLayer(vertical=vert, slash=tuple(s for _, s in self.budgets[l]), last_q=self.last_q,
                           sink=self.sink, local=self.local, rope_theta=float(rope_theta),
                           a_shape=a_shape if any(a_shape) else ())

    def shard(self, rank: int, tp: int) -> "SparseConfig":
        """The heads of tensor-parallel rank `rank` of `tp`: [rank*N/tp, (rank+1)*N/tp), as vLLM keeps them."""
        n = self.num_heads
        if tp <= 0 or n % tp or not 0 <= rank < tp:
            raise ConfigError(f"sparse attention: cannot take rank {rank} of tensor_parallel={tp} from "
                              f"{n} heads")
        per = n // tp
        cut = lambda rows: tuple(b[rank * per:(rank + 1) * per] for b in rows)
        return dataclasses.replace(self, budgets=cut(self.budgets), head_offset=self.head_offset + rank * per,
                                   patterns=cut(self.patterns) if self.patterns else ())


@dataclasses.dataclass(frozen=True)
class SparseLayer:
    """One layer's static sparse settings, what the attention dispatcher needs (zenjax/attention/sparse.py)."""

    vertical: tuple      # [N] vertical budgets (quirk applied)
    slash: tuple         # [N] slash budgets
    last_q: int
    sink: int
    local: int
    rope_theta: float    # the estimator rotates q_intra to the critical positions (spec 2.2)
    a_shape: tuple = ()  # [N] True for A-shape heads (first `vertical` keys + `slash` nearest diagonals,
                         # no estimation); () when every head is vertical-slash

    def static_heads(self) -> tuple:
        """[N] bools: heads whose indices are fixed (A-shape) rather than estimated."""
        return self.a_shape or (False,) * len(self.vertical)


def sparse_config_from_json(entries: Any, cfg: ModelConfig, *, source: str,
                            dca_hf: Mapping[str, Any] | None = None) -> SparseConfig:
    """The one function that builds a SparseConfig: Qwen's per-head file content (spec 3.4) checked
    against the model, plus vLLM's knobs from a `dual_chunk_attention_config` dict (defaults when absent).
    Refuses (ConfigError naming `source` and the entry) a wrong number of layers or heads, an unknown
    pattern, or a budget that is not a non-negative integer."""
    def bad(where: str, why: str):
        raise ConfigError(f"{source}: {where}: {why}")

    if not isinstance(entries, list):
        bad("top level", f"expected a list of {cfg.num_layers} layers, got {type(entries).__name__}")
    if len(entries) != cfg.num_layers:
        bad("top level", f"{len(entries)} layers, the model has {cfg.num_layers}")
    want = {str(h) for h in range(cfg.num_heads)}
    budgets, patterns = [], []
    for l, layer in enumerate(entries):
        if not isinstance(layer, dict) or set(layer) != want:
            got = sorted(layer, key=lambda x: (len(x), x)) if isinstance(layer, dict) else type(layer).__name__
            bad(f"layer {l}", f"expected heads '0'..'{cfg.num_heads - 1}', got {str(got)[:80]}")
        row = []
        for h in range(cfg.num_heads):
            e = layer[str(h)]
            if not isinstance(e, (list, tuple)) or len(e) < 3:
                bad(f"layer {l}, head '{h}'", f"expected [pattern, vertical, slash, score], got {e!r}")
            if e[0] not in SPARSE_PATTERNS:
                bad(f"layer {l}, head '{h}'", f"pattern {e[0]!r} is not supported (only {SPARSE_PATTERNS})")
            for what, x in (("vertical budget", e[1]), ("slash budget", e[2])):
                if isinstance(x, bool) or not isinstance(x, int) or x < 0:
                    bad(f"layer {l}, head '{h}'", f"{what} {x!r} must be an integer >= 0")
            row.append((int(e[1]), int(e[2])))
        budgets.append(tuple(row))
        patterns.append(tuple(layer[str(h)][0] for h in range(cfg.num_heads)))
    d = dict(dca_hf or {})
    knobs = dict(threshold=int(d.get("sparse_attention_threshold", 32768)),
                 last_q=int(d.get("sparse_attention_last_q", 64)))
    any_a = any(p == "a_shape" for row in patterns for p in row)
    return SparseConfig(budgets=tuple(budgets), source=source, patterns=tuple(patterns) if any_a else (), **knobs)


def sparse_enabled(dca_hf: Mapping[str, Any] | None, file_present: bool) -> bool:
    """vLLM's `sparse_attention_enabled`: true when the file exists unless the config says otherwise."""
    return bool((dca_hf or {}).get("sparse_attention_enabled", file_present)) and file_present


def resolve_sparse(choice, cfg: ModelConfig, *, checkpoint_dir=None, meta: Mapping | None = None):
    """zenjax.load's `sparse=` -> SparseConfig or None (dense prefill).

    True: the checkpoint's `sparse_attention_config.json` (beside zenjax_config.json, else the copy the
    converter put into its metadata), None when it has none; False: off; a path: that file; a
    SparseConfig: used as is (checked against the model's layers and heads)."""
    import json
    from pathlib import Path
    if choice is False or choice is None:
        return None
    if isinstance(choice, SparseConfig):
        if choice.num_layers != cfg.num_layers or choice.num_heads != cfg.num_heads:
            raise ConfigError(f"sparse: SparseConfig has {choice.num_layers} layers x {choice.num_heads} "
                              f"heads, the model {cfg.num_layers} x {cfg.num_heads}")
        return choice
    # vLLM's knobs live in the HF config's dual_chunk_attention_config, kept in the checkpoint's metadata
    dca_hf = (((meta or {}).get("source") or {}).get("hf_config") or {}).get("dual_chunk_attention_config")
    if choice is True:
        f = Path(checkpoint_dir) / SPARSE_FILE if checkpoint_dir is not None else None
        if f is not None and f.is_file():
            choice = f
        elif (meta or {}).get("sparse_attention_config") is not None:
            if not sparse_enabled(dca_hf, True):
                return None
            return sparse_config_from_json(meta["sparse_attention_config"], cfg, dca_hf=dca_hf,
                                           source=f"{checkpoint_dir}/zenjax_config.json:sparse_attention_config")
        else:
            return None
    f = Path(choice)
    try:
        entries = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{f}: cannot read a sparse attention config ({e})") from e
    if not sparse_enabled(dca_hf, True):
        return None
    return sparse_config_from_json(entries, cfg, source=str(f), dca_hf=dca_hf)


def parse_sparse_choice(text: str):
    """The --sparse option of the server and the eval: 'auto' -> "auto" (zenjax.load's default), 'on' ->
    True (the checkpoint's file if any), 'off' -> False, else a path to a sparse_attention_config.json."""
    from pathlib import Path
    if text in ("auto", "on", "off"):
        return {"auto": "auto", "on": True, "off": False}[text]
    if not Path(text).is_file():
        raise ConfigError(f"--sparse {text!r}: expected auto, off, or an existing sparse_attention_config.json")
    return Path(text)
