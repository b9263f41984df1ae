"""Active pair choice: the store serves the highest-priority fresh pair first; a pair's priority is how unsure the
reward model (or an ensemble) is, checked against the models' own scores; `serve --select uncertain` stores it. A NaN
priority (a diverged reward model) is the lowest, and no failure of the generator thread ends serve in a traceback."""

import math
import sqlite3
import time
from pathlib import Path

import pytest
import torch

from conftest import run_cli, train_tiny_reward_model
from minirlhf import ModelError
from minirlhf.data.dialogue import dialogue_text
from minirlhf.feedback.pairs import PairPool, Sampling, Source, uncertainty
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


def test_a_nan_or_infinite_priority_is_stored_as_the_lowest_and_served_last(tmp_path):
    store = Store(tmp_path / "f.sqlite")
    me = store.annotator(store.set_annotator("ann"))["id"]
    ids = {name: store.add_pair("p", f"a-{name}", f"b-{name}", {}, {}, 1, value)
           for name, value in (("nan", math.nan), ("low", -3.0), ("inf", math.inf), ("high", 0.4), ("-inf", -math.inf))}
    stored = dict(store.conn.execute("SELECT id, priority FROM pairs").fetchall())
    assert [stored[ids[n]] for n in ("nan", "low", "inf", "high", "-inf")] == [-math.inf, -3.0, -math.inf, 0.4, -math.inf]
    store.set_priorities({ids["high"]: math.nan, ids["low"]: 0.1})  # re-ranked by a reward model that diverged since
    served = []
    while (pair := store.next_pair(me)) is not None:
        served.append(pair["id"])
        store.judge(me, pair["id"], "a")
    assert served == [ids["low"], ids["nan"], ids["inf"], ids["high"], ids["-inf"]]  # the non-finite last, oldest first


def test_a_diverged_reward_model_does_not_stop_the_pair_generator(tiny_generator, tiny_reward_model, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setattr(RewardModel, "score", lambda self, texts, batch_size=32: torch.full((len(texts),), math.nan))
    store = Store(tmp_path / "f.sqlite")
    pool = PairPool(store, Source(str(tiny_generator), None, ["the film", "a day"]), Sampling(max_new_tokens=8),
                    ahead=6, overlap=0.0, select="uncertain", reward_models=[str(tiny_reward_model)])
    pool.start()
    deadline = time.monotonic() + 120
    while store.counts()["pairs"] < 6 and pool.error is None and time.monotonic() < deadline:
        time.sleep(0.1)
    pool.halt.set()
    pool.join(60)
    assert pool.error is None and pool.state == "running" and not pool.is_alive()
    priorities = [r[0] for r in store.conn.execute("SELECT priority FROM pairs")]
    assert len(priorities) >= 6 and set(priorities) == {-math.inf}


def _serve_args(tiny_generator, db: Path) -> list[str]:
    return ["feedback", "serve", "--policy", str(tiny_generator), "--db", str(db), "--port", "0"]


@pytest.mark.parametrize("error,code,says", [
    (sqlite3.OperationalError("database or disk is full"), 1, "OperationalError: database or disk is full"),
    (RuntimeError("CUDA error: an illegal memory access"), 1, "RuntimeError: CUDA error"),
    (ModelError("the two responses were identical 50 times; sample more freely"), 2, "identical 50 times"),
])
def test_a_failing_generator_stops_serve_with_one_line(error, code, says, tiny_generator, tmp_path, monkeypatch,
                                                       capsys):
    """The command, in this process, with the generator thread failing as it can: no traceback, one line, exit 1 for
    the machine's failures and 2 for the user's."""
    from minirlhf.cli import main

    def fail(self):
        raise error

    monkeypatch.setattr(PairPool, "_load", fail)
    threads = torch.get_num_threads()  # serve leaves a core to the web server; give it back to the tests after
    try:
        got = main(_serve_args(tiny_generator, tmp_path / "f.sqlite"))
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err.strip()
    assert got == code and err.count("\n") == 0 and "Traceback" not in err and says in err, err
