"""Tokenizer and chat template, reproducing Hugging Face transformers without depending on it.

Walk of `apply_chat_template(messages)` (mirrors transformers 5 `PreTrainedTokenizerBase.apply_chat_template`
and `utils.chat_template_utils.render_jinja_template`):
1. validate the messages (list of dicts, known role, string content) -> PromptError naming index/field;
2. drop keys whose value is None (transformers does this: OpenAI-style `content=None` must not render "None");
3. render the Jinja template in the same sandbox transformers builds (`_compile_template` below):
   ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True) with the loopcontrols extension, a
   no-op `{% generation %}` tag, `tojson` = json.dumps(ensure_ascii=False) (NOT jinja's HTML-escaping one),
   `raise_exception`, `strftime_now`, `dict`, `namespace`; variables: messages, tools, documents,
   add_generation_prompt, the named special tokens (bos_token, eos_token, ...) and caller kwargs;
4. encode the rendered string with add_special_tokens=False (the template already wrote every control token).

Control tokens typed inside message content: `tokenizers` matches added tokens anywhere in the text, so by
default (as transformers) a message whose content says "<|im_end|>\n<|im_start|>system\n..." becomes real
control tokens and forges a turn. With special_tokens_in_content=False (what the server uses) the template
is rendered with a per-call random marker in place of each content, the template text around the markers
is encoded as usual, and each content is encoded by a copy of the tokenizer without added tokens, so
"<|im_end|>" in content becomes the plain pieces "<", "|", "im", ... A chat whose contents hold no
added-token text takes the ordinary path, so its ids stay exactly transformers'.

Worked example with Qwen2.5's template and [{"role": "user", "content": "Hi"}]:
    "<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n"
    "<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n"
-> ids begin [<|im_start|>, "system", "\\n", ...]: the control tokens come out as single added-token ids
because `tokenizers` matches added tokens before the BPE model sees the text.
"""
from __future__ import annotations

import json
import os
import re
import uuid
from datetime import datetime
from functools import lru_cache
from typing import Any, Iterable, Mapping, Sequence

from tokenizers import Tokenizer as _HFTokenizer

ROLES = ("system", "user", "assistant", "tool")
# `Tokenizer.encode` holds the GIL for the whole call; `encode_batch` releases it. Texts longer than this
# go through encode_batch (same ids) so a long prompt being tokenized does not stall other threads
# (the server's health checks and scheduler; measured: 4.3 MB of text held the GIL for 6.8 s).
_GIL_FREE_CHARS = 4096
# transformers' SPECIAL_TOKENS_ATTRIBUTES: the named tokens a chat template sees as variables.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                       "mask_token")


class PromptError(ValueError):
    """A prompt (text, ids or chat messages) is malformed; the message names what is wrong."""


class TokenizerError(ValueError):
    """A tokenizer directory is missing a file or holds a value we cannot use."""


def _token_str(value: Any) -> str | None:
    """tokenizer_config.json writes a token either as a string or as an AddedToken dict {"content": ...}."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class Tokenizer:
    """`tokenizer.json` through the `tokenizers` library + the chat template of `tokenizer_config.json`."""

    def __init__(self, backend: _HFTokenizer, config: Mapping[str, Any] | None = None,
                 chat_template: str | dict[str, str] | None = None):
        self._tok = backend
        self.config = dict(config or {})
        self.chat_template = chat_template if chat_template is not None else self.config.get("chat_template")
        if isinstance(self.chat_template, list):  # [{"name": ..., "template": ...}] form of the config
            self.chat_template = {t["name"]: t["template"] for t in self.chat_template}
        # Named special tokens, as transformers' `special_tokens_map` (only those that are set).
        self.special_tokens: dict[str, str] = {}
        for name in SPECIAL_TOKEN_NAMES:
            tok = _token_str(self.config.get(name))
            if tok is not None:
                self.special_tokens[name] = tok
        # transformers 5 also exposes model-specific `*_token` string entries (e.g. "image_token").
        for key, value in self.config.items():
            if key.endswith("_token") and key not in self.special_tokens and _token_str(value) is not None:
                self.special_tokens[key] = _token_str(value)

    # ----------------------------------------------------------------------------------------- loading
    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load `tokenizer.json` (required), `tokenizer_config.json` and a chat template.

        The template is looked up where transformers looks: `chat_template.jinja` (and
        `additional_chat_templates/*.jinja`) take priority over the config's "chat_template" entry.
        """
        path = os.fspath(path)
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tj):
            raise TokenizerError(f"{path}: tokenizer.json is missing (only the fast tokenizer format is read)")
        try:
            backend = _HFTokenizer.from_file(tj)
        except Exception as e:  # the Rust error names the bad field
            raise TokenizerError(f"{tj}: cannot be read by the tokenizers library: {e}") from e
        config: dict[str, Any] = {}
        cfg_path = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(cfg_path):
            try:
                with open(cfg_path, encoding="utf-8") as f:
                    config = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise TokenizerError(f"{cfg_path}: {e}") from e
        templates: dict[str, str] = {}
        jinja_path = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(jinja_path):
            with open(jinja_path, encoding="utf-8") as f:
                templates["default"] = f.read()
        extra_dir = os.path.join(path, "additional_chat_templates")
        if os.path.isdir(extra_dir):
            for name in sorted(os.listdir(extra_dir)):
                if name.endswith(".jinja"):
                    with open(os.path.join(extra_dir, name), encoding="utf-8") as f:
                        templates[name[: -len(".jinja")]] = f.read()
        chat_template: str | dict[str, str] | None = None
        if len(templates) == 1 and "default" in templates:
            chat_template = templates["default"]
        elif templates:
            chat_template = templates
        return cls(backend, config, chat_template)

    # ------------------------------------------------------------------------------------- vocabulary
    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows, added tokens included (transformers' `len(tokenizer)`)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    def _special_id(self, name: str) -> int | None:
        tok = self.special_tokens.get(name)
        return None if tok is None else self._tok.token_to_id(tok)

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def special_token_ids(self) -> set[int]:
        """Ids of added tokens flagged special (those `decode(skip_special_tokens=True)` drops)."""
        return {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    # ---------------------------------------------------------------------------------- encode/decode
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise PromptError(f"encode expects a str, got {type(text).__name__}")
        if len(text) > _GIL_FREE_CHARS:
            return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    @property
    def added_tokens(self) -> tuple[str, ...]:
        """The text of every added token (the control tokens, special-flagged or not, e.g. <tool_call>)."""
        if not hasattr(self, "_added"):
            self._added = tuple(t.content for t in self._tok.get_added_tokens_decoder().values())
        return self._added

    def encode_plain(self, text: str) -> list[int]:
        """Encode text with no added token recognised: "<|im_end|>" becomes ordinary BPE pieces."""
        if not hasattr(self, "_plain_tok"):
            spec = json.loads(self._tok.to_str())
            spec["added_tokens"] = []
            self._plain_tok = _HFTokenizer.from_str(json.dumps(spec))
        return self._plain_tok.encode_batch([text], add_special_tokens=False)[0].ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Ids beyond the tokenizer's vocabulary (a padded embedding row) decode to nothing, as in tokenizers.

        clean_up_tokenization_spaces is ignored, as transformers 5 ignores it for BPE models (Qwen's config
        sets it to false anyway).
        """
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------------------------------- chat template
    def get_chat_template(self, tools: Sequence[Any] | None = None) -> str:
        """The template to render: transformers' `get_chat_template` rules for a dict of named templates."""
        tpl = self.chat_template
        if tpl is None:
            raise PromptError("this tokenizer has no chat template (tokenizer_config.json 'chat_template' or "
                              "chat_template.jinja); pass a plain string or token ids instead of messages")
        if isinstance(tpl, dict):
            if tools is not None and "tool_use" in tpl:
                return tpl["tool_use"]
            if "default" in tpl:
                return tpl["default"]
            raise PromptError(f"the tokenizer has several chat templates {sorted(tpl)} and none is 'default'")
        return tpl

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = True, tools: Sequence[Mapping[str, Any]] | None = None,
                            documents: Sequence[Mapping[str, Any]] | None = None,
                            special_tokens_in_content: bool = True, **kwargs) -> list[int] | str:
        """Messages -> ids (or the rendered string when tokenize=False), exactly as transformers.

        Unlike transformers the default is add_generation_prompt=True: an engine renders a chat to generate
        the assistant's reply. special_tokens_in_content=False: control-token text inside a message's
        content stays plain text (see the module docstring); only with tokenize=True.
        """
        chat = validate_messages(messages)
        if tools is not None:
            if not isinstance(tools, (list, tuple)) or not all(isinstance(t, Mapping) for t in tools):
                raise PromptError("tools must be a list of JSON-schema dicts")
            tools = [_plain(t) for t in tools]
        if documents is not None:
            if not isinstance(documents, (list, tuple)) or not all(isinstance(d, Mapping) for d in documents):
                raise PromptError("documents must be a list of dicts")
            documents = [_plain(d) for d in documents]
        template = _compile_template(self.get_chat_template(tools))
        variables = {**self.special_tokens, **_plain(kwargs)}  # caller kwargs override special tokens

        def render(msgs):
            try:
                return template.render(messages=msgs, tools=tools, documents=documents,
                                       add_generation_prompt=add_generation_prompt, **variables)
            except Exception as e:  # jinja2 TemplateError from raise_exception(), UndefinedError, TypeError...
                raise PromptError(f"chat template failed to render these messages: {type(e).__name__}: {e}") from e

        if tokenize and not special_tokens_in_content and any(
                isinstance(m.get("content"), str) and tok in m["content"] for m in chat for tok in self.added_tokens):
            return self._encode_isolating_content(chat, render)
        text = render(chat)
        if not tokenize:
            return text
        return self.encode(text, add_special_tokens=False)

    def _encode_isolating_content(self, chat, render) -> list[int]:
        """Render with a random marker per content; template text encodes as usual, content as plain text.
        Worked example: content "a<|im_end|>" in Qwen's template renders "...user\n\x1eN:0\x1e<|im_end|>...";
        "...user\n" -> its ids, then encode_plain("a<|im_end|>") -> [a, <, |, im, _end, |, >], then
        "<|im_end|>..." -> [<|im_end|>, ...]."""
        nonce = uuid.uuid4().hex
        marked = [dict(m, content=f"\x1e{nonce}:{i}\x1e") if isinstance(m.get("content"), str) else m
                  for i, m in enumerate(chat)]
        text = render(marked)
        found = list(re.finditer("\x1e" + nonce + r":(\d+)\x1e", text))
        if text.count(nonce) != len(found):
            raise PromptError("a message content holds control-token text and this chat template rewrites "
                              "message content, so the content cannot be kept apart from the control tokens")
        ids, pos = [], 0
        for m in found:
            ids += self.encode(text[pos:m.start()], add_special_tokens=False)
            ids += self.encode_plain(chat[int(m.group(1))]["content"])
            pos = m.end()
        return ids + self.encode(text[pos:], add_special_tokens=False)


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check chat messages and return plain copies with None-valued keys dropped (as transformers does).

    Each message is a dict with "role" in ROLES and a string "content". An assistant message that carries
    "tool_calls" may omit its content (OpenAI sends content=None there).
    """
    if not isinstance(messages, (list, tuple)):
        raise PromptError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise PromptError("messages is empty: a chat needs at least one message")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise PromptError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if role is None:
            raise PromptError(f"messages[{i}] has no 'role'")
        if role not in ROLES:
            raise PromptError(f"messages[{i}].role={role!r} is unknown (expected one of {', '.join(ROLES)})")
        content = m.get("content")
        if content is None:
            if not (role == "assistant" and m.get("tool_calls")):
                raise PromptError(f"messages[{i}] ({role}) has no 'content'")
        elif not isinstance(content, str):
            raise PromptError(f"messages[{i}].content must be a string, got {type(content).__name__}")
        if "tool_calls" in m and m["tool_calls"] is not None and not isinstance(m["tool_calls"], (list, tuple)):
            raise PromptError(f"messages[{i}].tool_calls must be a list")
        out.append({k: _plain(v) for k, v in m.items() if v is not None})
    return out


def _plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON types (transformers' `_plain_template_data`): the sandbox must
    never see objects whose methods it does not know to be safe."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        return _plain(value.item())  # numpy scalar
    return f"<{type(value).__name__}>"


@lru_cache(maxsize=16)
def _compile_template(source: str):
    """The jinja environment of transformers' `_cached_compile_jinja_template`, minus assistant-mask tracking."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for transformers' assistant masks;
        # rendering-wise it outputs its body unchanged.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson HTML-escapes <, >, & and ': chat templates expect plain json.dumps
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # namespaces reject underscore names so a template cannot reach CPython internals
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes on a namespace: {name!r}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise TokenizerError(f"chat template does not parse: {e}") from e
