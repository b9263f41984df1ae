import pytest

from minirlhf import UserError
from minirlhf.config import DataConfig
from minirlhf.data.prompts import PromptConfig, first_words, load_prompts


def test_first_words_are_deduplicated_in_order():
    assert first_words(["I love it so much", "i love it", "Great!"], 2) == ["i love", "great!"]


def test_corpus_prompts_come_from_train_and_held_out_from_validation(tmp_path):
    (tmp_path / "c.jsonl").write_text("".join(f'{{"text": "word{i} and more", "label": {i % 2}}}\n' for i in range(40)))
    data = DataConfig(source=str(tmp_path / "c.jsonl"), val_fraction=0.25, test_fraction=0.1)
    train, held = load_prompts(PromptConfig(words=1, template="Say: {prompt}"), data)
    assert all(p.startswith("Say: word") for p in train + held)
    assert not set(train) & set(held) and len(held) == 10
    assert load_prompts(PromptConfig(words=1, template="Say: {prompt}"), data) == (train, held)  # deterministic


def test_prompt_files_split_deterministically_or_use_an_eval_file(tmp_path):
    (tmp_path / "p.jsonl").write_text("".join(f'{{"prompt": "q{i}"}}\n' for i in range(20)))
    (tmp_path / "e.jsonl").write_text('{"prompt": "held 1"}\n{"prompt": "held 2"}\n')
    train, held = load_prompts(PromptConfig(file=str(tmp_path / "p.jsonl")), DataConfig(val_fraction=0.1))
    assert len(train) == 18 and len(held) == 2 and not set(train) & set(held)
    train, held = load_prompts(PromptConfig(file=str(tmp_path / "p.jsonl"), eval_file=str(tmp_path / "e.jsonl")),
                               DataConfig())
    assert len(train) == 20 and held == ["held 1", "held 2"]


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "ok"}\n{"query": "x"}\n', "p.jsonl:2: missing field 'prompt'"),
    ('{"prompt": ""}\n', 'p.jsonl:1: "prompt" must be a non-empty string or a list of messages'),
    ('{"prompt": "a"\n', "p.jsonl:1: not valid JSON"),
])
def test_bad_prompt_files_name_file_line_and_problem(tmp_path, content, message):
    (tmp_path / "p.jsonl").write_text(content)
    with pytest.raises(UserError, match=message):
        load_prompts(PromptConfig(file=str(tmp_path / "p.jsonl")), DataConfig())


def test_template_must_hold_the_prompt(tmp_path):
    with pytest.raises(UserError, match="must contain"):
        load_prompts(PromptConfig(template="no placeholder"), DataConfig())
    with pytest.raises(UserError, match="does not exist"):
        load_prompts(PromptConfig(file=str(tmp_path / "missing.jsonl")), DataConfig())
