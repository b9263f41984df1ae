"""Active pair choice: the store serves the highest-priority fresh pair first; a pair's priority is how unsure the
reward model (or an ensemble) is, checked against the models' own scores; `serve --select uncertain` stores it."""

import sqlite3

import pytest
import torch

from conftest import run_cli, train_tiny_reward_model
from minirlhf.data.dialogue import dialogue_text
from minirlhf.feedback.pairs import uncertainty
from minirlhf.feedback.store import Store
from minirlhf.models.reward_model import RewardModel
from test_feedback import Server


def test_the_highest_priority_fresh_pair_is_served_first(tmp_path):
    store = Store(tmp_path / "f.sqlite")
    me = store.annotator(store.set_annotator("ann"))["id"]
    ids = {priority: store.add_pair("p", f"a{priority}", f"b{priority}", {}, {}, 1, priority)
           for priority in (0.1, 0.4, 0.0, 0.2)}
    store.judge(me, store.next_pair(me)["id"], "b")  # the 0.4 pair
    assert [r["id"] for r in store.unjudged()] == sorted([ids[0.1], ids[0.0], ids[0.2]])
    store.set_priorities({ids[0.0]: 0.9})  # re-ranked, as by a reward model retrained since
    served = []
    while (pair := store.next_pair(me)) is not None:
        served.append(pair["id"])
        store.judge(me, pair["id"], "a")
    assert served == [ids[0.0], ids[0.2], ids[0.1]] and store.unjudged() == []


def test_an_old_database_gains_the_priority_column(tmp_path):
    db = sqlite3.connect(tmp_path / "old.sqlite")
    db.execute("CREATE TABLE pairs (id INTEGER PRIMARY KEY, prompt TEXT NOT NULL, response_a TEXT NOT NULL, "
               "response_b TEXT NOT NULL, provenance_a TEXT NOT NULL, provenance_b TEXT NOT NULL, "
               "wanted INTEGER NOT NULL DEFAULT 1, created TEXT NOT NULL)")
    db.execute("INSERT INTO pairs VALUES (1, 'p', 'a', 'b', '{}', '{}', 1, 'then')")
    db.commit()
    store = Store(tmp_path / "old.sqlite")
    me = store.annotator(store.set_annotator("ann"))["id"]
    assert store.next_pair(me)["priority"] == 0 and store.add_pair("q", "x", "y", {}, {}, 1, 0.3) == 2


def test_uncertainty_against_the_reward_models_scores(tiny_reward_model, tmp_path):
    rm = RewardModel.from_run(tiny_reward_model)
    contrary = RewardModel.from_run(train_tiny_reward_model(tmp_path, longer_wins=False))
    prompts = ["Tell me about film 1", "Tell me about film 2", "Tell me about film 3"]
    a, b = ["great plot and a fun story with love", "bad", "good film"], ["awful", "boring scene and plot", "fun film"]

    def p_a(model, i):  # naive: one pair at a time
        return torch.sigmoid(model.score([dialogue_text(prompts[i], a[i])])[0]
                             - model.score([dialogue_text(prompts[i], b[i])])[0]).item()

    one = uncertainty([rm], prompts, a, b)
    assert one == pytest.approx([0.5 - abs(p_a(rm, i) - 0.5) for i in range(3)], abs=1e-5)
    both = uncertainty([rm, contrary], prompts, a, b)
    assert both == pytest.approx([torch.tensor([p_a(rm, i), p_a(contrary, i)]).std().item() for i in range(3)],
                                 abs=1e-5)
    assert max(both) > 0.1  # the two models disagree


def test_serve_uncertain_gives_each_pair_its_uncertainty(tiny_generator, tiny_reward_model, tmp_path):
    out = run_cli("feedback", "serve", "--policy", str(tiny_generator), "--select", "uncertain", cwd=tmp_path)
    assert out.returncode == 2 and "--reward-model" in out.stderr and "Traceback" not in out.stderr
    server = Server("--policy", str(tiny_generator), "--db", "f.sqlite", "--max-new-tokens", "12", "--ahead", "8",
                    "--select", "uncertain", "--reward-model", str(tiny_reward_model), cwd=tmp_path)
    try:
        server.wait_for("pairs: [1-9]")
    finally:
        server.stop()
    rows = sqlite3.connect(tmp_path / "f.sqlite").execute(
        "SELECT prompt, response_a, response_b, priority FROM pairs").fetchall()
    assert rows
    rm = RewardModel.from_run(tiny_reward_model)
    expected = uncertainty([rm], [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
    assert [r[3] for r in rows] == pytest.approx(expected, abs=1e-5) and len({round(r[3], 6) for r in rows}) > 1
