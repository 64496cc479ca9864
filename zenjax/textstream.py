"""Incremental detokenization with stop handling: generated token ids in, text deltas out.

Walk of `TextStream.push(token)`:
1. count the token; a stop token id (EOS) finishes with "stop" and contributes no text;
2. detokenize incrementally (the prefix/read offset scheme of vLLM and TGI): decode the window
   tokens[prefix_offset:] and tokens[prefix_offset:read_offset]; the new text is the difference. While the
   window's text ends in U+FFFD the last token(s) stop inside a multi-byte UTF-8 character, so nothing is
   released until the bytes that complete it arrive. Decoding a small window (not the whole output) keeps
   each step O(window), and starting it at `prefix_offset` (a few tokens back) lets decoders that look at
   the previous token (SentencePiece's leading-space rule) see it.
3. stop strings: the released text goes to `pending`; if a stop string occurs there, emit only what comes
   before its first occurrence and finish "stop". Otherwise hold back the longest suffix of `pending` that
   could be the beginning of a stop string and emit the rest. Because held text is never emitted, a stop
   string cannot start inside already emitted text, so searching `pending` alone is enough.
4. reaching max_new_tokens finishes "length".
On finishing the delta carries everything still held back (it is final text: no stop string completed),
so a caller needs nothing but push; `flush()` is for a caller that ends the stream itself.

Worked example, stop=("\\n\\n",), tokens decoding to "Hi", "\\n", "\\n", "x":
    push("Hi") -> ("Hi", None); push("\\n") -> ("", None)  # "\\n" could start "\\n\\n", held back
    push("\\n") -> ("", "stop")                           # matched: nothing before it in pending
Worked example, "日" = bytes e6 97 a5 split over two byte-level tokens [e6 97] [a5]:
    push([e6 97]) -> ("", None)  # decodes to "\\ufffd": held back
    push([a5])    -> ("日", None)
"""
from __future__ import annotations

from typing import Iterable

REPLACEMENT_CHAR = "\ufffd"
FINISH_REASONS = ("stop", "length")


class TextStream:
    """Host-side detokenizer of one sequence. Attributes: `text` (all emitted text), `token_ids` (every
    pushed token, a final stop token included), `finish_reason` (None while running)."""

    def __init__(self, tokenizer, stop: Iterable[str] = (), stop_token_ids: Iterable[int] = (),
                 max_new_tokens: int | None = None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")
        self.stop_token_ids = frozenset(int(t) for t in stop_token_ids)
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        self.max_new_tokens = max_new_tokens
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self._max_stop_len = max((len(s) for s in self.stop), default=0)
        self._tokens: list[int] = []     # tokens that produce text (stop tokens excluded)
        self._prefix_offset = 0
        self._read_offset = 0
        self._pending = ""               # decoded, not yet emitted (could be the start of a stop string)
        self._closed = False             # set by a finish or by flush()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def push(self, token_id: int) -> tuple[str, str | None]:
        """Add one generated token; return (text delta, finish reason or None)."""
        if self._closed:
            raise RuntimeError(f"push after the stream ended (finish_reason={self.finish_reason!r})")
        token_id = int(token_id)
        self.token_ids.append(token_id)
        if token_id in self.stop_token_ids:
            return self._finish("stop", self._release_all())
        self._tokens.append(token_id)
        self._pending += self._detokenize()
        if self.stop:
            cut = self._find_stop()
            if cut is not None:
                text, self._pending = self._pending[:cut], ""
                self._tokens.clear()       # whatever follows the stop string is dropped
                return self._finish("stop", text)
        if self.max_new_tokens is not None and len(self.token_ids) >= self.max_new_tokens:
            return self._finish("length", self._release_all())
        return self._emit(self._pending[: len(self._pending) - self._holdback()]), None

    def flush(self) -> str:
        """Release all held-back text (an incomplete character decodes to U+FFFD). Ends the stream: further
        pushes raise; finish_reason stays None (the caller stopped, not the stream). Returns "" after a finish,
        which already released everything."""
        if self._closed:
            return ""
        self._closed = True
        delta = self._release_all()
        self._pending = ""
        self.text += delta
        return delta

    # ------------------------------------------------------------------------------------------ internals
    def _detokenize(self) -> str:
        """New complete text since the last call (vLLM's detokenize_incrementally)."""
        decode = self.tokenizer.decode
        prefix_text = decode(self._tokens[self._prefix_offset:self._read_offset],
                             skip_special_tokens=self.skip_special_tokens)
        new_text = decode(self._tokens[self._prefix_offset:], skip_special_tokens=self.skip_special_tokens)
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR):
            # The window ends on a character boundary: release and slide. The next window starts at the
            # old read offset, so it still holds the token just before the new text.
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._tokens)
            return new_text[len(prefix_text):]
        return ""

    def _find_stop(self) -> int | None:
        """Index in `pending` where the earliest stop string begins, or None."""
        best = None
        for s in self.stop:
            i = self._pending.find(s)
            if i >= 0 and (best is None or i < best):
                best = i
        return best

    def _holdback(self) -> int:
        """Length of the longest suffix of `pending` that is a proper prefix of some stop string.

        Example: stop=("</answer>",), pending="the end</an" -> 4 ("</an" is held).
        """
        p = self._pending
        for k in range(min(len(p), self._max_stop_len - 1), 0, -1):
            tail = p[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0

    def _release_all(self) -> str:
        """Everything still held: pending text plus the undecoded tail (U+FFFD for an incomplete char)."""
        if self._read_offset < len(self._tokens):
            decode = self.tokenizer.decode
            prefix_text = decode(self._tokens[self._prefix_offset:self._read_offset],
                                 skip_special_tokens=self.skip_special_tokens)
            new_text = decode(self._tokens[self._prefix_offset:], skip_special_tokens=self.skip_special_tokens)
            self._pending += new_text[len(prefix_text):]
            self._prefix_offset = self._read_offset = len(self._tokens)
        return self._pending

    def _emit(self, text: str) -> str:
        self._pending = self._pending[len(text):]
        self.text += text
        return text

    def _finish(self, reason: str, text: str) -> tuple[str, str]:
        self.text += text
        self._pending = ""
        self.finish_reason = reason
        self._closed = True
        return text, reason
