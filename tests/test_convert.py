"""The HF -> zenjax converter: exact weights, metadata, dtypes, sharded input, and every refusal.

Layout expectations are written here from the HF conventions (nn.Linear weight [out, in], heads
flattened as n*H + h), not taken from zenjax/params.py, so a wrong transform there fails these tests.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from conftest import HF_FIXTURES, random_hf_tensors, read_hf_tensors, write_hf_dir
from zenjax.checkpoint import load_checkpoint, read_config
from zenjax.convert import ConvertError, convert_checkpoint
from zenjax.convert.hf import HFSource
from zenjax.convert.progress import Progress

REPO = Path(__file__).resolve().parent.parent
BF16 = np.dtype(ml_dtypes.bfloat16)


def load_np(path, dtype=None):
    """load_checkpoint with host numpy arrays; also checks `put` gets each array with its own spec."""
    def put(p, spec, x):
        assert isinstance(x, np.ndarray) and tuple(x.shape) == spec.shape, p
        return x
    return load_checkpoint(path, dtype=dtype, put=put)


def expected_attention(g, cfg) -> dict[str, np.ndarray]:
    """A layer's attention params from its HF tensors (g(name) -> tensor) with explicit index formulas,
    G = N / K:  w_qkv[d, k, j, h] = q_proj.weight[(k*G + j)*H + h, d] for j < G, k_proj.weight[k*H + h, d]
    for j = G, v_proj.weight[k*H + h, d] for j = G+1 (biases alike);  wo[n, h, d] = o_proj.weight[d, n*H + h]."""
    D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    G = N // K
    w = np.zeros((D, K, G + 2, H), np.float32)
    b = np.zeros((K, G + 2, H), np.float32)
    q, k_, v = (g(f"self_attn.{x}_proj.weight") for x in "qkv")
    qb, kb, vb = (g(f"self_attn.{x}_proj.bias") for x in "qkv")
    for k in range(K):
        for h in range(H):
            for j in range(G):
                w[:, k, j, h], b[k, j, h] = q[(k * G + j) * H + h], qb[(k * G + j) * H + h]
            w[:, k, G, h], b[k, G, h] = k_[k * H + h], kb[k * H + h]
            w[:, k, G + 1, h], b[k, G + 1, h] = v[k * H + h], vb[k * H + h]
    return {"w_qkv": w, "b_qkv": b, "wo": g("self_attn.o_proj.weight").reshape(D, N, H).transpose(1, 2, 0)}


def expected_params(hf: dict[str, np.ndarray], cfg) -> dict[tuple, np.ndarray]:
    """Our layout computed from HF tensors with explicit index formulas (expected_attention;
    w_gate_up[d, 0, f] = gate_proj.weight[f, d], [d, 1, f] = up_proj.weight[f, d]; w_down[f, d] = down[d, f])."""
    out = {("embed",): hf["model.embed_tokens.weight"], ("final_norm",): hf["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        out[("lm_head",)] = hf["lm_head.weight"]
    for l in range(cfg.num_layers):
        g = lambda s: hf[f"model.layers.{l}.{s}"]  # noqa: E731
        L = ("layers", str(l))
        out[L + ("attn_norm",)] = g("input_layernorm.weight")
        out[L + ("mlp_norm",)] = g("post_attention_layernorm.weight")
        out.update({L + (k,): v for k, v in expected_attention(g, cfg).items()})
        out[L + ("w_gate_up",)] = np.stack([g("mlp.gate_proj.weight").T, g("mlp.up_proj.weight").T], axis=1)
        out[L + ("w_down",)] = g("mlp.down_proj.weight").T
    return out


def flat(tree, prefix=()):
    for k, v in tree.items():
        yield from (flat(v, prefix + (k,)) if isinstance(v, dict) else [(prefix + (k,), v)])


def assert_params_equal(params, cfg, hf, dtype=np.float32):
    got = dict(flat(params))
    want = expected_params(hf, cfg)
    assert set(got) == set(want)
    for p, w in want.items():
        assert got[p].dtype == dtype, p
        # exact: a transform only moves values; a dtype cast rounds each value the one way numpy does
        np.testing.assert_array_equal(got[p], np.asarray(w).astype(dtype), err_msg=str(p))


# --- successful conversions ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", HF_FIXTURES)
def test_fixture_converts_exactly(name, hf_fixture, converted):
    cfg, meta, params = load_np(converted(name))
    hf_cfg = json.loads((hf_fixture(name) / "config.json").read_text())
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (
        hf_cfg["num_hidden_layers"], hf_cfg["num_attention_heads"], hf_cfg["num_key_value_heads"])
    assert cfg.head_dim == (hf_cfg.get("head_dim") or hf_cfg["hidden_size"] // hf_cfg["num_attention_heads"])
    assert cfg.rope_theta == 1e6 and cfg.rms_norm_eps == 1e-6
    assert cfg.tie_word_embeddings == hf_cfg["tie_word_embeddings"]
    assert ("lm_head" in params) == (not cfg.tie_word_embeddings)
    assert meta["dtype"] == "float32" and meta["source"]["hf_config"] == hf_cfg
    assert_params_equal(params, cfg, read_hf_tensors(hf_fixture(name)))


def test_metadata_dca_sparse_generation(hf_fixture, converted):
    cfg, meta = read_config(converted("dca"))
    assert cfg.dca is not None and cfg.dca.to_hf() == {"chunk_size": 64, "local_size": 16,
                                                      "original_max_position_embeddings": 64}
    sparse = json.loads((hf_fixture("dca") / "sparse_attention_config.json").read_text())
    assert meta["sparse_attention_config"] == sparse and len(sparse) == cfg.num_layers

    out = converted("gqa7")
    cfg, meta = read_config(out)
    src_gen = hf_fixture("gqa7") / "generation_config.json"
    assert (out / "generation_config.json").read_bytes() == src_gen.read_bytes()   # copied verbatim
    gen = json.loads(src_gen.read_text())
    assert meta["generation"] == gen          # every field kept, eos already a list here
    assert meta["sparse_attention_config"] is None and cfg.dca is None


def test_generation_falls_back_to_config_ids(make_hf, converted):
    """No generation_config.json: eos/bos come from config.json, eos as a list."""
    src = make_hf("ids", eos_token_id=5, bos_token_id=4)
    _, meta = read_config(converted(src))
    assert meta["generation"]["eos_token_id"] == [5] and meta["generation"]["bos_token_id"] == 4


@pytest.mark.parametrize("dtype,npdt", [("bfloat16", BF16), ("float16", np.dtype(np.float16))])
def test_dtype_honoured(dtype, npdt, hf_fixture, converted):
    out = converted("gqa7", dtype)
    cfg, meta, params = load_np(out)
    assert meta["dtype"] == dtype
    assert_params_equal(params, cfg, read_hf_tensors(hf_fixture("gqa7")), dtype=npdt)
    # load-time cast back to float32 is exact (bf16/fp16 -> f32 widens)
    _, _, p32 = load_np(out, dtype="float32")
    np.testing.assert_array_equal(p32["layers"]["1"]["w_qkv"], params["layers"]["1"]["w_qkv"].astype(np.float32))


def test_sharded_bf16_source(make_hf, converted, tmp_path):
    """3 shards + index, bf16 on disk -> float32 checkpoint equal to the bf16 values widened."""
    src = make_hf("sharded", shards=3, dtype="bfloat16", seed=3)
    assert len(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    cfg, _, params = load_np(converted(src, "float32"))
    assert_params_equal(params, cfg, read_hf_tensors(src))


def test_sharded_copy_of_fixture_equals_single_file(hf_fixture, converted, tmp_path):
    src = hf_fixture("deep")
    hf = read_hf_tensors(src)
    cfg_json = json.loads((src / "config.json").read_text())
    two = write_hf_dir(tmp_path / "deep2", cfg_json, hf, shards=2)
    _, _, a = load_np(converted(two))
    _, _, b = load_np(converted("deep"))
    for (p, x), (q, y) in zip(sorted(flat(a)), sorted(flat(b))):
        assert p == q
        np.testing.assert_array_equal(x, y)


def test_transformers5_rope_parameters(make_hf, converted):
    """config.json as transformers >= 5 saves it: no top-level rope_theta, only rope_parameters."""
    src = make_hf("rope5", rope_theta=None, rope_parameters={"rope_theta": 5e6, "rope_type": "default"})
    cfg, _ = read_config(converted(src))
    assert cfg.rope_theta == 5e6


def test_harmless_extras_accepted(make_hf, tmp_path):
    """rotary inv_freq buffers and a tied lm_head copy are ignored, not refused."""
    src = copy_hf(make_hf("tied", tie_word_embeddings=True), tmp_path / "src")
    hf = read_hf_tensors(src)
    hf["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    hf["lm_head.weight"] = hf["model.embed_tokens.weight"].copy()
    write_hf_dir(src, json.loads((src / "config.json").read_text()), hf)
    convert_checkpoint(src, tmp_path / "out", dtype="float32", progress=False)
    cfg, _, params = load_np(tmp_path / "out")
    assert cfg.tie_word_embeddings and "lm_head" not in params


def test_force_replaces_and_empty_dst_is_fine(make_hf, tmp_path):
    src = make_hf()
    dst = tmp_path / "dst"
    dst.mkdir()                                     # empty DST: allowed
    convert_checkpoint(src, dst, dtype="float32", progress=False)
    (dst / "marker").write_text("old")
    convert_checkpoint(src, dst, dtype="bfloat16", progress=False, force=True)
    assert not (dst / "marker").exists() and read_config(dst)[1]["dtype"] == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]    # no temp or old dirs left


# --- refusals: exit code 2 / ConvertError, culprit named, nothing at DST ---------------------------------

def copy_hf(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def tamper(src: Path, drop=(), add=None, reshape=None) -> None:
    hf = read_hf_tensors(src)
    for k in drop:
        del hf[k]
    hf.update(add or {})
    for k, shape in (reshape or {}).items():
        hf[k] = np.zeros(shape, np.float32)
    for f in src.glob("*.safetensors"):
        f.unlink()
    write_hf_dir(src, json.loads((src / "config.json").read_text()), hf)


def refuse(src: Path, dst: Path, *needles: str, **kw) -> str:
    with pytest.raises(ConvertError) as e:
        convert_checkpoint(src, dst, progress=False, **kw)
    msg = str(e.value)
    for n in needles:
        assert n in msg, (n, msg)
    assert not dst.exists()
    assert [p.name for p in dst.parent.iterdir() if "zenjax-tmp" in p.name] == []
    return msg


def test_cli_unknown_architecture_exit_2(make_hf, tmp_path):
    src = copy_hf(make_hf(), tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (src / "config.json").write_text(json.dumps(cfg))
    dst = tmp_path / "out" / "model"
    r = subprocess.run([sys.executable, "-m", "zenjax.convert", "--hf", str(src), "--out", str(dst)],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "LlamaForCausalLM" in r.stderr and "config.json" in r.stderr
    assert not dst.exists() and not dst.parent.exists()


def test_cli_success_exit_0_quiet_when_not_a_tty(make_hf, tmp_path):
    dst = tmp_path / "ok"
    r = subprocess.run([sys.executable, "-m", "zenjax.convert", "--hf", str(make_hf()), "--out", str(dst),
                        "--dtype", "float16"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "[" not in r.stderr            # no progress bar drawn into a pipe
    assert read_config(dst)[1]["dtype"] == "float16"


def test_missing_tensor(make_hf, tmp_path):
    src = copy_hf(make_hf(), tmp_path / "src")
    tamper(src, drop=["model.layers.1.mlp.up_proj.weight"])
    refuse(src, tmp_path / "dst", "missing tensor 'model.layers.1.mlp.up_proj.weight'")


def test_unexpected_tensor(make_hf, tmp_path):
    src = copy_hf(make_hf(), tmp_path / "src")
    tamper(src, add={"model.layers.2.mlp.up_proj.weight": np.zeros((48, 32), np.float32)})
    refuse(src, tmp_path / "dst", "unexpected tensor 'model.layers.2.mlp.up_proj.weight'")


def test_wrong_shape(make_hf, tmp_path):
    src = copy_hf(make_hf(), tmp_path / "src")
    tamper(src, reshape={"model.layers.0.self_attn.k_proj.weight": (40, 32)})
    refuse(src, tmp_path / "dst", "model.layers.0.self_attn.k_proj.weight", "[40, 32]", "[32, 32]")


def test_config_field_disagrees_with_tensors(make_hf, tmp_path):
    """config.json says intermediate_size 50 but the MLP tensors are 48 wide: every MLP tensor is named."""
    src = copy_hf(make_hf(), tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 50
    (src / "config.json").write_text(json.dumps(cfg))
    refuse(src, tmp_path / "dst", "model.layers.0.mlp.gate_proj.weight", "[50, 32]")


def test_missing_config_field(make_hf, tmp_path):
    src = copy_hf(make_hf(), tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (src / "config.json").write_text(json.dumps(cfg))
    refuse(src, tmp_path / "dst", "num_hidden_layers")


@pytest.mark.parametrize("how", ["truncated", "garbage_header"])
def test_unreadable_safetensors(how, make_hf, tmp_path):
    src = copy_hf(make_hf(), tmp_path / "src")
    f = src / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:len(data) // 2] if how == "truncated" else b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}   ")
    refuse(src, tmp_path / "dst", "model.safetensors", "unreadable")


def test_nan_weights_refused(make_hf, tmp_path):
    """A header that parses but data that is garbage (NaN) is caught while streaming; the temp dir goes."""
    src = copy_hf(make_hf(), tmp_path / "src")
    tamper(src, add={"model.layers.1.mlp.down_proj.weight": np.full((32, 48), np.nan, np.float32)})
    refuse(src, tmp_path / "dst", "model.layers.1.mlp.down_proj.weight", "NaN")


def test_float16_overflow_refused(make_hf, tmp_path):
    src = copy_hf(make_hf(), tmp_path / "src")
    tamper(src, add={"model.norm.weight": np.full((32,), 1e5, np.float32)})   # > float16 max 65504
    refuse(src, tmp_path / "dst", "model.norm.weight", "float16", dtype="float16")


def test_index_names_absent_shard(make_hf, tmp_path):
    src = copy_hf(make_hf("sh2", shards=2), tmp_path / "src")
    victim = sorted(src.glob("model-*.safetensors"))[1]
    victim.unlink()
    refuse(src, tmp_path / "dst", victim.name, "not found")


def test_missing_config_json(make_hf, tmp_path):
    src = copy_hf(make_hf(), tmp_path / "src")
    (src / "config.json").unlink()
    refuse(src, tmp_path / "dst", "config.json", "not found")


@pytest.mark.parametrize("content", ["{broken", '{"eos_token_id": "</s>"}'])
def test_bad_generation_config(content, make_hf, tmp_path):
    src = copy_hf(make_hf(), tmp_path / "src")
    (src / "generation_config.json").write_text(content)
    refuse(src, tmp_path / "dst", "generation_config.json")


def test_no_weights(make_hf, tmp_path):
    src = copy_hf(make_hf(), tmp_path / "src")
    (src / "model.safetensors").unlink()
    refuse(src, tmp_path / "dst", "model.safetensors")


def test_bad_dtype(make_hf, tmp_path):
    refuse(make_hf(), tmp_path / "dst", "int8", dtype="int8")


def test_existing_dst_untouched(make_hf, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(ConvertError, match="not empty.*--force"):
        convert_checkpoint(make_hf(), dst, progress=False)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]


def test_interrupt_mid_write_leaves_nothing(make_hf, tmp_path, monkeypatch):
    """KeyboardInterrupt after some items were written: DST absent, temp dir removed."""
    calls = {"n": 0}
    real = HFSource.read

    def read(self, spec, dtype):
        calls["n"] += 1
        if calls["n"] == 12:           # item "layers/1" (7 reads a layer): embed and layers/0 are on disk
            raise KeyboardInterrupt
        return real(self, spec, dtype)

    monkeypatch.setattr(HFSource, "read", read)
    dst = tmp_path / "a" / "b"
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(make_hf(), dst, dtype="float32", progress=False)
    assert calls["n"] == 12 and list(tmp_path.iterdir()) == []   # parents we created are gone too


def test_progress_bar_only_when_enabled():
    s = io.StringIO()
    with Progress(2_000_000_000, enabled=True, label="converting", stream=s) as bar:
        bar.update(1_000_000_000, "layers/0")
        assert " 50%" in s.getvalue()
        bar.update(1_000_000_000, "layers/1")
    out = s.getvalue()
    assert "converting [" in out and "100%" in out and "2.0/2.0 GB" in out
    s = io.StringIO()                  # StringIO is not a tty: auto mode stays quiet
    with Progress(10, stream=s) as bar:
        bar.update(10)
    assert s.getvalue() == ""
