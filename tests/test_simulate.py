"""The simulated annotator: its Bradley–Terry draws against a naive count, the beta that gives an agreement, and
simulated people judging on a real server subprocess through its HTTP endpoints (links, CSRF, cookies)."""

import json
import math
import random
import sqlite3

import pytest
import torch

from minirlhf.data.dialogue import to_messages
from minirlhf.feedback.simulate import beta_for_agreement, prefers_a, prompt_from_turns
from test_feedback import Server

RECORDING_JUDGE = '''
import json

def words(prompts, responses):
    """Scores each response by its word count, and writes down what it was shown."""
    with open("seen.jsonl", "a") as f:
        f.write(json.dumps({"prompt": prompts[0], "a": responses[0], "b": responses[1]}) + "\\n")
    return [len(r.split()) for r in responses]
'''


@pytest.mark.parametrize("difference,beta", [(0.0, 1.0), (1.0, 1.0), (-0.5, 3.0), (2.0, 0.0)])
def test_prefers_a_with_the_bradley_terry_probability(difference, beta):
    rng, n = random.Random(0), 20000
    share = sum(prefers_a(difference, 0.0, beta, rng) for _ in range(n)) / n
    assert share == pytest.approx(1 / (1 + math.exp(-beta * difference)), abs=0.012)


def test_beta_for_agreement_solves_the_mean_agreement():
    differences = torch.randn(500, generator=torch.Generator().manual_seed(0)).tolist()
    for target in (0.6, 0.75, 0.9):
        beta = beta_for_agreement(differences, target)
        naive = sum(1 / (1 + math.exp(-beta * abs(d))) for d in differences) / len(differences)
        assert naive == pytest.approx(target, abs=1e-6)
    assert beta_for_agreement(differences, 0.9) > beta_for_agreement(differences, 0.75)


def test_simulated_annotators_judge_on_the_real_page(tiny_generator, tmp_path, cli):
    (tmp_path / "judge.py").write_text(RECORDING_JUDGE)
    server = Server("--policy", str(tiny_generator), "--db", "f.sqlite", "--max-new-tokens", "12", "--ahead", "8",
                    cwd=tmp_path)
    try:
        wrong = cli("feedback", "simulate", "--url", server.base, "--token", "not-the-admin", "--judge", "judge:words",
                    "--labels", "2")
        assert wrong.returncode == 2 and "403" in wrong.stderr and "Traceback" not in wrong.stderr
        out = cli("feedback", "simulate", "--url", server.admin_url, "--judge", "judge:words", "--labels", "14",
                  "--beta", "1e9", "--annotators", "2", "--timeout", "120")
        assert out.returncode == 0, out.stderr
    finally:
        server.stop()
    assert "14 judgements by 2 simulated annotator(s)" in out.stdout

    db = sqlite3.connect(tmp_path / "f.sqlite")
    rows = db.execute("SELECT a.name, j.choice, p.prompt, p.response_a, p.response_b FROM judgements j "
                      "JOIN annotators a ON a.id = j.annotator_id JOIN pairs p ON p.id = j.pair_id ORDER BY j.id").fetchall()
    assert len(rows) == 14 and {name for name, *_ in rows} == {"simulated-1", "simulated-2"}
    seen = [json.loads(line) for line in (tmp_path / "seen.jsonl").read_text().splitlines()]
    # the page was read exactly: what the judge saw is what the store holds, pair by pair
    assert [(s["prompt"], s["a"], s["b"]) for s in seen] == [(p, a, b) for _, _, p, a, b in rows]
    for _, choice, _, a, b in rows:  # beta 1e9: the judge's choice, except on a tie in score (a coin)
        if len(a.split()) != len(b.split()):
            assert choice == ("a" if len(a.split()) > len(b.split()) else "b")


def test_a_dialogue_shown_turn_by_turn_is_read_back_as_stored():
    hh = "\n\nHuman: Hi there, how are you?\n\nAssistant: Fine.\n\nHuman: Tell me a joke\n\nAssistant:"
    assert prompt_from_turns([(t["role"], t["content"]) for t in to_messages(hh)]) == hh
    assert prompt_from_turns([("user", "a plain prompt")]) == "a plain prompt"
