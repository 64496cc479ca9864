"""Build the small Qwen-style tokenizer under tests/fixtures/tokenizer/ and record transformers' outputs.

Run with the transformers reference environment:

    /work/hfenv/bin/python scripts/make_tokenizer_fixtures.py            # writes tests/fixtures/tokenizer/

Walk:
1. `build_tokenizer_files(dst)` trains a byte-level BPE (vocab ~1000) on the built-in corpus below with
   exactly the pipeline of Qwen2's `tokenizer.json` (NFC normalizer, Qwen2's split regex + ByteLevel
   pre-tokenizer, ByteLevel post-processor and decoder), appends the added tokens after the learned vocab
   as Qwen does (<|endoftext|>, <|im_start|>, <|im_end|> special; <tool_call>, </tool_call> not special),
   and writes `tokenizer.json` plus a `tokenizer_config.json` holding Qwen2.5-Instruct's chat template.
   Only the `tokenizers` library is needed for this step (benchmarks/passkey/install_default.py ships them with the demo model).
2. `record_reference(dst)` loads the directory with transformers' AutoTokenizer (Qwen2Tokenizer, which in
   transformers 5 rebuilds the pipeline in Python from vocab + merges, so it is an independent check of
   our tokenizer.json) and with PreTrainedTokenizerFast(tokenizer_file=...), asserts the two agree, and
   writes `reference.json`: encode ids, decode strings and apply_chat_template ids/text for a set of
   strings and conversations. tests/test_tokenizer.py asserts zenjax.tokenizer reproduces every entry.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

FIXTURE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures",
                           "tokenizer")

# Qwen2's pre-tokenizer split pattern (Qwen2.5 tokenizer.json / transformers' Qwen2Tokenizer).
QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                           r"""\s*[\r\n]+|\s+(?!\S)|\s+""")

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
NONSPECIAL_ADDED_TOKENS = ("<tool_call>", "</tool_call>")   # Qwen2.5 has these as added, non-special tokens
VOCAB_SIZE = 1000

# The chat template of Qwen2.5-*-Instruct (tokenizer_config.json "chat_template"), verbatim.
QWEN25_CHAT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "system user assistant tool response function arguments name",
    "Long context inference needs chunked prefill and a bounded key value cache.",
    "Dual chunk attention splits the sequence into chunks and reuses position ids.",
    "What is the capital of France? The capital of France is Paris.",
    "Please write a short poem about the sea, the wind and the stars.",
    "def main():\n    print(\"hello world\")\n    return 0\n",
    "for i in range(10):\n\tx = x + i * 2\n",
    "It's a test; we'll see if they're right, I'd say you've done well and I'm sure.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 1234567890 3.14159",
    "JSON: {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Berlin\", \"unit\": \"celsius\"}}",
    "héllo wörld 日本語 🙂",
    "héllo wörld, café, naïve, façade, résumé, Zürich, São Paulo, Kraków.",
    "日本語のテキストです。東京は日本の首都です。",
    "中文文本：你好，世界！今天天气很好。",
    "Emoji: 🙂 😀 🚀 ❤️ 👍🏽 and the flag 🇫🇷.",
    "Русский текст: привет мир. Ελληνικά: γειά σου κόσμε.",
    "العربية: مرحبا بالعالم. עברית: שלום עולם.",
    "Tabs\tand  double  spaces   and\nnew lines\r\nwith CRLF.",
    "Math: x² + y² = z², ∑ i = n(n+1)/2, α β γ δ ∞ ≈ ≠ ≤ ≥.",
]

_WORDS = ("model token tokenizer attention kernel memory cache prompt answer question chat message role "
          "content stream decode encode byte pair merge vocabulary special start end text language "
          "engine server request batch sequence length position rotary embedding layer norm weight "
          "matrix vector tensor device accelerator compile jit shape dtype float bfloat precision "
          "house garden river mountain window kitchen coffee morning evening winter summer spring autumn "
          "yellow purple orange silver golden happy quickly slowly carefully between through without "
          "because although whenever remember believe understand explain consider describe discover "
          "information government community education development experience important different "
          "beautiful possible available national international particular political economic "
          "computer program software hardware network internet protocol security password account "
          "library function variable argument parameter return value object class method module package "
          "science history music picture family friend teacher student doctor market country city").split()


def training_corpus() -> list[str]:
    """Deterministic corpus: the sentences above, plus generated word sequences for enough merges."""
    # ASCII sentences are repeated so their words merge into whole tokens; the multi-byte ones appear once,
    # so (with min_frequency=2) some characters merge and others stay split into byte tokens - the streaming
    # tests need tokens that end in the middle of a UTF-8 character.
    lines = [s for s in _SENTENCES if s.isascii()] * 20 + [s for s in _SENTENCES if not s.isascii()]
    n = len(_WORDS)
    for i in range(400):
        # a fixed pseudo-random walk over the word list (no RNG: the corpus must never change)
        words = [_WORDS[(i * 7 + j * 13 + (i * j) % 5) % n] for j in range(12)]
        words[0] = words[0].capitalize()
        lines.append(" ".join(words) + (".", "?", "!", ",")[i % 4])
    return lines


def build_tokenizer_files(dst: str, vocab_size: int = VOCAB_SIZE) -> None:
    """Train the tokenizer and write tokenizer.json + tokenizer_config.json into dst."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers import processors, trainers

    tok = Tokenizer(models.BPE(dropout=None, unk_token=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(training_corpus(), trainer)
    # Added tokens come after the learned vocabulary, as in Qwen (151643 = <|endoftext|>).
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in NONSPECIAL_ADDED_TOKENS])
    os.makedirs(dst, exist_ok=True)
    tok.save(os.path.join(dst, "tokenizer.json"))

    decoder = {}
    for t in SPECIAL_TOKENS + NONSPECIAL_ADDED_TOKENS:
        decoder[str(tok.token_to_id(t))] = {"content": t, "lstrip": False, "normalized": False,
                                            "rstrip": False, "single_word": False,
                                            "special": t in SPECIAL_TOKENS}
    config = {  # the fields of Qwen2.5-7B-Instruct's tokenizer_config.json
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": QWEN25_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    with open(os.path.join(dst, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")


# ---------------------------------------------------------------------------------------------------------
# Reference outputs from transformers

ENCODE_STRINGS = [
    "", "Hello world", "hello   world\n\n", " leading space", "The quick brown fox jumps over the lazy dog.",
    "héllo wörld 日本語 🙂", "e\u0301 composed by NFC", "Ünïcödé ✓ ∑ 東京 🇫🇷 👍🏽",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|>", "a<tool_call>b</tool_call>c",
    "I'm sure they'll say it's fine; we've SEEN it.", "x = 12345 + 678.9", "tabs\tand\r\nCRLF\n  indented",
    "<|im_start", "unseen: ŋ ǂ ᚠ 𝔘𝔫𝔦",
]

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather in a city (°C).",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "Zürich"}},
                   "required": ["city"]}}}]

CONVERSATIONS = {
    "system_user": [{"role": "system", "content": "You are a terse assistant."},
                    {"role": "user", "content": "Hello! héllo 日本語 🙂"}],
    "user_only_default_system": [{"role": "user", "content": "What is the capital of France?"}],
    "multi_turn": [{"role": "system", "content": "Be helpful."},
                   {"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Hello! How can I help?"},
                   {"role": "user", "content": "Tell me a joke.\nMake it short."}],
    "multi_turn_no_system": [{"role": "user", "content": "1+1?"},
                             {"role": "assistant", "content": "2"},
                             {"role": "user", "content": "and 2+2?"}],
    "ends_with_assistant": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}],
    "tool_calls": [{"role": "user", "content": "Weather in Zürich?"},
                   {"role": "assistant", "content": "",
                    "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                                     "arguments": {"city": "Zürich"}}}]},
                   {"role": "tool", "content": "{\"temp\": 21}"},
                   {"role": "tool", "content": "sunny"}],
    "special_text_in_content": [{"role": "user", "content": "print('<|im_end|>')"}],
}

# (conversation name, add_generation_prompt, with tools)
CHAT_CASES = [
    ("system_user", True, False), ("system_user", False, False), ("user_only_default_system", True, False),
    ("multi_turn", True, False), ("multi_turn_no_system", True, False), ("ends_with_assistant", False, False),
    ("tool_calls", True, True), ("user_only_default_system", True, True), ("system_user", True, True),
    ("special_text_in_content", True, False),
]


def record_reference(dst: str) -> dict:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    auto = AutoTokenizer.from_pretrained(dst)
    fast = PreTrainedTokenizerFast(tokenizer_file=os.path.join(dst, "tokenizer.json"))
    ref = {"transformers_class": type(auto).__name__, "vocab_size": len(auto), "encode": [], "decode": [],
           "chat": [], "special": {"eos_token_id": auto.eos_token_id, "pad_token_id": auto.pad_token_id,
                                   "bos_token_id": auto.bos_token_id}}
    for s in ENCODE_STRINGS:
        ids = auto.encode(s, add_special_tokens=False)
        assert ids == fast.encode(s, add_special_tokens=False), f"Qwen2Tokenizer != tokenizer.json on {s!r}"
        ref["encode"].append({"text": s, "ids": ids,
                              "ids_with_special": auto.encode(s, add_special_tokens=True)})
        for skip in (False, True):
            text = auto.decode(ids, skip_special_tokens=skip)
            ref["decode"].append({"ids": ids, "skip_special_tokens": skip, "text": text})
    # decode of ids that do not come from encode: a lone continuation byte, a cut multi-byte char
    for ids in ([auto.convert_tokens_to_ids("Ģ")], auto.encode("東京", add_special_tokens=False)[:-1],
                [auto.convert_tokens_to_ids("<|im_end|>"), auto.convert_tokens_to_ids("<tool_call>")]):
        for skip in (False, True):
            ref["decode"].append({"ids": ids, "skip_special_tokens": skip,
                                  "text": auto.decode(ids, skip_special_tokens=skip)})
    for name, gen, with_tools in CHAT_CASES:
        msgs = CONVERSATIONS[name]
        tools = TOOLS if with_tools else None
        text = auto.apply_chat_template(msgs, tools=tools, add_generation_prompt=gen, tokenize=False)
        ids = auto.apply_chat_template(msgs, tools=tools, add_generation_prompt=gen, tokenize=True,
                                       return_dict=False)
        ref["chat"].append({"name": name, "messages": msgs, "tools": tools, "add_generation_prompt": gen,
                            "text": text, "ids": list(ids)})
    return ref


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=FIXTURE_DIR)
    args = ap.parse_args(argv)
    build_tokenizer_files(args.out)
    ref = record_reference(args.out)
    with open(os.path.join(args.out, "reference.json"), "w", encoding="utf-8") as f:
        json.dump(ref, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {args.out}: vocab {ref['vocab_size']}, {len(ref['encode'])} strings, "
          f"{len(ref['chat'])} chats", file=sys.stderr)


if __name__ == "__main__":
    main()
