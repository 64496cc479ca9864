"""The shipped demo model (zenjax/assets/default, trained by benchmarks/passkey/train.py on <= 2K-token
passkey prompts) retrieves a passkey at 4x its training length with DCA, through the full path:
zenjax.load of the embedded checkpoint, chunked prefill (pieces cut at DCA chunk boundaries), decode."""
from __future__ import annotations

import pytest

import zenjax
from zenjax.eval import passkey as pk

TRAIN_LEN = 2048
LENGTH = 4 * TRAIN_LEN          # 8K context: prompt 8176 tokens + answer


@pytest.fixture(scope="module")
def engine():
    return zenjax.load(None, max_model_len=LENGTH, prefill_chunk=1024, attention="reference",
                       dtype="float32", dca=True, verbose=False)


def test_shipped_checkpoint_is_the_demo_model(engine):
    cfg = engine.config
    assert cfg.max_position_embeddings == TRAIN_LEN
    # DCA chunk 1024 = half the training length (the largest chunk of its DCA-augmented training)
    assert cfg.dca is not None and (cfg.dca.chunk_size, cfg.dca.original_max_position_embeddings) == \
        (TRAIN_LEN // 2, TRAIN_LEN)
    # 4x the training length needs more than one DCA chunk: the prefill is cut at multiples of s
    plan = engine.prefill_plan(LENGTH - pk.ANSWER_RESERVE)
    assert any(end % cfg.dca.chunk_len == 0 for _, end in plan[:-1]) and len(plan) > LENGTH // 1024


# Measured on the GPU (benchmarks/passkey/README.md): 100% at 2K, 8K and 32K (20 prompts each) with DCA.
@pytest.mark.parametrize("depth,seed", [(0.25, 11)])   # key > 2K tokens before the question
def test_retrieves_passkey_at_4x_training_length_with_dca(engine, depth, seed):
    p = pk.make_prompt(engine.tokenizer, LENGTH - pk.ANSWER_RESERVE, depth, seed)
    assert len(p.ids) > 3 * TRAIN_LEN
    assert len(p.ids) - p.key_token_start > 2 * TRAIN_LEN      # beyond any distance seen in training
    out = engine.generate(p.text, zenjax.SamplingParams(max_new_tokens=pk.MAX_NEW_TOKENS))
    assert out.prompt_tokens == len(p.ids)
    assert pk.is_correct(p.key, out.text), (p.key, out.text)
