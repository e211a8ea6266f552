import copy

import pytest
from transformers import AutoTokenizer

from softprompt.tokenize import EmptyTextError, encode, tokenizer_hash

TITLE = "周六晚到卖场听夜场摇滚"
LONG = "三伏天已到，比天气更热的是红星美凯龙的第三届鲁班文化节。这个周末，想避暑的，想找童趣的。" * 3


def pieces(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_single_ends_with_eos_and_is_truncated(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    short, long_ = encode(tiny_tokenizer, [TITLE, LONG], None, max_length=16)
    assert short == pieces(tiny_tokenizer, TITLE) + [eos]
    assert len(pieces(tiny_tokenizer, LONG)) > 16  # the case below really truncates
    assert len(long_) == 16 and long_[-1] == eos
    assert long_[:-1] == pieces(tiny_tokenizer, LONG)[:15]
    assert eos not in long_[:-1]


def test_pairs_keep_both_parts_when_truncated(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    a, b = pieces(tiny_tokenizer, LONG), pieces(tiny_tokenizer, TITLE)
    (ids,) = encode(tiny_tokenizer, [LONG], [TITLE], max_length=12)
    assert len(ids) == 12
    # mT5's pair template: text </s> pair </s>; longest_first trims the long text, not the pair.
    assert ids.count(eos) == 2 and ids[-1] == eos
    first, second = ids[: ids.index(eos)], ids[ids.index(eos) + 1 : -1]
    assert first and second
    assert first == a[: len(first)] and second == b[: len(second)]
    assert len(second) >= min(len(b), 5)

    (untouched,) = encode(tiny_tokenizer, [TITLE], [TITLE], max_length=128)
    assert untouched == b + [eos] + b + [eos]


def test_empty_tokenization_is_reported_with_positions(tiny_tokenizer):
    # A control character gets past a whitespace check but leaves no tokens.
    assert pieces(tiny_tokenizer, "\x01") == []
    with pytest.raises(EmptyTextError) as e:
        encode(tiny_tokenizer, [TITLE, "\x01", TITLE], None, max_length=16)
    assert e.value.rows == [1] and e.value.parts == ["text"]

    with pytest.raises(EmptyTextError) as e:
        encode(tiny_tokenizer, [TITLE, TITLE], [TITLE, "\x01"], max_length=16)
    assert e.value.rows == [1] and e.value.parts == ["text_pair"]

    # A pair squeezed by a tiny max_length is not "empty": both sides had tokens.
    (ids,) = encode(tiny_tokenizer, [LONG], [TITLE], max_length=3)
    assert len(ids) == 3


def test_tokenizer_hash(tiny_tokenizer, tiny_tokenizer_dir):
    h = tokenizer_hash(tiny_tokenizer)
    assert len(h) == 16
    assert tokenizer_hash(AutoTokenizer.from_pretrained(tiny_tokenizer_dir)) == h
    # Tokenizing with truncation leaves state on the backend; it must not change the hash.
    encode(tiny_tokenizer, [LONG], [TITLE], max_length=7)
    assert tokenizer_hash(tiny_tokenizer) == h

    other = copy.deepcopy(tiny_tokenizer)
    other.add_tokens(["鲁班文化节"])
    assert tokenizer_hash(other) != h
