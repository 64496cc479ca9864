"""Prompt encoding: text, token ids or chat messages -> checked token ids (one function, one error class)."""
from __future__ import annotations

import numpy as np

from zenjax.tokenizer import PromptError


def encode_prompt(prompt, tokenizer, vocab_size: int, max_model_len: int) -> list[int]:
    """str -> tokenizer ids; list of ints -> checked ids; list of {role, content} -> chat template.
    Raises PromptError naming what is wrong; a prompt must leave room for one generated token."""
    if isinstance(prompt, str):
        if not prompt:
            raise PromptError("prompt: empty text")
        if tokenizer is None:
            raise PromptError("prompt: this checkpoint has no tokenizer; pass token ids")
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        if tokenizer is None:
            raise PromptError("messages: this checkpoint has no tokenizer/chat template")
        ids = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True)
    elif isinstance(prompt, (list, tuple, np.ndarray)):
        ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise PromptError(f"prompt token ids: {bad[:5]} outside [0, {vocab_size})")
    else:
        raise PromptError(f"prompt: expected text, token ids or chat messages, got {type(prompt).__name__}")
    if not ids:
        raise PromptError("prompt: encodes to zero tokens")
    if len(ids) >= max_model_len:
        raise PromptError(f"prompt: {len(ids)} tokens leave no room to generate within "
                          f"max_model_len={max_model_len}")
    return list(ids)
