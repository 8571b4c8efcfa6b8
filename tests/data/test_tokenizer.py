"""The demo tokenizer: byte-level round trip, single-digit tokens, specials, determinism, save/load."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from kava.data.synthetic import make_splits
from kava.data.tokenizer import SPECIAL_TOKENS, build_demo_tokenizer


def _corpus():
    train, _ = make_splits(800, 0, seed=0)
    return [f"{e.question} {' '.join(e.steps)} The answer is: {e.answer}" for e in train]


@pytest.fixture(scope="module")
def tok():
    return build_demo_tokenizer(_corpus(), vocab_size=512)


def test_vocab_specials_and_no_added_specials(tok):
    assert len(tok) == 512
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<s>", "</s>")
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    assert tok.pad_token_id == 0 and tok.bos_token_id == 1 and tok.eos_token_id == 2
    ids = tok("Tom has 5 apples.")["input_ids"]
    assert 0 not in ids and 1 not in ids and 2 not in ids
    # BPE learned merges from the corpus: common words are single tokens
    assert len(tok(" apples")["input_ids"]) == 1


def test_every_digit_is_its_own_token(tok):
    ids = tok("He has 1234567890 apples and 48 more. <<12*4=48>>")["input_ids"]
    pieces = [tok.decode([i]) for i in ids]
    for p in pieces:
        if any(c.isdigit() for c in p):
            assert len(p) == 1, pieces
    digit_ids = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    assert len(set(digit_ids)) == 10 and tok.unk_token_id not in digit_ids
    # a number is spelled the same after a space, after "=" and at the start
    assert tok(" 48")["input_ids"][1:] == tok("=48")["input_ids"][1:] == tok("48")["input_ids"]


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=80))
def test_roundtrip_any_unicode(tok, text):
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.unk_token_id is None or tok.unk_token_id not in ids


def test_deterministic_and_save_reload(tmp_path):
    corpus = _corpus()
    a = build_demo_tokenizer(corpus, save_dir=tmp_path / "tok")
    b = build_demo_tokenizer(corpus)
    assert a.get_vocab() == b.get_vocab()
    re_tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    text = "Zoë has 12 crayons; 世界 🙂\n<<12+3=15>>"
    assert re_tok(text)["input_ids"] == a(text)["input_ids"] == b(text)["input_ids"]
    assert re_tok.decode(a(text)["input_ids"]) == text
    assert (re_tok.pad_token_id, re_tok.bos_token_id, re_tok.eos_token_id) == (0, 1, 2)
    # a different corpus gives a different vocabulary
    assert build_demo_tokenizer(["zebra quokka " * 50]).get_vocab() != a.get_vocab()


def test_vocab_size_too_small():
    with pytest.raises(ValueError, match="vocab_size"):
        build_demo_tokenizer(["abc"], vocab_size=100)
    tiny = build_demo_tokenizer([], vocab_size=259)  # bytes + specials only, still encodes anything
    assert tiny.decode(tiny("ok 7 ✓")["input_ids"]) == "ok 7 ✓"
