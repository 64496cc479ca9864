"""Engine API contract (implementation in progress; the signatures below are stable).

    engine = zenjax.load(path, max_model_len=..., prefill_chunk=..., max_batch=..., attention="auto")

High level (one request at a time):
    engine.logits(ids) -> np.ndarray [len(ids), V] float32
    engine.generate(prompt, SamplingParams) -> GenerationResult(text, token_ids, finish_reason, usage)
    engine.stream(prompt, SamplingParams) -> Iterator[str] (text deltas)
    prompt: str | list[int] | list[{"role","content"}] (chat messages)

Slot level (the server's scheduler drives this; plain Python, no JAX needed by the caller):
    engine.max_batch                                  number of decode slots
    engine.encode_prompt(prompt) -> list[int]         raises PromptError (a ValueError) on bad input
    seq = engine.start(slot, prompt_ids, params)      -> SequenceState; validates, resets the slot
    engine.prefill_next(slot) -> int | None           runs ONE prefill chunk of that slot; returns the
                                                      first generated token after the last chunk, else None
    seq.prefilled, seq.prompt_len                     progress (tokens prefilled of total)
    engine.decode(slots: list[int]) -> list[int]      one decode step for those slots (each continues
                                                      from its last token); returns each next token
    engine.release(slot)                              frees the slot (its cache rows are simply reused)
    seq.append(token) -> (text_delta, finish_reason | None)   host-side detokenizer + stop checks
"""
