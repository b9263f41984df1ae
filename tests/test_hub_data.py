"""hf:NAME[:split] sources read through `datasets` (local folders and files here: the hub is not reachable), the
preference layouts, and the one-line answer when a hub dataset is asked for offline."""

import json
from pathlib import Path

import pytest
from test_cli import assert_one_line_error

from minirlhf import UserError
from minirlhf.config import DataConfig, PreferenceDataConfig
from minirlhf.data.preferences import load_split, read_pairs
from minirlhf.data.prompts import PromptConfig, load_prompts, read_prompts
from minirlhf.data.sentiment import load_splits, read_source
from minirlhf.data.sft import read_examples

SHARED_HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "preferences" / "hh_rlhf.jsonl"


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


HH_PROMPT = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant:"
LAYOUTS = [
    ("prompt, chosen, rejected strings",
     {"prompt": "Tell me a joke", "chosen": " Why did the chicken cross the road?", "rejected": "No."},
     ("Tell me a joke", " Why did the chicken cross the road?", "No.")),
    ("Anthropic HH text",
     {"chosen": HH_PROMPT + " Why did the chicken cross the road?", "rejected": HH_PROMPT + " No."},
     (HH_PROMPT, " Why did the chicken cross the road?", " No.")),
    ("HH text diverging before the last turn: the common part, cut back to its last Assistant:",
     {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: joke?\n\nAssistant: Sure", "rejected":
      "\n\nHuman: Hi\n\nAssistant: Go away"},
     ("\n\nHuman: Hi\n\nAssistant:", " Hello\n\nHuman: joke?\n\nAssistant: Sure", " Go away")),
    ("UltraFeedback-binarized: a prompt string, and chosen/rejected holding the whole conversation",
     {"prompt": "What is 2+2?", "prompt_id": "x", "score_chosen": 9.0, "score_rejected": 2.0,
      "chosen": [user("What is 2+2?"), assistant("4")], "rejected": [user("What is 2+2?"), assistant("5")]},
     ("\n\nHuman: What is 2+2?\n\nAssistant:", "4", "5")),
    ("TRL conversational, implicit prompt, several turns and a system message",
     {"chosen": [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello"), user("Joke?"),
                 assistant("Knock knock.")],
      "rejected": [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello"), user("Joke?"),
                   assistant("No.")]},
     ("\n\nSystem: Be brief.\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Joke?\n\nAssistant:", "Knock knock.", "No.")),
    ("TRL conversational, explicit prompt as messages",
     {"prompt": [user("Hi"), assistant("Hello"), user("Joke?")], "chosen": [assistant("Knock knock.")],
      "rejected": [assistant("No.")]},
     ("\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Joke?\n\nAssistant:", "Knock knock.", "No.")),
    ("TRL conversational, explicit prompt as a string",
     {"prompt": "Say hi", "chosen": [assistant("hi")], "rejected": [assistant("go away")]},
     ("Say hi", "hi", "go away")),
]


@pytest.mark.parametrize("name, row, expected", LAYOUTS, ids=[n.split(":")[0] for n, _, _ in LAYOUTS])
def test_every_layout_converts_to_prompt_chosen_rejected(tmp_path, name, row, expected):
    pairs = read_pairs(jsonl(tmp_path / "p.jsonl", [row, row]))
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [expected, expected]


@pytest.mark.parametrize("rows, message", [
    ([{"question": "q", "answer": "a"}], "p.jsonl:1: not a known preference layout (fields: answer, question)"),
    ([{"chosen": "no transcript", "rejected": "here"}], 'p.jsonl:1: no "prompt", and "chosen" and "rejected" are not'),
    ([{"chosen": [user("a"), assistant("b")], "rejected": [user("other"), assistant("c")]}],
     "p.jsonl:1: \"chosen\" and \"rejected\" differ before their last message"),
    ([{"chosen": [user("a")], "rejected": [user("a"), assistant("c")]}], "p.jsonl:1: 'chosen' must be a list"),
    ([{"prompt": "p", "chosen": "a", "rejected": "b"},  # the layout is the first row's; a row in another names its line
      {"prompt": "q", "chosen": [assistant("x")], "rejected": [assistant("y")]}],
     "p.jsonl:2: field 'chosen' must be a string"),
])
def test_unknown_or_broken_layouts_are_one_line_errors(tmp_path, rows, message):
    with pytest.raises(UserError) as e:
        read_pairs(jsonl(tmp_path / "p.jsonl", rows))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_unknown_layout_error_lists_the_layouts_accepted(tmp_path):
    with pytest.raises(UserError) as e:
        read_pairs(jsonl(tmp_path / "p.jsonl", [{"text": "x", "label": 1}]))
    for layout in ('{"prompt", "chosen", "rejected"}', "Anthropic HH text", "TRL conversational",
                   "UltraFeedback-binarized"):
        assert layout in str(e.value)


@pytest.mark.skipif(not SHARED_HH.is_file(), reason="shared/data is not beside this checkout")
def test_shared_hh_pairs_read_the_same_as_whole_hh_transcripts(tmp_path):
    """The real HH-RLHF pairs (prompt/chosen/rejected strings): as published, whole transcripts, they split back into
    exactly the same pairs, the README's fallback rows (diverging before the last turn) included."""
    rows = [json.loads(line) for line in SHARED_HH.read_text(encoding="utf-8").splitlines()]
    pairs = read_pairs(SHARED_HH)
    assert len(pairs) == 7500 and [(p.prompt, p.chosen, p.rejected) for p in pairs] == \
        [(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    whole = jsonl(tmp_path / "hh.jsonl", [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
                                          for r in rows])
    assert read_pairs(whole) == pairs


def test_preferences_from_a_local_folder_go_through_datasets(tmp_path):
    folder = tmp_path / "prefs"
    jsonl(folder / "train.jsonl", [{"prompt": f"q{i}", "chosen": [user(f"q{i}"), assistant("good")],
                                    "rejected": [user(f"q{i}"), assistant("bad")]} for i in range(10)])
    jsonl(folder / "test.jsonl", [{"prompt": "held", "chosen": [user("held"), assistant("yes")],
                                   "rejected": [user("held"), assistant("no")]}])
    pairs = read_pairs(f"hf:{folder}")  # no split named: the train split
    assert len(pairs) == 10 and (pairs[3].prompt, pairs[3].chosen, pairs[3].rejected) == \
        ("\n\nHuman: q3\n\nAssistant:", "good", "bad")
    train, held = load_split(PreferenceDataConfig(preferences=f"hf:{folder}", eval_file=f"hf:{folder}:test"))
    assert len(train) == 10 and [(p.prompt, p.chosen) for p in held] == [("\n\nHuman: held\n\nAssistant:", "yes")]
    assert read_pairs(f"hf:{folder / 'test.jsonl'}") == held  # a single data file, through datasets' json loader


def test_a_bad_row_from_datasets_names_the_dataset_split_and_row(tmp_path):
    folder = tmp_path / "prefs"
    jsonl(folder / "train.jsonl", [{"prompt": "a", "chosen": "x", "rejected": "y"},
                                   {"prompt": "", "chosen": "x", "rejected": "y"}])
    with pytest.raises(UserError, match=rf"hf:{folder}:train\[1\]: \"prompt\" must be a non-empty string"):
        read_pairs(f"hf:{folder}")
    with pytest.raises(UserError, match="no such folder or file"):
        read_pairs(f"hf:{tmp_path / 'missing'}")


def test_sentiment_data_from_a_local_folder_or_file_go_through_datasets(tmp_path):
    folder = tmp_path / "sst"
    jsonl(folder / "train.jsonl", [{"idx": i, "sentence": f"text {i}", "label": i % 2} for i in range(40)])
    jsonl(folder / "test.jsonl", [{"idx": i, "sentence": f"held {i}", "label": i % 2} for i in range(6)])
    parts = read_source(f"hf:{folder}")
    assert sorted(parts) == ["test", "train"] and parts["train"][:2] == [("text 0", 0), ("text 1", 1)]
    splits = load_splits(DataConfig(source=f"hf:{folder}", val_fraction=0.25))
    assert len(splits.train) == 30 and len(splits.val) == 10 and sorted(t for t, _ in splits.test)[0] == "held 0"
    assert read_source(f"hf:{folder}:test") == {"all": parts["test"]}
    (tmp_path / "r.csv").write_text("text,label\ngreat,positive\nawful,negative\n")
    assert read_source(f"hf:{tmp_path / 'r.csv'}") == {"all": [("great", 1), ("awful", 0)]}
    s = load_splits(DataConfig(source=f"hf:{folder}:train", test_source=f"hf:{folder}", val_fraction=0.25))
    assert len(s.test) == 6 and len(s.train) == 30  # test_source with splits gives its test split


def test_prompts_from_a_local_folder_go_through_datasets(tmp_path):
    folder = tmp_path / "prompts"
    jsonl(folder / "train.jsonl", [{"text": f"Write about topic {i}"} for i in range(20)])
    assert read_prompts(f"hf:{folder}")[:2] == ["Write about topic 0", "Write about topic 1"]
    train, held = load_prompts(PromptConfig(file=f"hf:{folder}", template="Q: {prompt}"), DataConfig(val_fraction=0.1))
    assert len(train) == 18 and len(held) == 2 and all(p.startswith("Q: Write about topic") for p in train + held)


def test_sft_examples_from_a_local_folder_or_file_go_through_datasets(tmp_path):
    folder = tmp_path / "chats"
    jsonl(folder / "train.jsonl", [{"messages": [user(f"Say {i}"), assistant(f"number {i}")]} for i in range(6)])
    jsonl(folder / "test.jsonl", [{"messages": [user("Say held"), assistant("held out")]}])
    assert [(e.prompt, e.response) for e in read_examples(f"hf:{folder}")[:2]] == \
        [("\n\nHuman: Say 0\n\nAssistant:", "number 0"), ("\n\nHuman: Say 1\n\nAssistant:", "number 1")]
    assert [e.response for e in read_examples(f"hf:{folder}:test")] == ["held out"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["Tell me a joke", "2+2?"], "response": ["Knock knock.", "4"]}),
                   tmp_path / "sft.parquet")
    assert [(e.prompt, e.response) for e in read_examples(f"hf:{tmp_path / 'sft.parquet'}")] == \
        [("Tell me a joke", "Knock knock."), ("2+2?", "4")]
    pq.write_table(pa.table({"prompt": ["a"], "response": [""]}), tmp_path / "bad.parquet")
    with pytest.raises(UserError, match=rf"hf:{tmp_path / 'bad.parquet'}:train\[0\]: the response must be a non-empty"):
        read_examples(f"hf:{tmp_path / 'bad.parquet'}")


@pytest.mark.parametrize("command, flag", [("train-reward-model", "--preferences"), ("train-classifier", "--data"),
                                           ("sft", "--data")])
def test_offline_hub_dataset_is_one_line_saying_how_to_pass_a_file(cli, command, flag):
    proc = cli(command, flag, "hf:some/name:test", env={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(proc, "cannot load 'some/name' from the Hugging Face hub (HF_HUB_OFFLINE=1)",
                          "load_dataset('some/name', split='test').to_json('name-test.jsonl')",
                          f"pass {flag}=name-test.jsonl instead")


def test_offline_hub_prompts_name_the_prompts_option(monkeypatch):
    import datasets
    from huggingface_hub import constants

    for where in (datasets.config, constants):  # what HF_HUB_OFFLINE=1 sets when the libraries are imported
        monkeypatch.setattr(where, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as e:
        read_prompts("hf:some/prompts")
    assert str(e.value).startswith("cannot load 'some/prompts' from the Hugging Face hub (HF_HUB_OFFLINE=1)")
    assert str(e.value).endswith("pass --prompts.file=prompts-train.jsonl instead") and "\n" not in str(e.value)
