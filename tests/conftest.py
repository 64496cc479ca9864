"""Shared pytest fixtures: the committed HF reference checkpoints, their conversions, random HF checkpoints.

    hf_fixture(name) -> Path            tests/fixtures/hf/<name> (gqa7, mha_tied, odd_head_dim, deep, dca;
                                        Qwen2-MoE: moe, moe_norm), each with reference.npz (see
                                        scripts/make_hf_fixtures.py, scripts/make_moe_fixtures.py)
    converted(name_or_path, dtype="float32") -> Path
                                        that checkpoint converted to zenjax (session cache in tmp)
    make_hf(name, shards=1, dtype="float32", seed=0, **config_overrides) -> Path
                                        a random Qwen2 HF directory written with numpy (no torch), e.g.
                                        make_hf("big_vocab", vocab_size=1000); an override of None
                                        drops that config.json key; session cache by arguments

The random builder names and shapes the tensors the Hugging Face way, independently of zenjax/params.py,
so converter tests built on it check the layout too.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

# Synchronous CPU dispatch: a jitted call runs on the thread that makes it. Why: Mosaic GPU interpret mode
# (tests/test_dca_prefill_mgpu.py, the sparse kernel's tests) runs each warpgroup as a jitted computation
# on its own Python thread, and their barrier waits are host callbacks that block. With async dispatch the
# computations are handed to XLA's CPU worker threads, and a fresh clone's suite hung once (2026-12-07, two
# suites side by side on 2 cores) with two warpgroups' callbacks blocked in a barrier on those threads
# while the third warpgroup's computation waited to run (our reading of the thread dump: a starved pool).
# Results do not change, only when a call returns. Set before any test touches a backend.
jax.config.update("jax_cpu_enable_async_dispatch", False)
# float32 products in float32. The float32 tolerances (e.g. test_pallas_kernels' TOL32 = 2e-5) are error
# models of float32 arithmetic; JAX's default on recent NVIDIA GPUs computes float32 dots in TF32 (10-bit
# mantissa, ~5e-4 relative). On an H100 (2026-12-07) test_pallas_kernels' three interpret-mode decode tests
# failed without this setting (2.5e-4 against 2e-5, the size of TF32 rounding) and passed with it.
# On the CPU this changes nothing; bf16 inputs are unaffected.
jax.config.update("jax_default_matmul_precision", "highest")

FIXTURES_HF = Path(__file__).resolve().parent / "fixtures" / "hf"
HF_FIXTURES = ("gqa7", "mha_tied", "odd_head_dim", "deep", "dca")

# make_hf's default: Qwen's 28/4 head layout (group 7) at head_dim 8, tiny everything else.
TINY_QWEN2 = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=96, hidden_size=32,
                  intermediate_size=48, num_hidden_layers=2, num_attention_heads=28, num_key_value_heads=4,
                  head_dim=8, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  max_position_embeddings=4096, hidden_act="silu", torch_dtype="float32")


def hf_tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """HF Qwen2 state dict names -> shapes (nn.Linear weights are [out, in])."""
    D, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    N, K = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    H = cfg.get("head_dim") or D // N
    out = {"model.embed_tokens.weight": (V, D)}
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        out.update({p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                    p + "self_attn.q_proj.weight": (N * H, D), p + "self_attn.q_proj.bias": (N * H,),
                    p + "self_attn.k_proj.weight": (K * H, D), p + "self_attn.k_proj.bias": (K * H,),
                    p + "self_attn.v_proj.weight": (K * H, D), p + "self_attn.v_proj.bias": (K * H,),
                    p + "self_attn.o_proj.weight": (D, N * H),
                    p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
                    p + "mlp.down_proj.weight": (D, F)})
    out["model.norm.weight"] = (D,)
    if not cfg.get("tie_word_embeddings"):
        out["lm_head.weight"] = (V, D)
    return out


def write_hf_dir(out: Path, cfg: dict, tensors: dict[str, np.ndarray], shards: int = 1) -> Path:
    """config.json + model.safetensors, or `shards` files model-0000i-of-0000n.safetensors + index."""
    from safetensors.numpy import save_file
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if shards == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return out
    names = list(tensors)
    wmap = {}
    for i, part in enumerate(np.array_split(np.arange(len(names)), shards)):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({names[j]: tensors[names[j]] for j in part}, str(out / fname), metadata={"format": "pt"})
        wmap.update({names[j]: fname for j in part})
    total = sum(int(t.nbytes) for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": wmap}, indent=2) + "\n")
    return out


def random_hf_tensors(cfg: dict, dtype: str = "float32", seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype) if dtype != "bfloat16" else np.dtype(__import__("ml_dtypes").bfloat16)
    return {name: rng.standard_normal(shape, dtype=np.float32).astype(dt)
            for name, shape in hf_tensor_shapes(cfg).items()}


def read_hf_tensors(src: Path) -> dict[str, np.ndarray]:
    """Every tensor of an HF directory (single file or shards)."""
    from safetensors.numpy import load_file
    out = {}
    for f in sorted(Path(src).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="session")
def hf_fixture():
    def get(name: str) -> Path:
        path = FIXTURES_HF / name
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no such HF fixture (run scripts/make_hf_fixtures.py)")
        return path
    return get


@pytest.fixture(scope="session")
def make_hf(tmp_path_factory):
    cache: dict = {}

    def make(name: str = "tiny", shards: int = 1, dtype: str = "float32", seed: int = 0, **overrides) -> Path:
        key = (name, shards, dtype, seed, json.dumps(overrides, sort_keys=True))
        if key not in cache:
            cfg = {k: v for k, v in dict(TINY_QWEN2, **overrides).items() if v is not None}
            out = tmp_path_factory.mktemp("hf") / name
            cache[key] = write_hf_dir(out, cfg, random_hf_tensors(cfg, dtype, seed), shards)
        return cache[key]
    return make


@pytest.fixture(scope="session")
def converted(tmp_path_factory, hf_fixture):
    from zenjax.convert import convert_checkpoint
    cache: dict = {}

    def get(name_or_path, dtype: str = "float32") -> Path:
        src = Path(name_or_path) if isinstance(name_or_path, Path) else hf_fixture(name_or_path)
        key = (str(src), dtype)
        if key not in cache:
            out = tmp_path_factory.mktemp("zenjax") / f"{src.name}-{dtype}"
            convert_checkpoint(src, out, dtype=dtype, progress=False)
            cache[key] = out
        return cache[key]
    return get
