"""The command line, run in real subprocesses."""

import json
import shutil

import pytest

from minirlhf.cli import _overrides
from minirlhf.pipeline import explain


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minirlhf: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0]


def test_help_lists_config_keys_with_docs(cli):
    proc = cli("train-classifier", "--help")
    assert proc.returncode == 0
    assert "--train.lr" in proc.stdout and "peak AdamW learning rate" in proc.stdout
    assert "--model.freeze_layers" in proc.stdout


@pytest.mark.parametrize("args, fragments", [
    (["--train.lr=-1"], ["train.lr must be > 0"]),
    (["--train.epochs=two"], ["train.epochs must be int"]),
    (["--train.nope=1"], ["unknown config key 'train.nope'"]),
    (["--device", "tpu"], ["device must be one of auto, cpu, cuda, mps"]),
    (["--config", "missing.yaml"], ["missing.yaml does not exist"]),
    (["--data", "nowhere.jsonl"], ["neither a corpus name"]),
])
def test_bad_config_is_one_line_exit_2(cli, args, fragments):
    assert_one_line_error(cli("train-classifier", *args), *fragments)


def test_imdb_without_the_hub_names_the_alternatives(cli):
    proc = cli("train-classifier", "--data", "imdb", env={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(proc, "cannot load 'imdb' from the Hugging Face hub", "aclImdb folder", ".jsonl/.csv file")


def test_bad_data_file_is_one_line_exit_2_and_leaves_other_files_alone(cli, tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "fine", "label": 1}\n{"text": "oops", "label": "meh"}\n')
    (tmp_path / "keep.txt").write_text("precious")
    proc = cli("train-generator", "--data", "d.jsonl", "--out", "run")
    assert_one_line_error(proc, "d.jsonl:2: label 'meh'")
    assert (tmp_path / "keep.txt").read_text() == "precious" and not (tmp_path / "run").exists()


def test_generator_commands_end_to_end(cli, tmp_path):
    proc = cli("train-generator", "--data.max_train=300", "--data.max_eval=50", "--train.epochs=1",
               "--vocab.max_size=300", "--model.emb_dim=16", "--model.hidden_dim=16", "--out", "gen")
    assert proc.returncode == 0, proc.stderr
    assert "run directory: gen" in proc.stdout and "unigram" in proc.stdout
    proc = cli("generate", "gen", "--prompt", "i love", "-n", "3", "--top-k", "20", "--max-new-tokens", "5")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("i love") for line in lines)
    assert_one_line_error(cli("generate", "gen", "--temperature", "0"), "--temperature must be > 0")
    assert_one_line_error(cli("generate", "gen", "--top-p", "nan"), "--top-p must be a finite number, got nan")
    assert_one_line_error(cli("feedback", "simulate", "--url", "http://127.0.0.1:1", "--judge", "m:f", "--labels", "1",
                              "--beta", "inf"), "--beta must be a finite number, got inf")
    assert_one_line_error(cli("generate", "nowhere", env={"HF_HUB_OFFLINE": "1"}), "'nowhere' is not a run directory")


def test_classifier_commands_end_to_end(cli, tmp_path, tiny_classifier):
    proc = cli("classify", str(tiny_classifier), "what a lovely day", "this is awful")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert [r["text"] for r in rows] == ["what a lovely day", "this is awful"]
    assert all(0 < r["p_positive"] < 1 and isinstance(r["positive_logit"], float) for r in rows)

    (tmp_path / "labelled.csv").write_text("text,label\nI love it,positive\nI hate it,negative\nbest ever,1\n")
    proc = cli("eval-classifier", str(tiny_classifier), "--data", "labelled.csv")
    assert proc.returncode == 0, proc.stderr
    scores = json.loads(proc.stdout.strip().splitlines()[-1])
    assert scores["n"] == 3 and 0 <= scores["accuracy"] <= 1 and 0 <= scores["f1"] <= 1
    assert_one_line_error(cli("eval-classifier", str(tiny_classifier), "--data", "missing.csv"), "neither a corpus name")


def test_train_classifier_cli_writes_a_complete_run(cli, tmp_path):
    (tmp_path / "c.yaml").write_text("data:\n  max_train: 40\n  max_eval: 20\ntrain:\n  epochs: 1\nmodel:\n  max_length: 32\n")
    proc = cli("train-classifier", "--config", "c.yaml", "--model.freeze_layers=5", "--out", "clf")
    assert proc.returncode == 0, proc.stderr
    assert "trainable parameters" in proc.stdout and "run directory: clf" in proc.stdout
    cfg = (tmp_path / "clf" / "config.yaml").read_text()
    assert "freeze_layers: 5" in cfg and "max_train: 40" in cfg
    for name in ("metrics.jsonl", "loss.png", "accuracy.png", "model/config.json", "model/model.safetensors"):
        assert (tmp_path / "clf" / name).is_file(), name


def test_doctor_is_green(cli):
    proc = cli("doctor")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for what in ("torch", "transformers", "device", "MiniLM forward", "SmolLM2 forward", "all good"):
        assert what in proc.stdout


def test_demo_runs_every_stage_end_to_end(cli, tmp_path):
    proc = cli("demo", "--out", "demo", "--classifier.data.max_train=64", "--classifier.data.max_eval=32",
               "--classifier.train.epochs=1", "--generator.data.max_train=300", "--generator.data.max_eval=50",
               "--generator.train.epochs=1", "--generator.vocab.max_size=300", "--generator.model.hidden_dim=32",
               "--generator.samples.n=1", "--ppo.steps=2", "--ppo.batch_size=8", "--ppo.minibatch_size=4",
               "--dtype=fp32")
    assert proc.returncode == 0, proc.stderr
    assert "run directory: demo" in proc.stdout and "win rate" in proc.stdout
    for stage in ("classifier", "generator", "ppo"):  # the demo's run settings reach every stage
        assert "dtype: fp32" in (tmp_path / "demo" / stage / "config.yaml").read_text()
    assert "estimated time: about" in proc.stdout  # the classifier's, before it trains
    closing = " ".join(proc.stdout.split())  # wrapped for the terminal
    assert "nats per response is how far the policy moved" in closing and "Distinct-2" in closing
    for name in ("config.yaml", "classifier/model/config.json", "classifier/accuracy.png",
                 "generator/perplexity.png", "generator/samples.md", "ppo/reward.png", "ppo/results.json",
                 "ppo/report.md", "ppo/samples.md", "ppo/checkpoint/policy/model.safetensors"):
        assert (tmp_path / "demo" / name).is_file(), name
    # --resume: a demo cut short goes on where it stopped. Here PPO lost its closing files after its last checkpoint
    # and the generator never finished: the classifier is kept as it was, the generator starts anew (its leftover
    # moved aside, nothing deleted) and PPO continues from its checkpoint.
    demo = tmp_path / "demo"
    classifier_weights = (demo / "classifier/model/model.safetensors").read_bytes()
    (demo / "ppo/results.json").unlink()
    (demo / "generator/results.json").unlink()
    for folder in (demo / "generator").glob("checkpoint*/"):  # as if killed before its first checkpoint
        shutil.rmtree(folder)
    proc = cli("demo", "--resume", "demo")
    assert proc.returncode == 0, proc.stderr
    assert "finished before: demo/classifier" in proc.stdout and "win rate" in proc.stdout
    assert (demo / "classifier/model/model.safetensors").read_bytes() == classifier_weights
    assert (demo / "ppo/results.json").is_file() and (demo / "generator/results.json").is_file()
    assert list(tmp_path.glob("demo/generator.replaced*"))
    refused = cli("demo", "--resume", "demo", "--ppo.steps=5")
    assert refused.returncode == 2 and "--ppo.steps cannot change" in refused.stderr


def test_demo_explains_kl_and_distinct_2_and_calls_out_collapse():
    def results(policy_distinct_2: float, health: list | None) -> dict:
        return {"win_rate": 0.98, "kl": 9.04, "policy": {"distinct_2": policy_distinct_2},
                "reference": {"distinct_2": 0.90}, "health": health}

    def said(*args) -> str:
        return " ".join(explain(results(*args)).split())  # wrapped for the terminal

    collapsed = said(0.22, [{"step": 14, "guard": "diversity_collapse", "message": "..."}])
    assert "98%" in collapsed and "KL 9.0 nats" in collapsed and "8,434 times" in collapsed
    assert "COLLAPSE" in collapsed and "Distinct-2 0.22 (reference 0.90)" in collapsed
    assert "diversity_collapse at step 14" in collapsed
    healthy = said(0.73, [])
    assert "COLLAPSE" not in healthy and "keeps 81% of the reference's variety" in healthy
    assert "No health check fired" in healthy
    assert "health check" not in said(0.73, None)  # guards off: nothing said about them


def test_rl_commands_train_evaluate_and_generate(cli, tmp_path, tiny_generator, tiny_classifier):
    proc = cli("ppo", "--policy", str(tiny_generator), "--reward", str(tiny_classifier), "--steps=2", "--batch_size=8",
               "--minibatch_size=4", "--data.max_train=300", "--data.max_eval=60", "--prompts.max_eval=8", "--out", "ppo")
    assert proc.returncode == 0, proc.stderr
    assert "held-out reward" in proc.stdout and "run directory: ppo" in proc.stdout
    proc = cli("evaluate", "ppo", "-n", "6", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "ppo" / "eval.json").read_text())
    assert results["prompts"] == 6 and 0 <= results["win_rate"] <= 1
    for side in ("policy", "reference"):
        assert 0 < results[side]["distinct_1"] <= 1 and results[side]["ref_perplexity"] > 1
    report = (tmp_path / "ppo" / "report.md").read_text()
    assert "| mean reward |" in report and "![reward](reward.png)" in report and "## Samples" in report
    proc = cli("generate", "ppo", "--prompt", "i love", "-n", "2", "--max-new-tokens", "4")
    assert proc.returncode == 0, proc.stderr
    assert [line.startswith("i love") for line in proc.stdout.strip().splitlines()] == [True, True]


def test_rl_commands_reject_bad_input_in_one_line(cli, tmp_path, tiny_generator):
    assert_one_line_error(cli("ppo", "--steps=1"), "ppo needs --policy")
    assert_one_line_error(cli("ppo", "--policy", str(tiny_generator), "--reward", "nowhere"),
                          "reward classifier nowhere is not a trained classifier run")
    assert_one_line_error(cli("grpo", "--policy", str(tiny_generator), "--batch_size=6"), "multiple of group_size=4")
    assert_one_line_error(cli("ppo", "--critic=shared"), "critic must be one of head, separate")
    assert_one_line_error(cli("evaluate", str(tiny_generator)), "is not an RL run with a checkpoint")
    proc = cli("grpo", "--help")
    assert proc.returncode == 0 and "--group_size" in proc.stdout and "--reward.unended_weight" in proc.stdout


def test_generate_works_on_a_causal_lm_by_name(cli):
    proc = cli("generate", "smollm2", "--prompt", "Say hello.", "-n", "2", "--max-new-tokens", "5")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


def test_debug_shows_the_traceback_with_its_cause(cli, tmp_path):
    (tmp_path / "broken.yaml").write_text("train: [unclosed\n")
    quiet = cli("train-classifier", "--config", "broken.yaml")
    assert_one_line_error(quiet, "broken.yaml is not valid YAML")
    loud = cli("--debug", "train-classifier", "--config", "broken.yaml")
    assert loud.returncode == 2 and "Traceback" in loud.stderr and "ConfigError" in loud.stderr
    assert "yaml.parser.ParserError" in loud.stderr or "ScannerError" in loud.stderr  # the cause is kept
    assert loud.stderr.strip().splitlines()[-1].startswith("minirlhf: error:")
    env = cli("train-classifier", "--config", "broken.yaml", env={"MINIRLHF_DEBUG": "1"})
    assert env.returncode == 2 and "Traceback" in env.stderr


def test_options_take_a_value_after_an_equals_sign_or_a_space_and_a_bare_one_is_a_switch():
    assert _overrides(["--policy_options.train_head", "--steps=3", "--seed", "2", "--policy_options.lora_rank", "4"]) \
        == ["--policy_options.train_head=true", "--steps=3", "--seed=2", "--policy_options.lora_rank=4"]
