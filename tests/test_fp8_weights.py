"""fp8 weights (e4m3 values + one float32 scale per output channel, zenjax/fp8.py): the quantizer's
bound, the checkpoint layout written by `--quantization fp8`, the same weights quantized at load, and the
accuracy against bf16 weights on the transformers fixtures (dense and MoE)."""
from __future__ import annotations

import json
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

import conftest
import test_convert as tc          # module import: its tests are not collected again here
import zenjax
from zenjax.checkpoint import CheckpointError, read_config
from zenjax.convert import ConvertError, convert_checkpoint
from zenjax.fp8 import FP8_MAX, quantize
from zenjax.params import FP8_WEIGHTS, _stacked_linear, _linear, out_major_order

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
KW = dict(max_model_len=128, prefill_chunk=16, attention="reference", verbose=False)
U8 = 2.0 ** -4      # unit roundoff of e4m3 (3 mantissa bits)


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("spec", [_linear((6,), (3, 4), ("embed", "q_heads", "head_dim"), "wq"),
                                  _linear((3, 4), (6,), ("q_heads", "head_dim", "embed"), "wo"),
                                  _stacked_linear(5, (6,), (7,), ("experts", "embed", "expert_mlp"),
                                                  [f"e{i}" for i in range(5)])])
def test_quantize_per_output_channel(spec):
    """scale = max |w| over the input dims / 448 per output channel (and expert); every value dequantizes
    within e4m3's half ulp: |q s - w| <= u8 |w| in the normal range (|w| >= 2^-6 s), <= 2^-10 s below
    (subnormal spacing 2^-9)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal(spec.shape).astype(np.float32) * rng.uniform(0.01, 10, spec.shape[-1])
    q, s = quantize(spec, w)
    lead = 1 if spec.stacked else 0
    in_axes = tuple(range(lead, lead + spec.in_dims))
    order = out_major_order(spec)             # values come out-major: [E?, out..., in...]
    assert q.shape == tuple(spec.shape[i] for i in order)
    q = np.transpose(q, np.argsort(order))    # back to w's layout for the checks below
    assert q.dtype == E4M3 and s.dtype == np.float32
    assert s.shape == spec.shape[:lead] + spec.shape[lead + spec.in_dims:]
    np.testing.assert_allclose(s, np.abs(w).max(axis=in_axes) / FP8_MAX, rtol=1e-7)
    sb = s.reshape(s.shape[:lead] + (1,) * spec.in_dims + s.shape[lead:])
    err = np.abs(q.astype(np.float32) * sb - w)
    assert (err <= np.maximum(U8 * np.abs(w), 2.0 ** -10 * sb) * (1 + 1e-6)).all()
    assert np.abs(q.astype(np.float32)).max(axis=in_axes).min() == FP8_MAX      # full range per channel


def test_fp8_checkpoint_layout(hf_fixture, tmp_path):
    """--quantization fp8 (CLI): linear layers e4m3 + float32 scales, everything else as --dtype."""
    dst = tmp_path / "f8"
    r = subprocess.run([sys.executable, "-m", "zenjax.convert", "--hf", str(hf_fixture("moe")), "--out", str(dst),
                        "--dtype", "bfloat16", "--quantization", "fp8"], capture_output=True, text=True,
                       cwd=tc.REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    cfg, meta, params = tc.load_np(dst)
    assert meta["quantization"] == "fp8" and meta["dtype"] == "bfloat16"
    manifest = json.loads((dst / "params" / "manifest.json").read_text())["params"]
    for path, x in tc.flat(params):
        name = path[-1]
        want = "float8_e4m3fn" if name in FP8_WEIGHTS else "float32" if name.endswith("_scale") else "bfloat16"
        assert x.dtype == np.dtype(ml_dtypes.float8_e4m3fn if want == "float8_e4m3fn" else want), path
        assert manifest["/".join(path)]["dtype"] == want
    l0 = params["layers"]["0"]                                   # sparse layer: 8 experts, width 16
    assert l0["experts_w_down_scale"].shape == (8, 32) and l0["w_qkv_scale"].shape == (4, 9, 4)
    assert l0["router"].dtype == np.dtype(ml_dtypes.bfloat16)   # routing stays high precision
    # values out-major, HF's own [out, in] order: w_qkv [K, G+2, H, D] (q heads, k, v per kv head),
    # wo [D, N, H], experts_w_down [E, D, F];
    # each equals its HF tensor over the scale within e4m3's half ulp (|w| / s <= 448, so 2^-4 relative
    # above the subnormals and 2^-10 absolute in units of s below)
    hf = conftest.read_hf_tensors(hf_fixture("moe"))
    part = {"q": np.s_[:, :7], "k": np.s_[:, 7], "experts_w_down": 5}      # G = 7 q heads per kv head
    for name, hf_name, shape in (("q", "self_attn.q_proj.weight", (4, 7, 4, 32)),
                                 ("k", "self_attn.k_proj.weight", (4, 4, 32)),
                                 ("wo", "self_attn.o_proj.weight", (32, 28, 4)),
                                 ("experts_w_down", "mlp.experts.5.down_proj.weight", (32, 16))):
        stored = "w_qkv" if name in ("q", "k") else name
        q, sc = l0[stored], l0[stored + "_scale"]
        if name in part:
            q, sc = q[part[name]], sc[part[name]]
        assert q.shape == shape, (name, q.shape)
        w = hf["model.layers.0." + hf_name].astype(np.float32)
        ratio = (w.reshape(sc.size, -1) / sc.reshape(-1, 1)).reshape(q.shape)
        err = np.abs(q.astype(np.float32) - ratio)
        assert (err <= np.maximum(U8 * np.abs(ratio), 2.0 ** -10) * (1 + 1e-6)).all(), name
    # a checkpoint from before the out-major layout (no fp8_layout) is refused, naming the cure
    cfg_file = dst / "zenjax_config.json"
    old = json.loads(cfg_file.read_text())
    del old["fp8_layout"]
    cfg_file.write_text(json.dumps(old))
    with pytest.raises(CheckpointError, match="fp8_layout=None.*convert the checkpoint again"):
        zenjax.load(dst, **KW)
    r = subprocess.run([sys.executable, "-m", "zenjax.convert", "--hf", str(hf_fixture("moe")), "--out",
                        str(tmp_path / "bad"), "--quantization", "int4"], capture_output=True, text=True,
                       cwd=tc.REPO, timeout=120)
    assert r.returncode == 2 and "int4" in r.stderr and not (tmp_path / "bad").exists()
    with pytest.raises(ConvertError, match="int4"):
        convert_checkpoint(hf_fixture("moe"), tmp_path / "bad", quantization="int4", progress=False)


def noisy_engine(path, noise: float, seed: int = 0):
    """The float32 checkpoint with every FP8_WEIGHTS entry multiplied by (1 + d), d ~ U(-noise, noise) iid."""
    import jax.numpy as jnp
    from zenjax.checkpoint import load_checkpoint
    from zenjax.config import engine_config
    from zenjax.engine import Engine
    rng = np.random.default_rng(seed)

    def put(p, spec, x):
        if p[-1] in FP8_WEIGHTS:
            x = x * (1 + rng.uniform(-noise, noise, x.shape)).astype(np.float32)
        return jnp.asarray(x)
    cfg, _, params = load_checkpoint(path, put=put)
    ec = engine_config(max_model_len=128, prefill_chunk=16, attention="reference", dtype="float32")
    return Engine(cfg, params, ec, verbose=False)


@pytest.mark.parametrize("name", ["moe", "gqa7"])
def test_fp8_accuracy_matches_its_error_model(name, hf_fixture, converted, tmp_path):
    """Error model: with float32 activations the fp8 logits differ from the float32 reference only by the
    weight rounding, a relative error per weight within e4m3's half ulp u8 = 2^-4 (3 mantissa bits; per
    channel scaling keeps the weights in the normal range). To first order the logit error is linear in
    those errors, so it should be no larger than that of iid relative noise U(-u8, u8) on the same weights
    (the worst case of the rounding's range): bound 2x that for the max over positions and vocab. And it
    is real quantization: >= 1e3 x the float32 parity error (<= 1e-6 here). Quantizing at load gives the
    converter's fp8 weights exactly. Observed: moe 0.08-0.11 vs noise 0.08-0.12; gqa7 0.04-0.05 vs 0.07-0.08."""
    ref = np.load(hf_fixture(name) / "reference.npz")
    dst = tmp_path / "f8"
    convert_checkpoint(hf_fixture(name), dst, dtype="float32", quantization="fp8", progress=False)
    fp8 = zenjax.load(dst, dtype="float32", **KW)
    at_load = zenjax.load(converted(name), dtype="float32", quantization="fp8", **KW)
    noisy = noisy_engine(converted(name), U8)
    for T in (7, 70):
        ids, want = ref[f"ids_{T}"].tolist(), ref[f"logits_{T}"]
        got = fp8.logits(ids)
        np.testing.assert_array_equal(at_load.logits(ids), got)
        e8, enoise = rel(got, want), rel(noisy.logits(ids), want)
        assert 1e-3 < e8 <= 2 * enoise, (T, e8, enoise)


def test_fp8_halves_linear_weight_bytes(converted):
    """Device bytes of the linear layers: 1 byte per weight + 4 per output channel, vs 2 in bfloat16."""
    def nbytes(e, fp8):
        import jax
        total = 0
        for path, leaf in jax.tree_util.tree_flatten_with_path(e.runner._state)[0]:
            keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
            if any(k in FP8_WEIGHTS or (fp8 and isinstance(k, str) and k[:-6] in FP8_WEIGHTS) for k in keys):
                total += leaf.nbytes
        return total
    b16 = zenjax.load(converted("moe", "bfloat16"), **KW)
    f8 = zenjax.load(converted("moe", "bfloat16"), quantization="fp8", **KW)
    n16, n8 = nbytes(b16, False), nbytes(f8, True)
    assert n16 > 0 and n8 < 0.6 * n16, (n8, n16)
    assert read_config(converted("moe", "bfloat16"))[1]["quantization"] is None


@pytest.mark.parametrize("name", ["moe", "gqa7"])
def test_w8a8_accuracy_matches_its_error_model(name, hf_fixture, converted, monkeypatch):
    """layers.FP8_MATMUL = "w8a8" also rounds each activation row to e4m3 (scale max |x| / 448 per row)
    before the e4m3 x e4m3 product. Error model: a second rounding of the same kind as the weights', relative
    error within u8 per element and independent of the weight's, so to first order the logit error is a
    sum of two terms each bounded like the weight-only one: the bound is 2x that of the noisy-weight
    reference (test above) times sqrt(2) (two independent sources of the same size add in quadrature;
    observed 0.7-1.75x the noise: moe 0.14-0.15, gqa7 0.06-0.09). It must differ from weight-only fp8: activations really are rounded."""
    import jax
    from zenjax import layers
    ref = np.load(hf_fixture(name) / "reference.npz")
    weight_only = zenjax.load(converted(name), dtype="float32", quantization="fp8", **KW)
    wos = {T: weight_only.logits(ref[f"ids_{T}"].tolist()) for T in (7, 70)}
    # the mode is read when a step is traced: clear the compiled steps so they are traced again with it,
    # and again afterwards so no later test runs a w8a8 trace
    monkeypatch.setattr(layers, "FP8_MATMUL", "w8a8")
    jax.clear_caches()
    try:
        w8a8 = zenjax.load(converted(name), dtype="float32", quantization="fp8", **KW)
        gots = {T: w8a8.logits(ref[f"ids_{T}"].tolist()) for T in (7, 70)}
    finally:
        jax.clear_caches()
    noisy = noisy_engine(converted(name), U8)
    for T in (7, 70):
        ids, want = ref[f"ids_{T}"].tolist(), ref[f"logits_{T}"]
        got, wo = gots[T], wos[T]
        e, enoise = rel(got, want), rel(noisy.logits(ids), want)
        assert 1e-3 < e <= 2 * np.sqrt(2) * enoise, (T, e, enoise)
        assert rel(got, wo) > 1e-4, T           # not the weight-only path: >> float32 rounding (1e-6)
