"""Qwen2-MoE (Qwen1.5-MoE-A2.7B architecture, spec 1.2): config, converter, routing math, and parity with
transformers through the whole path (convert -> zenjax.load -> chunked prefill -> decode).

Fixtures: tests/fixtures/hf/moe (28/4 heads, 8 experts top-2, norm_topk_prob false, mlp_only_layers [1])
and moe_norm (MHA 4/4, 6 experts top-3, norm_topk_prob true, decoder_sparse_step 2), made by
scripts/make_moe_fixtures.py, which checks that every expert is routed to and no routing is a near tie.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import test_convert as tc          # module import: its tests are not collected again here
import zenjax
from conftest import read_hf_tensors
from zenjax.checkpoint import load_checkpoint, read_config
from zenjax.config import ConfigError, DCAConfig, MoEConfig, engine_config, model_config_from_hf
from zenjax.engine import Engine
from zenjax.moe import route, routed_experts
from zenjax.sampling import SamplingParams

U32 = 2.0 ** -24       # float32 unit roundoff
KW = dict(max_model_len=128, prefill_chunk=16, attention="reference", dtype="float32", verbose=False)
BF16 = np.dtype(ml_dtypes.bfloat16)


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def rounding_bound(cfg, hf: dict, logits: np.ndarray, T: int) -> float:
    """Worst-case relative logit difference (max |a - b| / max |ref|) between two float32 evaluations of
    the same network that differ only in rounding (summation order; tests/test_engine.py's model).

    A float32 dot product of n terms errs by <= n u sum_i |x_i w_i| (Higham eq. 3.5, u = 2^-24). The
    longest reduction has n = max(D, N*H, F, moe F, shared F, T keys) terms; the MoE sum over k <= 3
    experts and the float32 softmax add O(k + E) u, inside that. The relative error of a logit is amplified
    by A = sqrt(D) max_v ||lm_head[v]|| / max |logits| (Cauchy-Schwarz after the final RMSNorm), and each
    side rounds on its own: bound = 2 n u A. For "moe" (n = 112): A ~ 2.5, bound 2.5e-5..3.3e-5; observed
    4e-7..7e-7 (moe_norm: bound 1.1e-5..1.6e-5, observed <= 5e-7).
    Valid only while no top-k choice flips: the fixtures' smallest k-th vs (k+1)-th probability gap
    (route_gap >= 3e-4) is far above a probability's rounding error (<= 2 E u ~ 1e-6)."""
    m = cfg.moe
    n = max(cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.intermediate_size, m.moe_intermediate_size,
            m.shared_expert_intermediate_size, T)
    w = hf["lm_head.weight"].astype(np.float32)
    A = np.sqrt(cfg.hidden_size) * np.linalg.norm(w, axis=-1).max() / np.abs(logits).max()
    return 2 * n * U32 * A


def lengths(ref):
    return sorted(int(k.split("_")[1]) for k in ref.files if k.startswith("logits_"))


# --- parity with transformers ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["moe", "moe_norm"])
def test_logits_and_greedy_match_transformers(name, hf_fixture, converted):
    ref = np.load(hf_fixture(name) / "reference.npz")
    assert ref["route_gap"] > 100 * 2 * 8 * U32          # no top-k choice within rounding of a flip
    hf = read_hf_tensors(hf_fixture(name))
    # prefill_chunk 16: the 33- and 70-token prompts go through several chunks, the last one padded
    engine = zenjax.load(converted(name), **KW)
    cfg = engine.config
    assert cfg.moe is not None and any(cfg.is_moe_layer(l) for l in range(cfg.num_layers))
    assert not all(cfg.is_moe_layer(l) for l in range(cfg.num_layers))     # a dense layer too
    for T in lengths(ref):
        got, want = engine.logits(ref[f"ids_{T}"].tolist()), ref[f"logits_{T}"]
        assert got.shape == want.shape
        assert rel(got, want) <= rounding_bound(cfg, hf, want, T), (name, T, rel(got, want))
    res = engine.generate(ref["greedy_prompt"].tolist(), SamplingParams(max_new_tokens=24, ignore_eos=True))
    assert res.token_ids == ref["greedy_ids"].tolist()


def _engine(path, **moe_changes):
    cfg, _, params = load_checkpoint(path, put=lambda p, s, x: jnp.asarray(x))
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **moe_changes))
    ec = engine_config(max_model_len=128, prefill_chunk=16, attention="reference", dtype="float32")
    return Engine(cfg, params, ec, verbose=False)


@pytest.mark.parametrize("name,flip", [("moe", dict(norm_topk_prob=True)),
                                       ("moe_norm", dict(norm_topk_prob=False)),
                                       ("moe", dict(num_experts_per_tok=1))])
def test_fixtures_are_sensitive_to_the_routing_rule(name, flip, hf_fixture, converted):
    """Negative control: the same weights with the routing rule changed are far outside the bound, so the
    parity test above can fail on a routing mistake."""
    ref = np.load(hf_fixture(name) / "reference.npz")
    got = _engine(converted(name), **flip).logits(ref["ids_33"].tolist())
    assert rel(got, ref["logits_33"]) > 1e-2


def test_dca_runs_unchanged_on_moe(hf_fixture, converted):
    """DCA is attention-only: on the MoE fixture with DCA(32, 8, 32), prompts within chunk_size equal
    transformers' plain RoPE (same function there), longer ones differ (DCA really on)."""
    ref = np.load(hf_fixture("moe") / "reference.npz")
    hf = read_hf_tensors(hf_fixture("moe"))
    engine = zenjax.load(converted("moe"), dca=DCAConfig(32, 8, 32), **KW)
    for T in lengths(ref):
        got, want = engine.logits(ref[f"ids_{T}"].tolist()), ref[f"logits_{T}"]
        if T <= 32:
            assert rel(got, want) <= rounding_bound(engine.config, hf, want, T), T
        else:
            assert rel(got, want) > 1e-3, T


def test_batched_decode_equals_alone(hf_fixture, converted):
    """Two slots decoding together (MoE rows of both sequences routed in one grouped matmul) give each
    sequence the tokens it gets alone."""
    ref = np.load(hf_fixture("moe") / "reference.npz")
    p = SamplingParams(max_new_tokens=6, ignore_eos=True)
    prompts = [ref["ids_7"].tolist(), ref["ids_33"].tolist()]
    one = zenjax.load(converted("moe"), **KW)
    alone = [one.generate(ids, p).token_ids for ids in prompts]
    e = zenjax.load(converted("moe"), max_batch=2, **KW)
    toks = {}
    for slot, ids in enumerate(prompts):
        e.start(slot, ids, p)
        tok = None
        while tok is None:
            tok = e.prefill_next(slot)
        toks[slot] = [tok]
    for _ in range(5):
        a, b = e.decode([0, 1])
        toks[0].append(a)
        toks[1].append(b)
    assert [toks[0], toks[1]] == alone


# --- the routing and grouped-matmul math -------------------------------------------------------------------

def dense_reference(h, router, wg, wu, wd, k, norm):
    """Every token through every expert (float64 numpy), then the top-k weighted sum."""
    h, router, wg, wu, wd = (np.asarray(a, np.float64) for a in (h, router, wg, wu, wd))
    logits = h @ router
    prob = np.exp(logits - logits.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    idx = np.argsort(-prob, axis=-1)[:, :k]
    w = np.take_along_axis(prob, idx, -1)
    if norm:
        w /= w.sum(-1, keepdims=True)
    silu = lambda z: z / (1 + np.exp(-z))  # noqa: E731
    out = np.zeros_like(h)
    for m in range(h.shape[0]):
        for j in range(k):
            e = idx[m, j]
            out[m] += w[m, j] * ((silu(h[m] @ wg[e]) * (h[m] @ wu[e])) @ wd[e])
    return out, idx


@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("M,E,k,norm", [(1, 8, 2, False), (13, 6, 3, True), (40, 60, 4, False)])
def test_routed_experts_equal_dense_reference(M, E, k, norm, gather):
    """ragged_dot over expert-sorted rows, and the decode path that gathers each assignment's expert
    weights, == the per-token loop, including experts that get no rows (M=1: 2 of 8 used) and A2.7B's 60
    experts top-4. Bound: float32 vs float64, dot products of
    n = max(D, F) = 24 terms: |err| <= 3 n u sum|terms| per stage; inputs O(1) -> 1e-5 relative."""
    rng = np.random.default_rng(M)
    D, F = 16, 24
    h = rng.standard_normal((M, D)).astype(np.float32)
    router = (2 * rng.standard_normal((D, E)) / np.sqrt(D)).astype(np.float32)
    wg, wu = (rng.standard_normal((2, E, D, F)) / np.sqrt(D)).astype(np.float32)
    wd = (rng.standard_normal((E, F, D)) / np.sqrt(F)).astype(np.float32)
    want, want_idx = dense_reference(h, router, wg, wu, wd, k, norm)
    weights, experts = jax.jit(route, static_argnums=(2, 3))(h, router, k, norm)
    np.testing.assert_array_equal(np.asarray(experts), want_idx)
    if norm:
        np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, rtol=1e-6)
    got = jax.jit(lambda *a: routed_experts(*a, gather=gather))(h, weights, experts, wg, wu, wd)
    assert got.shape == (M, D)
    assert rel(np.asarray(got), want) <= 1e-5


# --- config ----------------------------------------------------------------------------------------------

A27B = dict(architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", vocab_size=151936,
            hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
            num_key_value_heads=16, num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
            shared_expert_intermediate_size=5632, norm_topk_prob=False, decoder_sparse_step=1,
            mlp_only_layers=[], rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False,
            max_position_embeddings=8192, qkv_bias=True, use_sliding_window=False)


def test_a27b_config():
    cfg = model_config_from_hf(A27B)
    assert cfg.moe == MoEConfig(60, 4, 1408, 5632, False, 1, ())
    assert all(cfg.is_moe_layer(l) for l in range(24))
    assert type(cfg).from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg     # checkpoint round trip
    step = model_config_from_hf(dict(A27B, decoder_sparse_step=2, mlp_only_layers=[3]))
    assert [l for l in range(8) if step.is_moe_layer(l)] == [1, 5, 7]
    assert model_config_from_hf(dict(A27B, num_experts=0)).moe is None          # HF: every layer dense
    dense = model_config_from_hf(dict(A27B, architectures=["Qwen2ForCausalLM"]))
    assert dense.moe is None and "moe" not in dense.to_dict()


@pytest.mark.parametrize("change,needle", [
    (dict(num_experts_per_tok=61), "num_experts_per_tok=61"),
    (dict(mlp_only_layers=[24]), "mlp_only_layers"),
    (dict(decoder_sparse_step=0), "decoder_sparse_step=0"),
    (dict(moe_intermediate_size=None), "moe_intermediate_size"),
    (dict(qkv_bias=False), "qkv_bias"),
])
def test_bad_moe_config_named(change, needle):
    with pytest.raises(ConfigError, match=needle):
        model_config_from_hf({k: v for k, v in dict(A27B, **change).items() if v is not None})


# --- converter ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["moe", "moe_norm"])
def test_moe_fixture_converts_exactly(name, hf_fixture, converted):
    """Expected layout from the HF names with explicit formulas (not zenjax/params.py):
    experts_w_gate[e, d, f] = experts.e.gate_proj.weight[f, d];  experts_w_down[e, f, d] = down_proj[d, f];
    router[d, e] = mlp.gate.weight[e, d];  shared_gate[d] = shared_expert_gate.weight[0, d]."""
    hf = read_hf_tensors(hf_fixture(name))
    cfg, meta, params = tc.load_np(converted(name))
    assert meta["source"]["architecture"] == "Qwen2MoeForCausalLM"
    want = {("embed",): hf["model.embed_tokens.weight"], ("final_norm",): hf["model.norm.weight"],
            ("lm_head",): hf["lm_head.weight"]}
    for l in range(cfg.num_layers):
        g = lambda s: hf[f"model.layers.{l}.{s}"]  # noqa: E731
        L = ("layers", str(l))
        want[L + ("attn_norm",)] = g("input_layernorm.weight")
        want[L + ("mlp_norm",)] = g("post_attention_layernorm.weight")
        want.update({L + (k,): v for k, v in tc.expected_attention(g, cfg).items()})
        if not cfg.is_moe_layer(l):
            want[L + ("w_gate_up",)] = np.stack([g("mlp.gate_proj.weight").T, g("mlp.up_proj.weight").T], axis=1)
            want[L + ("w_down",)] = g("mlp.down_proj.weight").T
            continue
        E = cfg.moe.num_experts
        want[L + ("router",)] = g("mlp.gate.weight").T
        for ours, proj in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            want[L + (f"experts_w_{ours}",)] = np.stack([g(f"mlp.experts.{e}.{proj}.weight").T for e in range(E)])
            want[L + (f"shared_w_{ours}",)] = g(f"mlp.shared_expert.{proj}.weight").T
        want[L + ("shared_gate",)] = g("mlp.shared_expert_gate.weight")[0]
    got = dict(tc.flat(params))
    assert set(got) == set(want)
    for p, w in want.items():
        np.testing.assert_array_equal(got[p], np.asarray(w).astype(np.float32), err_msg=str(p))


def test_cli_missing_expert_exit_2(hf_fixture, tmp_path):
    src = tc.copy_hf(hf_fixture("moe"), tmp_path / "src")
    tc.tamper(src, drop=["model.layers.0.mlp.experts.5.up_proj.weight"])
    dst = tmp_path / "out" / "model"
    r = subprocess.run([sys.executable, "-m", "zenjax.convert", "--hf", str(src), "--out", str(dst)],
                       capture_output=True, text=True, cwd=tc.REPO, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "missing tensor 'model.layers.0.mlp.experts.5.up_proj.weight'" in r.stderr, r.stderr
    assert not dst.exists() and not dst.parent.exists()


@pytest.mark.parametrize("num_experts,needles", [
    (7, ["layer 0: the checkpoint has 8 experts, config.json implies 7", "unexpected experts [7]",
         "unexpected tensor 'model.layers.0.mlp.experts.7.gate_proj.weight'"]),
    (9, ["layer 0: the checkpoint has 8 experts, config.json implies 9", "missing experts [8]",
         "missing tensor 'model.layers.0.mlp.experts.8.gate_proj.weight'"]),
])
def test_wrong_expert_count_refused(num_experts, needles, hf_fixture, tmp_path):
    src = tc.copy_hf(hf_fixture("moe"), tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_experts"] = num_experts
    (src / "config.json").write_text(json.dumps(cfg))
    tc.refuse(src, tmp_path / "dst", *needles)


def test_experts_on_a_dense_layer_refused(hf_fixture, tmp_path):
    """Layer 1 is dense (mlp_only_layers [1]): expert tensors there are named, with the reason."""
    src = tc.copy_hf(hf_fixture("moe"), tmp_path / "src")
    tc.tamper(src, add={"model.layers.1.mlp.experts.0.gate_proj.weight": np.zeros((16, 32), BF16)})
    tc.refuse(src, tmp_path / "dst", "layer 1: the checkpoint has 1 experts, config.json implies 0",
              "unexpected tensor 'model.layers.1.mlp.experts.0.gate_proj.weight'")


def test_moe_bf16_checkpoint_loads_as_stored(hf_fixture, converted):
    """bf16 on disk -> bfloat16 checkpoint: exact (no rounding: the fixture's values are bf16)."""
    hf = read_hf_tensors(hf_fixture("moe"))
    cfg, meta, params = tc.load_np(converted("moe", "bfloat16"))
    assert meta["dtype"] == "bfloat16" and read_config(converted("moe", "bfloat16"))[0] == cfg
    got = params["layers"]["0"]["experts_w_down"]
    assert got.dtype == BF16 and got.shape == (8, 16, 32)
    np.testing.assert_array_equal(got[3], hf["model.layers.0.mlp.experts.3.down_proj.weight"].T)


TP_SCRIPT = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import numpy as np, zenjax
ckpt, ref = sys.argv[1], np.load(sys.argv[2])
e = zenjax.load(ckpt, max_model_len=128, prefill_chunk=16, attention="reference", dtype="float32",
                tensor_parallel=4, verbose=False)
w = e.runner._state["layers"][0]["experts_w_gate"][...]
assert w.sharding.spec[2] == "tp" and len(w.sharding.device_set) == 4, w.sharding   # each expert's width
got, want = e.logits(ref["ids_70"].tolist()), ref["logits_70"]
print(float(np.abs(got - want).max() / np.abs(want).max()))
"""


def test_tensor_parallel_4_moe(hf_fixture, converted):
    """The MoE layers under a 4-device tensor-parallel mesh (simulated CPU devices, in a subprocess: the
    device count is fixed when JAX starts): experts split by width, same logits within the bound."""
    ref_path = hf_fixture("moe") / "reference.npz"
    r = subprocess.run([sys.executable, "-c", TP_SCRIPT, str(converted("moe")), str(ref_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg, _ = read_config(converted("moe"))
    ref = np.load(ref_path)
    bound = rounding_bound(cfg, read_hf_tensors(hf_fixture("moe")), ref["logits_70"], 70)
    assert float(r.stdout.split()[-1]) <= bound


@pytest.mark.parametrize("name", ["moe", "gqa7"])
def test_layout_round_trips_to_hf(name, hf_fixture):
    """to_hf_tensors inverts from_hf for every parameter (stacked experts included): the export path
    (benchmarks/passkey/train.py) writes back exactly the HF tensors."""
    from zenjax.params import from_hf_tensors, param_specs, to_hf_tensors
    hf = read_hf_tensors(hf_fixture(name))
    cfg = model_config_from_hf(json.loads((hf_fixture(name) / "config.json").read_text()))
    seen = set()
    for spec in param_specs(cfg).values():
        ours = from_hf_tensors(spec, hf)
        assert ours.shape == spec.shape
        for n, t in to_hf_tensors(spec, ours).items():
            np.testing.assert_array_equal(t, hf[n], err_msg=n)
            seen.add(n)
    assert seen == set(hf)
