"""The whole human-feedback loop, as a person runs it: serve, judge (a simulated person, through the page's
HTTP endpoints), export, train a reward model on the judgements, then RLHF against that reward model. Real server,
real HTTP, real SQLite, real models."""

import json

from test_feedback import Server

LONGER = "def longer(prompts, responses):\n    return [len(r) for r in responses]\n"


def test_serve_judge_export_train_reward_model_then_ppo(tiny_generator, tmp_path, cli):
    server = Server("--policy", str(tiny_generator), "--db", "f.sqlite", "--max-new-tokens", "12", "--ahead", "16",
                    cwd=tmp_path)
    (tmp_path / "judge.py").write_text(LONGER)  # a person who always prefers the longer response (a taste a
    try:  # reward model can pick up), simulated on the page
        out = cli("feedback", "simulate", "--url", server.admin_url, "--judge", "judge:longer", "--labels", "30",
                  "--beta", "1e9", "--timeout", "120")
        assert out.returncode == 0, out.stderr
    finally:
        server.stop()

    out = cli("feedback", "export", "--db", "f.sqlite", "--out", "prefs.jsonl")
    assert out.returncode == 0, out.stderr
    pairs = [json.loads(line) for line in (tmp_path / "prefs.jsonl").read_text().splitlines()]
    assert len(pairs) == 30 and all(len(p["chosen"]) >= len(p["rejected"]) for p in pairs)
    # with where each pair came from, beside what the reward model reads
    assert {p["annotator"] for p in pairs} == {"simulated-1"} and {p["round"] for p in pairs} == {None}
    assert all(p[side]["model"] == str(tiny_generator) and p[side]["max_new_tokens"] == 12
               for p in pairs for side in ("chosen_provenance", "rejected_provenance"))

    out = cli("train-reward-model", "--preferences", "prefs.jsonl", "--out", "rm", "--device", "cpu",
              "--model.max_length=32", "--train.epochs=1", "--train.batch_size=8", "--eval_fraction=0.2")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "rm" / "model" / "reward_model.json").is_file()

    out = cli("ppo", "--policy", str(tiny_generator), "--reward", "rm", "--out", "ppo", "--device", "cpu",
              "--steps=2", "--batch_size=8", "--minibatch_size=4", "--ppo_epochs=1", "--prompts.max_eval=8",
              "--data.max_train=400", "--data.max_eval=100")
    assert out.returncode == 0, out.stderr
    config = (tmp_path / "ppo" / "config.yaml").read_text()
    assert "reward_model: rm" in config
    rows = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward/reward_model" in r] == [1, 2]
    assert "reward_model" in (tmp_path / "ppo" / "report.md").read_text()
