"""zenjax.textstream.TextStream: incremental detokenization and stop handling, on the fixture tokenizer.

The fixture's byte-level BPE has no merges inside multi-byte characters, so every non-ASCII character is
split over 2-4 byte tokens: exactly the case where a naive per-token decode emits U+FFFD.
"""
import os
import random

import pytest

from zenjax.textstream import TextStream
from zenjax.tokenizer import Tokenizer

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "tokenizer")
MULTIBYTE = "héllo wörld 日本語 🙂 — naïve café 東京 👍🏽 end"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(FIXTURES)


def run(stream, ids):
    """Push ids until the stream finishes; return the deltas and the finish reason."""
    deltas, reason = [], None
    for i in ids:
        d, reason = stream.push(i)
        deltas.append(d)
        if reason:
            break
    return deltas, reason


def test_multibyte_stream_equals_full_decode(tok):
    ids = tok.encode(MULTIBYTE)
    # the test is only meaningful if some tokens end inside a character
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    s = TextStream(tok)
    deltas, reason = run(s, ids)
    assert reason is None
    assert s.flush() == ""          # every character was complete at the end
    assert "".join(deltas) == s.text == tok.decode(ids) == MULTIBYTE
    assert not any("\ufffd" in d for d in deltas)
    assert "" in deltas             # something was held back while a character was incomplete
    assert s.token_ids == ids


def test_incomplete_character_released_by_flush(tok):
    ids = tok.encode("ab日")[:-1]   # drop the last byte of 日
    s = TextStream(tok)
    deltas, _ = run(s, ids)
    assert "".join(deltas) == "ab"
    assert s.flush() == "\ufffd"    # what a full decode gives for the cut character
    assert s.text == tok.decode(ids)
    with pytest.raises(RuntimeError):
        s.push(ids[0])


def test_stop_string_across_token_boundaries(tok):
    text = "The answer is 42.\n\nEND of the text"
    ids = tok.encode(text)
    stop = "\n\nEND"
    s = TextStream(tok, stop=(stop,))
    deltas, reason = run(s, ids)
    assert reason == "stop" and s.finish_reason == "stop"
    assert s.text == "".join(deltas) == "The answer is 42."
    assert len(s.token_ids) < len(ids)  # stopped before consuming everything
    # the stop string spans several tokens: "\n\n" and "END" are not one token
    assert not any(stop in tok.decode([i]) for i in ids)


def test_stop_string_made_of_multibyte_characters(tok):
    text = "abc 東京 def 日本語 ghi"
    s = TextStream(tok, stop=("日本",))
    deltas, reason = run(s, tok.encode(text))
    assert reason == "stop" and s.text == "abc 東京 def "
    assert not any("\ufffd" in d for d in deltas)


def test_partial_stop_match_is_held_then_released(tok):
    """"</a" could start "</answer>": held back, then released when the text goes elsewhere."""
    text = "x </and more</answer> tail"
    s = TextStream(tok, stop=("</answer>",))
    emitted_so_far = []
    for i in tok.encode(text):
        d, reason = s.push(i)
        emitted_so_far.append(d)
        # at no point does the emitted text end with a proper prefix of the stop string
        assert not any(s.text.endswith("</answer>"[:k]) for k in range(1, 9)) or reason
        if reason:
            break
    assert reason == "stop" and s.text == "x </and more"


def test_earliest_stop_string_wins(tok):
    s = TextStream(tok, stop=("world", "lo w"))
    _, reason = run(s, tok.encode("hello world"))
    assert reason == "stop" and s.text == "hel"


def test_stop_token_finishes_and_releases_held_text(tok):
    eos = tok.eos_token_id
    ids = tok.encode("Done. </ans") + [eos] + tok.encode("never seen")
    s = TextStream(tok, stop=("</answer>",), stop_token_ids={eos, tok.pad_token_id})
    deltas, reason = run(s, ids)
    assert reason == "stop"
    assert deltas[-1] == "</ans" or deltas[-1].endswith("</ans")  # held prefix released at the end
    assert s.text == "Done. </ans" and "<|im_end|>" not in s.text
    assert s.token_ids[-1] == eos and len(s.token_ids) == len(tok.encode("Done. </ans")) + 1


def test_max_new_tokens_gives_length(tok):
    ids = tok.encode("one two three four five six")
    s = TextStream(tok, max_new_tokens=3)
    deltas, reason = run(s, ids)
    assert reason == "length" and len(s.token_ids) == 3 and len(deltas) == 3
    assert s.text == tok.decode(ids[:3])
    # a stop token on the last allowed step is a "stop", not "length"
    s = TextStream(tok, stop_token_ids={tok.eos_token_id}, max_new_tokens=2)
    _, reason = run(s, ids[:1] + [tok.eos_token_id])
    assert reason == "stop"


def test_length_finish_releases_incomplete_character(tok):
    ids = tok.encode("ok 🙂")
    s = TextStream(tok, max_new_tokens=len(ids) - 1)  # stops inside the emoji's bytes
    deltas, reason = run(s, ids)
    assert reason == "length" and s.text == tok.decode(ids[:-1]) and s.text.endswith("\ufffd")


def test_special_tokens_skipped_by_default(tok):
    ids = tok.encode("a<|im_start|>b<tool_call>c")
    s = TextStream(tok)
    run(s, ids)
    assert s.text == "ab<tool_call>c"  # <tool_call> is added but not special: kept, as decode does
    s = TextStream(tok, skip_special_tokens=False)
    run(s, ids)
    assert s.text == "a<|im_start|>b<tool_call>c"


def test_bad_arguments(tok):
    with pytest.raises(ValueError, match="stop strings"):
        TextStream(tok, stop=("",))
    with pytest.raises(ValueError, match="max_new_tokens"):
        TextStream(tok, max_new_tokens=0)


def test_random_token_streams(tok):
    """Random ids (lone byte tokens included, so invalid UTF-8 too): the concatenated deltas plus flush
    equal one decode of everything pushed; with a stop string, the text ends right before its first
    occurrence in that decode."""
    rng = random.Random(0)
    pieces = ["hello", " world", "\n\n", "日本語", "🙂", "é", "END", " the", "42", "ab"]
    byte_tokens = [tok.token_to_id(c) for c in ("Ģ", "ä", "æ", "ð")]  # lone bytes, decode to U+FFFD
    for trial in range(60):
        ids = []
        for _ in range(rng.randint(1, 12)):
            if rng.random() < 0.15:
                ids.append(rng.choice(byte_tokens))
            else:
                ids += tok.encode(rng.choice(pieces))
        stop = ("\n\nEND",) if trial % 2 else ()
        s = TextStream(tok, stop=stop)
        deltas, reason = run(s, ids)
        tail = s.flush()
        full = tok.decode(s.token_ids)
        if reason == "stop":
            assert s.text == full[: full.index(stop[0])], (ids, s.text)
        else:
            assert "".join(deltas) + tail == s.text == full, ids
            assert not stop or stop[0] not in s.text
