"""zenjax.eval.passkey: the prompt generator (determinism, token length, depth placement, any tokenizer),
the scoring, the evaluation table / JSON / CLI, and benchmarks/passkey/train.py's export (HF directory ->
zenjax.convert -> zenjax.load gives the training forward's logits)."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from zenjax.eval import passkey as pk
from zenjax.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
FIXTURE_TOKENIZER = ROOT / "tests" / "fixtures" / "tokenizer"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(FIXTURE_TOKENIZER)


def max_sentence_tokens(enc) -> int:
    return max(len(enc(" " + s)) for s in pk.BLOG_FILLER + pk.EXTRA_FILLER)


def test_prompt_is_deterministic_in_seed(tok):
    a = pk.make_prompt(tok, 600, 0.3, seed=7)
    b = pk.make_prompt(tok, 600, 0.3, seed=7)
    c = pk.make_prompt(tok, 600, 0.3, seed=8)
    assert a == b
    assert (a.key, a.text) != (c.key, c.text)
    assert len(a.key) == 5 and a.key.isdigit() and a.key[0] != "0"
    assert pk.KEY_SENTENCE.format(key=a.key) in a.text and a.text.endswith(pk.QUESTION)
    # the key is the only number in the prompt
    assert set(ch for ch in a.text if ch.isdigit()) <= set(a.key)
    assert a.text.count(a.key) == 2


@pytest.mark.parametrize("length", [110, 257, 1000, 3000])   # lengths that are not round numbers too
def test_prompt_length_in_tokens(tok, length):
    enc = pk.as_encoder(tok)
    p = pk.make_prompt(tok, length, 0.5, seed=length)
    assert p.ids == enc(p.text)                      # ids are the tokenizer's encoding of the text
    # at most `length`, and short of it by less than one filler sentence
    assert length - max_sentence_tokens(enc) < len(p.ids) <= length
    assert pk.make_prompt(tok, length, 0.5, seed=length, exact=False) == p


def test_prompt_too_short_is_refused(tok):
    with pytest.raises(ValueError, match="too short"):
        pk.make_prompt(tok, 50, 0.5, seed=0)
    with pytest.raises(ValueError, match="depth"):
        pk.make_prompt(tok, 500, 1.5, seed=0)


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
def test_depth_placement(tok, depth):
    enc = pk.as_encoder(tok)
    p = pk.make_prompt(tok, 2000, depth, seed=3)
    instr = len(enc(pk.INSTRUCTION))
    key_len = len(enc(" " + pk.KEY_SENTENCE.format(key=p.key)))
    # the key sentence really starts at key_token_start
    assert p.ids[p.key_token_start:p.key_token_start + key_len] == enc(" " + pk.KEY_SENTENCE.format(key=p.key))
    # its offset into the haystack is depth x haystack, up to half a sentence (boundaries are sentences)
    offset = p.key_token_start - instr
    assert abs(offset - depth * p.haystack_tokens) <= max_sentence_tokens(enc) / 2 + 1
    if depth == 0.0:
        assert p.key_token_start == instr
    if depth == 1.0:
        assert p.ids[p.key_token_start + key_len:] == enc(" " + pk.QUESTION)


def test_any_tokenizer_character_level():
    """A tokenizer that is just a callable (one id per character): lengths are counted in its tokens."""
    chars = lambda s: [ord(c) for c in s]
    p = pk.make_prompt(chars, 5000, 0.4, seed=1)
    assert len(p.text) == len(p.ids) <= 5000 and len(p.ids) > 5000 - 40
    assert p.text[p.key_token_start:].startswith(" The pass key is " + p.key)


def test_scoring_and_parsing():
    assert pk.is_correct("71432", " 71432.")
    assert pk.is_correct("71432", "71432 is the pass key")
    assert not pk.is_correct("71432", " 7143.")
    assert not pk.is_correct("71432", " 714321")
    assert not pk.is_correct("71432", " no idea")
    assert pk.parse_length("2k") == 2048 and pk.parse_length("128K") == 131072 and pk.parse_length("3000") == 3000
    for bad in ("", "2m", "-1", "0k"):
        with pytest.raises(ValueError):
            pk.parse_length(bad)
    assert pk.depth_grid(5) == [0.0, 0.25, 0.5, 0.75, 1.0] and pk.depth_grid(1) == [0.5]


class _FakeBackend:
    """Answers right when the key is in the first half of the haystack; wrong otherwise."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []

    def describe(self):
        return {"backend": "fake", "dca": None}

    def answer(self, prompt, length):
        self.calls.append((length, len(prompt.ids)))
        return f" {prompt.key}." if prompt.depth < 0.5 else " 12345."


def test_evaluate_table_and_json(tok, tmp_path):
    backend = _FakeBackend(tok)
    r = pk.evaluate(backend, [300, 600], pk.depth_grid(4), samples=2, seed=5, progress=False)
    assert r["accuracy"] == [[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]
    assert r["per_length"] == {"300": 0.5, "600": 0.5}
    assert len(backend.calls) == 2 * 4 * 2
    # prompts leave ANSWER_RESERVE tokens of each length for the answer
    assert all(n <= L - pk.ANSWER_RESERVE for L, n in backend.calls)
    table = pk.format_table(r).splitlines()
    assert table[0].split() == ["depth", "300", "600"] and table[1].split() == ["0%", "100%", "100%"]
    paths = pk.write_outputs(r, tmp_path, "fake")
    loaded = json.loads(paths[0].read_text())
    assert loaded["accuracy"] == r["accuracy"] and loaded["cells"][0]["answers"][0]["correct"] is True
    # the same seed gives the same prompts (keys) again
    r2 = pk.evaluate(_FakeBackend(tok), [300, 600], pk.depth_grid(4), samples=2, seed=5, progress=False)
    assert [a["key"] for c in r["cells"] for a in c["answers"]] == \
        [a["key"] for c in r2["cells"] for a in c["answers"]]


def test_evaluate_time_budget_marks_skipped_cells(tok):
    r = pk.evaluate(_FakeBackend(tok), [300], pk.depth_grid(3), max_seconds=-1.0, progress=False)
    assert r["accuracy"] == [[None, None, None]] and len(r["skipped"]) == 3 and r["per_length"] == {"300": None}
    assert "-" in pk.format_table(r)


def test_cli_on_embedded_model(tmp_path, capsys):
    """The full CLI path on the shipped model at a tiny length (engine, chunked prefill, decode)."""
    from zenjax.eval.__main__ import main
    assert main(["passkey", "--lengths", "384", "--depths", "2", "--prefill-chunk", "256",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["depth", "384"]
    r = json.loads((tmp_path / "passkey_dca.json").read_text())
    assert r["lengths"] == [384] and r["depths"] == [0.0, 1.0] and r["dca"] is not None
    assert all(a["prompt_tokens"] <= 384 - pk.ANSWER_RESERVE for c in r["cells"] for a in c["answers"])
    assert main(["passkey", "--lengths", "2k,1m"]) == 2     # bad length: clear error, exit 2
    assert "1m" in capsys.readouterr().err


def test_cli_dca_override(tmp_path, capsys):
    """--dca CHUNK,LOCAL overrides the checkpoint's DCA (ORIG from its trained length) and is recorded;
    a malformed value is a clear error (exit 2)."""
    from zenjax.eval.__main__ import main
    assert main(["passkey", "--lengths", "384", "--depths", "1", "--dca", "256,32", "--out", str(tmp_path),
                 "--name", "x"]) == 0
    r = json.loads((tmp_path / "x.json").read_text())
    assert r["dca"] == {"chunk_size": 256, "local_size": 32, "original_max_position_embeddings": 2048}
    assert r["prefill_chunk"] == 2048         # as given: the engine's buckets stop at s = 256 - 32 itself
    capsys.readouterr()
    assert main(["passkey", "--lengths", "384", "--dca", "256,x"]) == 2
    assert "256,x" in capsys.readouterr().err
    assert main(["passkey", "--lengths", "384", "--dca", "256,32", "--no-dca"]) == 2


def test_cli_server_refuses_local_options(capsys):
    from zenjax.eval.__main__ import main
    assert main(["passkey", "--server", "127.0.0.1:1", "--no-dca"]) == 2
    assert "--server" in capsys.readouterr().err


def test_train_export_roundtrip(tmp_path):
    """train.py's HF export, converted and loaded by zenjax, reproduces the training forward's logits."""
    import jax
    import jax.numpy as jnp
    sys.path.insert(0, str(ROOT / "benchmarks" / "passkey"))
    try:
        import train
    finally:
        sys.path.pop(0)
    import zenjax
    from zenjax.convert import convert_checkpoint
    from zenjax.model import init_params

    tok = Tokenizer.from_dir(FIXTURE_TOKENIZER)
    cfg = train.model_config(1024, train.TOY)
    params = init_params(cfg, jax.random.key(1), jnp.float32, scale=0.3)
    train.export_hf(cfg, params, tok, tmp_path / "hf")
    convert_checkpoint(tmp_path / "hf", tmp_path / "zj", dtype="float32", progress=False)
    ids = pk.make_prompt(tok, 150, 0.5, seed=0).ids
    want = np.asarray(train.forward(cfg, params, jnp.asarray([ids], jnp.int32))[0])
    engine = zenjax.load(tmp_path / "zj", max_model_len=256, prefill_chunk=64, attention="reference",
                         dtype="float32", dca=False, verbose=False)
    got = engine.logits(ids)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)   # float32, chunked vs one-shot
    # scale_qk(m) is the DCA temperature: scaling q and k by m scales every attention logit by m^2
    scaled = train.scale_qk(params, 1.3)
    G = cfg.num_heads // cfg.num_kv_heads        # w_qkv [D, K, G+2, H]: q heads 0..G-1, k at G, v at G+1
    w, w0 = np.asarray(scaled["layers"]["0"]["w_qkv"]), np.asarray(params["layers"]["0"]["w_qkv"])
    assert np.allclose(w[:, :, :G + 1], 1.3 * w0[:, :, :G + 1]) and np.array_equal(w[:, :, G + 1], w0[:, :, G + 1])
    b, b0 = np.asarray(scaled["layers"]["1"]["b_qkv"]), np.asarray(params["layers"]["1"]["b_qkv"])
    assert np.allclose(b[:, G], 1.3 * b0[:, G]) and np.array_equal(b[:, G + 1], b0[:, G + 1])
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_cfg["dual_chunk_attention_config"] == {"chunk_size": 1024, "local_size": 128,
                                                     "original_max_position_embeddings": 2048}
    # --dca-aug trains through the model's own DCA path: the training forward with a DCA config equals the
    # engine's chunked DCA prefill (pieces cut at s = 56, temperature 1 below the trained length)
    from zenjax.config import DCAConfig
    dca = DCAConfig(64, 8, 2048)
    want = np.asarray(train.forward(dataclasses.replace(cfg, dca=dca), params, jnp.asarray([ids], jnp.int32))[0])
    engine = zenjax.load(tmp_path / "zj", max_model_len=256, prefill_chunk=64, attention="reference",
                         dtype="float32", dca=dca, verbose=False)
    np.testing.assert_allclose(engine.logits(ids), want, rtol=1e-4, atol=1e-4)
    assert not np.allclose(engine.logits(ids), got, atol=1e-2)       # and DCA does change the logits


def test_plot_without_matplotlib_fails_clearly(tmp_path, monkeypatch, capsys):
    """`eval plot` only writes a PNG: with matplotlib missing it exits 2 naming the extra, writes nothing."""
    import builtins
    import json
    from zenjax.eval.__main__ import main
    res = tmp_path / "r.json"
    res.write_text(json.dumps({"lengths": [300], "depths": [0.5], "accuracy": [[1.0]], "dca": True}))
    real_import = builtins.__import__

    def no_matplotlib(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert main(["plot", str(res), "--out", str(tmp_path / "x.png")]) == 2
    assert "zenjax[plot]" in capsys.readouterr().err and not (tmp_path / "x.png").exists()
