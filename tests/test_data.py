import json

import pytest
from test_cli import assert_one_line_error

from minirlhf import UserError
from minirlhf.config import DataConfig
from minirlhf.data.preferences import read_pairs
from minirlhf.data.prompts import read_prompts
from minirlhf.data.sentiment import CSV_FIELD_LIMIT, load_splits, read_source, read_tweets
from minirlhf.data.sft import read_examples


def write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


def test_jsonl_and_csv_readers_accept_both_label_styles(tmp_path):
    f = write(tmp_path / "r.jsonl", '{"text": "great", "label": 1}\n\n{"text": "bad", "label": "negative"}\n'
                                    '{"text": "ok\\u2028fine", "label": "positive"}\n')
    assert read_source(str(f)) == {"all": [("great", 1), ("bad", 0), ("ok\u2028fine", 1)]}
    c = write(tmp_path / "r.csv", 'text,label\n"great, really",positive\nbad,0\n')
    assert read_source(str(c)) == {"all": [("great, really", 1), ("bad", 0)]}


def test_aclimdb_folder_reader(tmp_path):
    for split in ("train", "test"):
        for pol in ("pos", "neg"):
            (tmp_path / split / pol).mkdir(parents=True)
            for i in range(3):
                write(tmp_path / split / pol / f"{i}_7.txt", f"{split} {pol} review {i}<br />ok")
    parts = read_source(str(tmp_path))
    assert len(parts["train"]) == 6 and len(parts["test"]) == 6
    assert sum(y for _, y in parts["train"]) == 3
    assert ("train pos review 0<br />ok", 1) in parts["train"]


@pytest.mark.parametrize("name, content, message", [
    ("a.jsonl", '{"text": "x", "label": 1}\n{"text": "y"}\n', "a.jsonl:2: missing field 'label'"),
    ("b.jsonl", '{"text": "x", "label": "maybe"}\n', "b.jsonl:1: label 'maybe' is not one of 0/1 or negative/positive"),
    ("c.jsonl", '{"text": "x", "label": 1}\n{"text": "x", "label": 1\n', "c.jsonl:2: not valid JSON"),
    ("d.jsonl", "", "d.jsonl: the file is empty"),
    ("e.jsonl", '{"text": "", "label": 1}\n', "e.jsonl:1: field 'text' must be a non-empty string"),
    ("f.csv", "text,score\nx,1\n", "f.csv:1: missing column 'label'"),
    ("g.csv", "text,label\nx,1\ny,2\n", "g.csv:3: label '2'"),
    ("h.csv", "", "h.csv: the file is empty"),
    ("i.txt", "x", "unknown file type '.txt'"),
])
def test_malformed_files_name_file_line_and_problem(tmp_path, name, content, message):
    f = write(tmp_path / name, content)
    with pytest.raises(UserError) as e:
        read_source(str(f))
    assert message in str(e.value)


def test_bad_encoding_names_the_line(tmp_path):
    f = tmp_path / "latin.jsonl"
    f.write_bytes(b'{"text": "ok", "label": 1}\n{"text": "caf\xe9", "label": 1}\n')
    with pytest.raises(UserError, match=r"latin.jsonl:2: not valid UTF-8"):
        read_source(str(f))


def test_unknown_source():
    with pytest.raises(UserError, match="neither a corpus name"):
        read_source("no-such-corpus")


def test_tweets_corpus_is_binary_and_large():
    rows = read_tweets()
    pos = sum(y for _, y in rows)
    assert len(rows) > 20000 and 5000 < pos < len(rows) - 5000
    assert all(isinstance(t, str) and t for t, _ in rows[:100])


def test_splits_are_deterministic_disjoint_and_capped(tmp_path):
    rows = [{"text": f"text number {i}", "label": i % 2} for i in range(200)]
    f = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows))
    cfg = DataConfig(source=str(f), val_fraction=0.1, test_fraction=0.2)
    a, b = load_splits(cfg), load_splits(cfg)
    assert a == b
    assert (len(a.train), len(a.val), len(a.test)) == (140, 20, 40)
    texts = [set(t for t, _ in part) for part in (a.train, a.val, a.test)]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    other = load_splits(DataConfig(source=str(f), split_seed=1))
    assert other.train != a.train
    capped = load_splits(DataConfig(source=str(f), max_train=7, max_eval=3))
    assert (len(capped.train), len(capped.val), len(capped.test)) == (7, 3, 3)
    assert "positive" in a.summary()


def test_test_source_replaces_the_carved_test_split(tmp_path):
    f = write(tmp_path / "train.jsonl", "\n".join(json.dumps({"text": f"t{i}", "label": i % 2}) for i in range(50)))
    g = write(tmp_path / "test.jsonl", "\n".join(json.dumps({"text": f"u{i}", "label": i % 2}) for i in range(30)))
    s = load_splits(DataConfig(source=str(f), test_source=str(g), val_fraction=0.2))
    assert len(s.test) == 30 and len(s.train) == 40 and len(s.val) == 10
    assert all(t.startswith("u") for t, _ in s.test)


def test_a_split_left_empty_is_a_user_error(tmp_path):
    f = write(tmp_path / "two.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n')
    with pytest.raises(UserError, match="none for validation"):
        load_splits(DataConfig(source=str(f), val_fraction=0.1, test_fraction=0.1))


def test_a_csv_field_longer_than_pythons_default_limit_is_read(tmp_path):
    review = "a long review " * 15_000  # 210,000 characters: past csv's default field_size_limit of 131,072
    f = write(tmp_path / "long.csv", f'text,label\n"{review}",positive\nshort,0\n')
    assert read_source(str(f)) == {"all": [(review, 1), ("short", 0)]}


def test_a_csv_field_past_the_limit_names_the_file_and_the_line_it_starts_on(tmp_path):
    f = write(tmp_path / "huge.csv", f'text,label\nok,1\n"{"x" * CSV_FIELD_LIMIT}\n",1\nok,0\n')
    with pytest.raises(UserError) as e:
        read_source(str(f))
    assert str(e.value).startswith(f"{f}:3: not valid CSV (field larger than field limit ({CSV_FIELD_LIMIT}))")


@pytest.mark.parametrize("reader", [
    lambda path: read_source(str(path)), read_pairs, read_prompts, read_examples,
], ids=["sentiment", "preferences", "prompts", "sft"])
def test_json_nested_too_deeply_names_the_file_and_line(tmp_path, reader):
    """json.loads recurses once per level: 100,000 levels raise RecursionError, which must not escape as one."""
    f = write(tmp_path / "deep.jsonl", '{"text": "fine", "label": 1}\n' + "[" * 100_000 + "\n")
    with pytest.raises(UserError, match="deep.jsonl:2: JSON nested too deeply to read"):
        reader(f)


def test_unreadable_csv_and_json_are_one_line_exit_2(cli, tmp_path):
    write(tmp_path / "huge.csv", f'text,label\n"{"x" * (CSV_FIELD_LIMIT + 1)}",1\n')
    assert_one_line_error(cli("eval-classifier", "no-run", "--data", "huge.csv"), "huge.csv:2: not valid CSV")
    write(tmp_path / "deep.jsonl", "[" * 100_000 + "\n")
    assert_one_line_error(cli("train-reward-model", "--preferences", "deep.jsonl"),
                          "deep.jsonl:1: JSON nested too deeply to read")
