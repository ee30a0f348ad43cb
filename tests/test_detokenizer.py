"""Incremental detokenization and OpenAI-style stop strings."""

import pytest
from conftest import byte_tokenizer, word_tokenizer

from hf_cb.entrypoints.detokenizer import IncrementalDetokenizer

TEXT = "hello 你好, wörld 😀 the capital of France is Paris 🇫🇷!"


def stream_pieces(tok, ids, **kwargs):
    detok = IncrementalDetokenizer(tok, **kwargs)
    pieces = []
    for t in ids:
        detok.add([t])
        pieces.append(detok.delta())
    pieces.append(detok.delta(final=True))
    return detok, pieces


@pytest.mark.parametrize("slow", [False, True], ids=["DecodeStream", "window"])
def test_multibyte_characters_never_surface_as_replacement(slow):
    tok = byte_tokenizer()
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(TEXT.split()) + 10  # the CJK characters and emoji are split into bytes
    if slow:  # no streaming decoder: the window method
        fast = tok

        class Slow:
            def decode(self, ids, skip_special_tokens=True):
                return fast.decode(ids, skip_special_tokens=skip_special_tokens)

        tok = Slow()
    detok, pieces = stream_pieces(tok, ids + [2])  # EOS is a special token: skipped
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == TEXT == detok.text


def test_word_level_pieces_concatenate_to_the_decode():
    tok = word_tokenizer()
    ids = [5, 6, 7, 2, 8]
    _, pieces = stream_pieces(tok, ids)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)


def test_stop_string_cuts_the_text_and_counts_the_tokens():
    tok = byte_tokenizer()
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    detok, pieces = stream_pieces(tok, ids, stop=["France", "zzz"])
    assert "".join(pieces) == detok.text == "hello 你好, wörld 😀 the capital of "
    assert detok.stopped_on == "France"
    # The token that completed "France" is the last one consumed; later ones are not.
    assert "France" in tok.decode(ids[: detok.num_tokens]) and "France" not in tok.decode(ids[: detok.num_tokens - 1])
    incl = IncrementalDetokenizer(tok, stop=["France"], include_stop=True)
    assert incl.add(ids) and incl.delta() == "hello 你好, wörld 😀 the capital of France"


def test_streamed_text_holds_back_what_could_begin_a_stop_string():
    tok = word_tokenizer()
    detok = IncrementalDetokenizer(tok, stop=["w7 w9"])
    detok.add([5])
    assert detok.delta() == ""  # "w5" is held: shorter than the 4 characters that could begin "w7 w9"
    detok.add([6, 7])
    sent = detok.delta()
    assert "w7" not in sent  # " w7" may begin the stop string
    detok.add([8])  # "w5 w6 w7 w8": no stop
    assert not detok.stopped_on
    assert sent + detok.delta(final=True) == "w5 w6 w7 w8"


def test_earliest_stop_string_wins_within_one_piece():
    tok = word_tokenizer()
    detok = IncrementalDetokenizer(tok, stop=["w9", "w8"])
    assert detok.add([5, 8, 9, 10])
    assert detok.text == "w5 " and detok.num_tokens == 2 and detok.stopped_on == "w8"


def test_a_sequence_ending_inside_a_character_ends_as_the_plain_decode():
    """Its last bytes never came: the final text is `tokenizer.decode`'s, U+FFFD included, as
    Transformers' generate and lm-eval's hf backend give it."""
    tok = byte_tokenizer()
    ids = tok("the capital 你好", add_special_tokens=False)["input_ids"][:-1]  # cut inside 好
    detok, pieces = stream_pieces(tok, ids)
    assert "".join(pieces) == detok.text == tok.decode(ids) and detok.text.endswith("\ufffd")
    assert not any("\ufffd" in p for p in pieces[:-1])  # only the final piece carries it
