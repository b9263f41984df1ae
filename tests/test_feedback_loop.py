"""The whole human-feedback loop, as a person runs it: serve, judge, export, train a reward model on the
judgements, then RLHF against that reward model. Real server, real HTTP, real SQLite, real models."""

import html
import json
import re

from test_feedback import Server, add_annotator, field, request


def shown(page: str, side: str) -> str:
    m = re.search(rf'id="response-{side}">\s*<h3>[^<]*</h3>\s*<div class="text( empty)?">(.*?)</div>', page, re.S)
    return "" if m.group(1) else html.unescape(m.group(2)).strip()


def judge_longer(link: str, n: int) -> None:
    """A person who always prefers the longer response (a taste a reward model can pick up)."""
    done = 0
    status, page = request(link)
    while done < n:
        pair_id = field(page, "pair_id")
        if pair_id is None:
            status, page = request(link)
            continue
        a, b = (shown(page, side) for side in "ab")
        choice = "a" if len(a) >= len(b) else "b"
        status, page = request(link.replace("/?", "/judge?"),
                               {"pair_id": pair_id, "choice": choice, "csrf": field(page, "csrf")})
        assert status == 200, page
        done += 1


def test_serve_judge_export_train_reward_model_then_ppo(tiny_generator, tmp_path, cli):
    server = Server("--policy", str(tiny_generator), "--db", "f.sqlite", "--max-new-tokens", "12", "--ahead", "16",
                    cwd=tmp_path)
    try:
        judge_longer(add_annotator(server, "ann"), 30)
    finally:
        server.stop()

    out = cli("feedback", "export", "--db", "f.sqlite", "--out", "prefs.jsonl")
    assert out.returncode == 0, out.stderr
    pairs = [json.loads(line) for line in (tmp_path / "prefs.jsonl").read_text().splitlines()]
    assert len(pairs) == 30 and all(len(p["chosen"]) >= len(p["rejected"]) for p in pairs)

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
