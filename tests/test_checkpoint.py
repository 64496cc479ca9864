"""The zenjax checkpoint format: round trip, streaming load order, and clear errors on bad directories."""
from __future__ import annotations

import json
import shutil

import ml_dtypes
import numpy as np
import pytest

from zenjax.checkpoint import (CONFIG_FILE, CheckpointError, CheckpointWriter, items, load_checkpoint,
                               read_config, save_checkpoint)
from zenjax.config import DCAConfig, ModelConfig
from zenjax.params import nested_set, param_specs

CFG = ModelConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=3, num_heads=28,
                  num_kv_heads=4, head_dim=6, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  max_position_embeddings=256, dca=DCAConfig(64, 16, 64))


def random_params(cfg, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    tree: dict = {}
    for path, spec in param_specs(cfg).items():
        nested_set(tree, path, rng.standard_normal(spec.shape, dtype=np.float32).astype(dtype))
    return tree


def leaves(tree, prefix=()):
    for k, v in tree.items():
        yield from (leaves(v, prefix + (k,)) if isinstance(v, dict) else [(prefix + (k,), v)])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "m"
    params = random_params(CFG)
    save_checkpoint(path, CFG, params, dtype="bfloat16", generation={"eos_token_id": [7], "top_k": 20},
                    sparse_attention_config=[{"0": ["vertical_and_slash", 1000, 6096, 0.5]}],
                    source={"hf_path": "/x"})
    return path, params


def test_round_trip_bf16(saved):
    path, params = saved
    seen = []

    def put(p, spec, x):
        seen.append(p)
        assert spec == param_specs(CFG)[p] and x.shape == spec.shape and x.dtype == ml_dtypes.bfloat16
        return ("placed", x)                       # whatever put returns is what lands in the tree

    cfg, meta, got = load_checkpoint(path, put=put)
    assert cfg == CFG and cfg.dca.chunk_len == 48
    assert meta["dtype"] == "bfloat16" and meta["generation"] == {"eos_token_id": [7], "top_k": 20}
    assert meta["sparse_attention_config"][0]["0"][1] == 1000 and meta["source"] == {"hf_path": "/x"}
    assert "model" not in meta
    assert seen == list(param_specs(CFG))          # streamed in layout order: embed, layers 0..2, head
    for p, x in leaves(params):
        tag, y = dict(leaves(got))[p]
        assert tag == "placed"
        # exact: stored as x rounded to bf16 once
        np.testing.assert_array_equal(y, x.astype(ml_dtypes.bfloat16))


def test_default_put_gives_jax_arrays_and_dtype_cast(saved):
    import jax
    path, params = saved
    _, _, got = load_checkpoint(path, dtype="float32")
    w = got["layers"]["2"]["w_qkv"]
    assert isinstance(w, jax.Array) and w.dtype == np.float32 and w.shape == (16, 4, 9, 6)   # [D, K, G+2, H]
    np.testing.assert_array_equal(np.asarray(w),
                                  params["layers"]["2"]["w_qkv"].astype(ml_dtypes.bfloat16).astype(np.float32))


def test_one_item_per_layer_on_disk(saved):
    path, _ = saved
    names = list(items(CFG))
    assert names == ["embed", "layers/0", "layers/1", "layers/2", "final_norm", "lm_head"]
    for n in names:
        assert (path / "params" / n).is_dir(), n
    manifest = json.loads((path / "params" / "manifest.json").read_text())
    assert manifest["items"] == names and manifest["params"]["layers/1/wo"]["shape"] == [28, 6, 16]


def test_tied_has_no_lm_head(tmp_path):
    import dataclasses
    cfg = dataclasses.replace(CFG, tie_word_embeddings=True, dca=None)
    save_checkpoint(tmp_path / "t", cfg, random_params(cfg), dtype="float32")
    _, _, got = load_checkpoint(tmp_path / "t", put=lambda p, s, x: x)
    assert "lm_head" not in got and got["embed"].shape == (40, 16)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match=CONFIG_FILE):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="zenjax.convert"):      # an HF directory: say how to convert
        load_checkpoint(tmp_path)


def test_bad_config_file(tmp_path):
    (tmp_path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        read_config(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"format": 99, "model": {}}))
    with pytest.raises(CheckpointError, match="format"):
        read_config(tmp_path)
    # format 1 stored q/k/v and gate/up separately: named, with what to do
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"format": 1, "model": {}}))
    with pytest.raises(CheckpointError, match="format 1 .*convert the checkpoint again"):
        read_config(tmp_path)


def test_missing_and_corrupt_item(saved, tmp_path):
    path, _ = saved
    broken = tmp_path / "b"
    shutil.copytree(path, broken)
    shutil.rmtree(broken / "params" / "layers" / "1")
    with pytest.raises(CheckpointError, match="layers/1: missing checkpoint item"):
        load_checkpoint(broken, put=lambda p, s, x: x)
    shutil.copytree(path / "params" / "layers" / "1", broken / "params" / "layers" / "1")
    for f in (broken / "params" / "final_norm").rglob("*"):
        if f.is_file() and f.name not in ("_CHECKPOINT_METADATA", "commit_success.txt"):
            f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="final_norm"):
        load_checkpoint(broken, put=lambda p, s, x: x)


def test_writer_validates(tmp_path):
    w = CheckpointWriter(tmp_path / "w", CFG, "float32")
    params = random_params(CFG)
    with pytest.raises(ValueError, match="embed"):                    # wrong dtype
        w.write_item("embed", {"embed": params["embed"].astype(np.float16)})
    with pytest.raises(ValueError, match="embed"):                    # wrong shape
        w.write_item("embed", {"embed": params["embed"][:5]})
    with pytest.raises(ValueError, match="expected"):                 # an item missing a param
        w.write_item("layers/0", {"layers": {"0": {"wo": params["layers"]["0"]["wo"]}}})
    w.write_item("embed", {"embed": params["embed"]})
    with pytest.raises(ValueError, match="never written"):
        w.finish()
    assert not (tmp_path / "w" / CONFIG_FILE).exists()
