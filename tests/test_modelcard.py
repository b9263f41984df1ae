"""Model cards: front matter the hub reads, the key results, the command, and loading instructions that work."""

import json
import re

import yaml

from minirlhf.modelcard import write_model_card

RESULTS = {"prompts": 64, "kl": 15.518701553344727, "reward_policy": 2.367140531539917, "win_rate": 1.0,
           "reward_reference": -0.42833977937698364, "policy": {"reward": 2.3, "distinct_1": 0.24},
           "samples": [{"prompt": "p"}], "note": "text is not a result", "converged": True}
COMMAND = "minirlhf dpo --policy smollm2 --preferences hf:Anthropic/hh-rlhf --beta=0.1 --out runs/dpo-hh"


def split_card(text: str) -> tuple[dict, str]:
    m = re.fullmatch(r"---\n(.*?)\n---\n(.*)", text, flags=re.S)
    assert m, text[:200]
    return yaml.safe_load(m.group(1)), m.group(2)


def policy_folder(tmp_path):
    """A run directory with a causal-LM policy folder, as the model classes save them (the files the card reads)."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text('{"stage": "dpo"}')
    folder = tmp_path / "run" / "checkpoint" / "policy"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (folder / "policy.json").write_text('{"kind": "causal_lm", "chat_template": true}')
    return folder


def test_policy_card_front_matter_results_and_command(tmp_path):
    folder = policy_folder(tmp_path)
    path = write_model_card(folder, base_model="smollm2", method="dpo", data="hf:Anthropic/hh-rlhf:train",
                            results=RESULTS, command=COMMAND)
    assert path == folder / "README.md" and sorted(p.name for p in folder.iterdir()) == \
        ["README.md", "config.json", "policy.json"]  # written atomically: no temporary file left behind
    meta, body = split_card(path.read_text())
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["library_name"] == "transformers"
    assert {"minirlhf", "rlhf", "dpo"} <= set(meta["tags"]) and meta["datasets"] == ["Anthropic/hh-rlhf"]
    rows = re.findall(r"^\| (\S+) \| (\S+) \|$", body, flags=re.M)[2:]  # the header and its rule skipped
    assert rows == [("reward_policy", "2.367"), ("reward_reference", "-0.4283"), ("win_rate", "1"), ("kl", "15.52"),
                    ("prompts", "64")]  # the key figures first; nested, text and true/false entries left out
    assert f"```bash\n{COMMAND}\n```" in body
    assert "4-bit" in body and "Q4_1" in body  # the offline smollm2 is a dequantized GGUF: the card says so
    assert f"--policy {tmp_path / 'run'}" in body


def test_dpo_and_sft_figures_after_training_are_in_the_table(tmp_path):
    results = {"pairs_train": 90, "before": {"rewards/accuracy": 0.5},
               "after": {"rewards/accuracy": 0.625, "loss": 0.61}}
    path = write_model_card(policy_folder(tmp_path), base_model=None, method="dpo", data=None, results=results,
                            command=COMMAND)
    _, body = split_card(path.read_text())
    assert "| after/rewards/accuracy | 0.625 |\n| pairs_train | 90 |\n| after/loss | 0.61 |" in body
    assert "before" not in body


def test_reward_model_card_of_a_local_base_and_local_data(tmp_path):
    folder = tmp_path / "run" / "model"
    folder.mkdir(parents=True)
    (tmp_path / "run" / "run.json").write_text('{"stage": "reward_model"}')
    (folder / "reward_model.json").write_text('{"pooling": "mean"}')
    (tmp_path / "base").mkdir()
    path = write_model_card(folder, base_model=str(tmp_path / "base"), method="reward_model",
                            data="pairs.jsonl", results={"train_pairs": 900, "length_baseline": 0.54,
                                                         "eval_accuracy": 0.71}, command="minirlhf train-reward-model")
    meta, body = split_card(path.read_text())
    assert "base_model" not in meta and "datasets" not in meta  # a local folder and file are not hub names
    assert meta["library_name"] == "minirlhf" and "reward-model" in meta["tags"]
    assert "| eval_accuracy | 0.71 |\n| length_baseline | 0.54 |\n| train_pairs | 900 |" in body
    assert f"minirlhf eval-reward-model {tmp_path / 'run'}" in body and "`pairs.jsonl`" in body


def test_the_loading_instructions_load_the_folder(tmp_path):
    """The card's Python snippet, run as written, loads a real transformers policy folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from minirlhf.models.classifier import resolve_encoder

    folder = policy_folder(tmp_path)
    config = LlamaConfig(vocab_size=30522, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_encoder("minilm")).save_pretrained(folder)
    path = write_model_card(folder, base_model="org/tiny", method="ppo", data="tweets", results={}, command=COMMAND)
    meta, body = split_card(path.read_text())
    assert meta["base_model"] == "org/tiny" and "datasets" not in meta and "No numeric results" in body
    snippet = re.search(r"```python\n(.*?)```", body, flags=re.S).group(1)
    scope = {}
    exec(snippet, scope)
    assert scope["model"].config.hidden_size == 16 and scope["tokenizer"]("hi")["input_ids"][0] == 101
