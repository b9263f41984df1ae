"""People judge conversations: pairs of two whole episodes from one opening, kept in the store (an old database
still opens), shown turn by turn, exported in TRL's conversational layout, read back into what a reward model
reads, and a reward model trained on them. Real SQLite, a real server and Chromium, real SmolLM2 (tiny settings)."""

import json
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
import torch

from minirlhf import UserError
from minirlhf.data.dialogue import dialogue_text
from minirlhf.data.layouts import rest_text
from minirlhf.envs.base import EnvConfig
from minirlhf.data.preferences import read_pairs
from minirlhf.feedback.conversations import episodes_of
from minirlhf.feedback.store import JUDGED, Store, export_jsonl

OPENING = [{"role": "user", "content": "Tell me about owls. Answer in one sentence."}]
FOLLOW_UP = "Now answer again, and this time use no commas. Keep to what I asked before."


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def episode(first: str, second: str, opening=OPENING) -> list[dict]:
    return [*opening, assistant(first), user(FOLLOW_UP), assistant(second)]


def prov(seed: int) -> dict:
    return {"model": "smollm2", "role": "sample", "step": None, "temperature": 0.7, "top_p": 0.9, "top_k": 0,
            "max_new_tokens": 4, "seed": seed, "env": "constraints", "turns": 2, "episode_seed": 11}


def judge_all(store: Store, choices: list[str]) -> None:
    """Judge the pairs in the order served, as an annotator on the page would."""
    me = store.annotator(store.set_annotator("alice"))["id"]
    for choice in choices:
        pair = store.next_pair(me)
        assert store.judge(me, pair["id"], choice) == JUDGED


def test_the_store_keeps_both_conversations_and_fills_the_text_columns(tmp_path):
    store = Store(tmp_path / "f.sqlite")
    a, b = episode("Owls hunt at night.", "Owls see well"), episode("They are birds.", "Birds they are")
    pair_id = store.add_episodes(a, b, prov(1), prov(2))
    row = store.conn.execute("SELECT * FROM pairs WHERE id = ?", (pair_id,)).fetchone()
    assert json.loads(row["conversation_a"]) == a and json.loads(row["conversation_b"]) == b
    found = episodes_of(row)
    assert found.opening == OPENING and found.rest_a == a[1:] and found.rest_b == b[1:]
    # what reads text (a reward model, a judge, uncertainty) reads the whole conversation
    assert row["prompt"] == "\n\nHuman: Tell me about owls. Answer in one sentence.\n\nAssistant:"
    assert row["response_a"] == f"Owls hunt at night.\n\nHuman: {FOLLOW_UP}\n\nAssistant: Owls see well"
    assert dialogue_text(row["prompt"], row["response_a"]) == (
        f"\n\nHuman: {OPENING[0]['content']}\n\nAssistant: Owls hunt at night.\n\nHuman: {FOLLOW_UP}"
        "\n\nAssistant: Owls see well")
    single = store.add_pair("plain prompt", "x", "y", prov(3), prov(4))
    assert episodes_of(store.conn.execute("SELECT * FROM pairs WHERE id = ?", (single,)).fetchone()) is None
    with pytest.raises(ValueError, match="share their opening"):
        store.add_episodes(a, episode("x", "y", [user("another request")]), prov(5), prov(6))


OLD_PAIRS = """CREATE TABLE pairs (id INTEGER PRIMARY KEY, prompt TEXT NOT NULL, response_a TEXT NOT NULL,
    response_b TEXT NOT NULL, provenance_a TEXT NOT NULL, provenance_b TEXT NOT NULL, wanted INTEGER NOT NULL DEFAULT 1,
    created TEXT NOT NULL)"""


def test_a_database_from_before_episodes_opens_and_takes_them(tmp_path):
    db = tmp_path / "old.sqlite"
    with sqlite3.connect(db) as old:  # pairs as an older minirlhf made them: no priority, no conversations
        old.execute(OLD_PAIRS)
        old.execute("INSERT INTO pairs (prompt, response_a, response_b, provenance_a, provenance_b, created) "
                    "VALUES ('p', 'x', 'y', '{}', '{}', '2024-01-01')")
    store = Store(db)
    columns = {r["name"] for r in store.conn.execute("PRAGMA table_info(pairs)")}
    assert {"priority", "conversation_a", "conversation_b"} <= columns
    pair_id = store.add_episodes(episode("a1", "a2"), episode("b1", "b2"), prov(1), prov(2))
    judge_all(store, ["a", "b"])  # the old pair first, then the episodes
    assert export_jsonl(db, tmp_path / "out.jsonl") == 2
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["pair_id"] for r in rows] == [1, pair_id]
    # one file, one layout: the old single reply among episodes becomes one assistant message
    assert rows[0]["prompt"] == [user("p")] and rows[0]["chosen"] == [assistant("x")]


def test_export_writes_trl_conversational_layout_and_reads_back(tmp_path):
    store = Store(tmp_path / "f.sqlite")
    store.set_meta("round", 3)
    a, b = episode("Owls hunt at night.", "Owls see well"), episode("They are birds.", "Birds, they are")
    store.add_episodes(a, b, prov(1), prov(2))
    judge_all(store, ["b"])
    out = tmp_path / "prefs.jsonl"
    assert export_jsonl(tmp_path / "f.sqlite", out) == 1
    row = json.loads(out.read_text())
    assert row["prompt"] == OPENING and row["chosen"] == b[1:] and row["rejected"] == a[1:]
    assert row["chosen_provenance"] == prov(2) and row["rejected_provenance"] == prov(1)
    assert row["round"] == 3 and row["annotator"] == "alice"
    (pair,) = read_pairs(out)  # the whole chosen conversation, as a reward model reads it
    assert dialogue_text(pair.prompt, pair.chosen) == (
        f"\n\nHuman: {OPENING[0]['content']}\n\nAssistant: They are birds.\n\nHuman: {FOLLOW_UP}"
        "\n\nAssistant: Birds, they are")
    assert pair.prompt == "\n\nHuman: Tell me about owls. Answer in one sentence.\n\nAssistant:"
    # TRL's layout without an explicit prompt (whole conversations) reads the same
    implicit = tmp_path / "implicit.jsonl"
    implicit.write_text(json.dumps({"chosen": b, "rejected": a}) + "\n")
    assert read_pairs(implicit) == [pair]


def write_episode_pairs(db, n: int) -> None:
    """`n` judged episode pairs over `n` openings, the longer second reply chosen (a taste a reward model learns)."""
    store = Store(db)
    for i in range(n):
        opening = [user(f"Tell me about film {i}.")]
        long, short = episode("good film", "great plot fun story lovely actor scene", opening), \
            episode("bad film", "boring", opening)
        store.add_episodes(long, short, prov(2 * i), prov(2 * i + 1))
    judge_all(store, ["a"] * n)


def test_a_reward_model_trains_on_exported_episode_pairs(tmp_path, cli):
    write_episode_pairs(tmp_path / "f.sqlite", 16)
    out = cli("feedback", "export", "--db", "f.sqlite", "--out", "episodes.jsonl")
    assert out.returncode == 0, out.stderr
    assert isinstance(json.loads((tmp_path / "episodes.jsonl").read_text().splitlines()[0])["chosen"], list)
    out = cli("train-reward-model", "--preferences", "episodes.jsonl", "--out", "rm", "--device", "cpu",
              "--model.max_length=64", "--train.epochs=1", "--train.batch_size=8", "--eval_fraction=0.25")
    assert out.returncode == 0, out.stderr
    results = json.loads((tmp_path / "rm" / "results.json").read_text())
    assert 0 <= results["eval_accuracy"] <= 1 and (tmp_path / "rm" / "model" / "reward_model.json").is_file()


def test_the_page_shows_the_opening_once_and_every_turn_labelled(tmp_path):
    from minirlhf.feedback.app import create_app
    from minirlhf.feedback.pairs import PairPool, Sampling, Source
    from minirlhf.feedback.simulate import _PageReader, prompt_from_turns

    store = Store(tmp_path / "f.sqlite")
    a, b = episode("Owls <b>hunt</b> at night.", "Owls see well"), episode("They are birds.", "")
    store.add_episodes(a, b, prov(1), prov(2))
    client = create_app(store, PairPool(store, Source("x", None, ["hi"]), Sampling()), "http://127.0.0.1:1").test_client()
    client.get(f"/?token={store.set_annotator('alice')}")
    text = client.get("/").data.decode()
    assert text.count(OPENING[0]["content"]) == 1 and text.count('class="turn ') == 1  # the opening, once
    labels = re.findall(r'<span class="who">([^<]+)</span>', text)
    assert labels == ["User"] + ["Assistant, turn 1", "User", "Assistant, turn 2"] * 2
    assert text.count(FOLLOW_UP) == 2 + 2  # each side's turn, and each side as one text
    assert "Owls &lt;b&gt;hunt&lt;/b&gt; at night." in text and "<b>hunt" not in text
    assert "(empty reply)" in text and "Conversation A" in text and "Conversation B" in text
    page = _PageReader()  # what the simulated annotator reads: the opening, each side as the whole rest
    page.feed(text)
    assert prompt_from_turns(page.turns) == OPENING[0]["content"]
    assert page.responses["a"] == store.conn.execute("SELECT response_a FROM pairs").fetchone()[0]


def test_serve_with_an_environment_and_an_lstm_policy_stops_with_one_line(tiny_generator, cli):
    r = cli("feedback", "serve", "--env", "constraints", "--policy", str(tiny_generator), "--port", "0",
            "--db", "f.sqlite", timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "chat model" in r.stderr and "--env constraints" in r.stderr


@pytest.fixture(scope="module")
def smollm2_pool(tmp_path_factory):
    """Two pairs of constraints episodes played by SmolLM2 (2 turns of 4 tokens), by the serve thread itself."""
    from minirlhf.feedback.episode_pairs import EpisodePool, use_episodes
    from minirlhf.feedback.pairs import Sampling, Source

    store = Store(tmp_path_factory.mktemp("smol") / "f.sqlite")
    env = EnvConfig(name="constraints", turns=2)
    source = use_episodes(Source("smollm2", None, []), env, None)
    pool = EpisodePool(store, source, Sampling(max_new_tokens=4, temperature=0.7, top_p=0.9, seed=5), ahead=2,
                       overlap=0.0, env=env)
    pool.start()
    deadline = time.monotonic() + 120
    while store.counts()["pairs"] < 2 and pool.error is None and time.monotonic() < deadline:
        time.sleep(0.1)
    pool.halt.set()
    pool.join(60)
    assert pool.error is None, pool.error
    return store, source


def test_pairs_are_two_episodes_of_one_environment_seed(smollm2_pool):
    store, source = smollm2_pool
    assert source.describe().startswith("two constraints episodes of 2 turns of smollm2 on ")
    rows = store.conn.execute("SELECT * FROM pairs").fetchall()
    assert len(rows) >= 2
    for row in rows:
        found = episodes_of(row)  # same opening (request and first instruction); turns after it
        assert found is not None and len(found.opening) == 1 and found.opening[0]["content"] in row["prompt"]
        assert [m["role"] for m in found.rest_a] == [m["role"] for m in found.rest_b] == \
            ["assistant", "user", "assistant"]
        assert found.rest_a[1] == found.rest_b[1]  # the same follow-up instruction: the same environment seed
        a, b = json.loads(row["provenance_a"]), json.loads(row["provenance_b"])
        assert a["episode_seed"] == b["episode_seed"] and a["seed"] != b["seed"]
        assert {k: a[k] for k in ("env", "turns", "max_new_tokens", "temperature", "top_p", "model")} == \
            {"env": "constraints", "turns": 2, "max_new_tokens": 4, "temperature": 0.7, "top_p": 0.9, "model": "smollm2"}
        assert len(a["env_rewards"]) == 2 and all(0 <= r <= 1 for r in a["env_rewards"])


# --- in a real browser ---

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def test_a_person_judges_two_conversations_in_chromium(tiny_generator, tmp_path):
    from test_feedback_browser import _need_browser

    sync_playwright = _need_browser()
    db = tmp_path / "f.sqlite"
    store = Store(db)
    first = store.add_episodes(episode("Owls hunt at night.", "Owls see well"), episode("They are birds.", "Birds"),
                               {"role": "sample"}, {"role": "sample"})  # no model: not sampled for another policy
    token = store.set_annotator("browser")
    proc = subprocess.Popen([sys.executable, "-u", "-m", "minirlhf", "feedback", "serve", "--port", "0", "--db", str(db),
                             "--policy", str(tiny_generator), "--max-new-tokens", "6"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    try:
        base, deadline = None, time.monotonic() + 30
        while base is None and proc.poll() is None and time.monotonic() < deadline:
            base = next((m.group(1) for line in list(lines) if (m := re.search(r"serving on (http://\S+)", line))), None)
            time.sleep(0.05)
        assert base is not None, "".join(lines)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(f"{base}/?token={token}")
            page.wait_for_selector('input[name="pair_id"]', state="attached")
            assert int(page.locator('input[name="pair_id"]').get_attribute("value")) == first
            assert page.locator(".prompt .turn .who").all_inner_texts() == ["User"]
            for side in "ab":
                assert page.locator(f"#response-{side} .step .who").all_inner_texts() == \
                    ["Assistant, turn 1", "User", "Assistant, turn 2"]
            assert page.locator("#response-b .step .said").all_inner_texts()[2] == "Birds"
            a, b = (page.locator(f"#response-{s}").bounding_box() for s in "ab")
            assert abs(a["y"] - b["y"]) < 1 and b["x"] > a["x"] + a["width"] - 1  # side by side
            with page.expect_navigation():
                page.keyboard.press("b")
            browser.close()
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0, "".join(lines)
    rows = sqlite3.connect(db).execute("SELECT pair_id, choice FROM judgements").fetchall()
    assert rows == [(first, "b")]


def test_serve_with_an_environment_serves_pairs_of_episodes_over_http(tmp_path):
    from test_feedback import Server, field, request, sign_in

    server = Server("--env", "constraints", "--env-turns", "2", "--max-new-tokens", "4", "--ahead", "2", "--db",
                    "f.sqlite", cwd=tmp_path)
    try:
        server.wait_for("model ready", timeout=120)
        admin, page = sign_in(server.admin_url)
        deadline = time.monotonic() + 120
        while field(page, "pair_id") is None:  # the page waits for the first pair
            assert time.monotonic() < deadline, page
            time.sleep(0.2)
            _, page = request(f"{server.base}/", via=admin)
    finally:
        out = server.stop()
    assert "two constraints episodes of 2 turns of smollm2" in out and "4 new tokens at most a turn" in out
    labels = re.findall(r'<span class="who">([^<]+)</span>', page)
    assert labels == ["User"] + ["Assistant, turn 1", "User", "Assistant, turn 2"] * 2
    made_for = Store(tmp_path / "f.sqlite").meta("made_for")[0]
    assert "played as constraints episodes of 2 turns" in made_for["prompts"]


# --- `minirlhf loop --env`: the pieces (a whole round takes minutes on a CPU; see the lead's report) ---

def test_the_loops_policy_stage_plays_the_same_environment_scored_by_the_rounds_reward_model(tmp_path):
    from minirlhf.config import load_config
    from minirlhf.data.prompts import read_prompts
    from minirlhf.envs.requests import REQUESTS, split
    from minirlhf.feedback.loop import LoopConfig, Round
    from minirlhf.feedback.loop_stages import rl_stage

    cfg = load_config(LoopConfig, overrides=["--policy=smollm2", "--env.name=constraints", "--env.turns=2",
                                             "--method=grpo", "--annotator=simulate:judge:longer"])
    r = Round(tmp_path / "round-1", 1, "smollm2", "")
    r.folder.mkdir()
    _, stage = rl_stage(cfg, r)
    assert stage.env.name == "minirlhf.feedback.loop_episodes:JudgedConstraints" and stage.env.turns == 2
    assert stage.env.judge == str(r.reward_model) and (stage.env.reward, stage.env.turn_credit) == ("last", "episode")
    assert (read_prompts(stage.prompts.file), read_prompts(stage.prompts.eval_file)) == split(REQUESTS)
    cfg.env.name = "judge"
    _, stage = rl_stage(cfg, r)
    assert stage.env.name == "judge" and stage.env.judge == str(r.reward_model) and stage.prompts == cfg.prompts


def test_judged_constraints_keeps_the_user_and_takes_the_judges_score():
    from minirlhf.envs.base import EnvConfig, make_env

    seen = []

    def judge(prompts, replies):
        seen.append((prompts[0], replies[0]))
        return torch.tensor([len(replies[0]) / 10])

    env = make_env(EnvConfig(name="minirlhf.feedback.loop_episodes:JudgedConstraints", turns=2), [], 0, judge=judge)
    opening = env.reset(7)
    message, reward, done, info = env.step([*opening, assistant("Owls.")])
    assert reward == pytest.approx(0.5) and not done and message.startswith("Now answer again")
    assert seen == [(f"\n\nHuman: {opening[0]['content']}\n\nAssistant:", "Owls.")]
    assert "kept" in info and "satisfied" in info  # the instructions' checks stay in the log


def test_a_loop_on_episodes_stops_on_what_it_cannot_do(tiny_generator, cli):
    from minirlhf.feedback.loop import LoopConfig, check

    with pytest.raises(UserError, match="dpo"):
        check(LoopConfig(policy="smollm2", method="dpo", env=EnvConfig(name="constraints")))
    with pytest.raises(UserError, match="constraints or judge"):
        check(LoopConfig(policy="smollm2", env=EnvConfig(name="my_env:Echo")))
    r = cli("loop", "--policy", str(tiny_generator), "--env", "constraints", "--annotator", "simulate:judge:longer",
            "--out", "loop", timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "chat model" in r.stderr, r.stderr


def test_held_out_episodes_are_scored_whole_by_the_judge():
    from minirlhf.feedback.loop_episodes import evaluate
    from minirlhf.models.load import load_policy

    seen = []

    def judge(prompts, responses):
        seen.extend(dialogue_text(p, r) for p, r in zip(prompts, responses))
        return torch.tensor([float(len(r)) for r in responses])

    smol = load_policy("smollm2", "cpu", value_head=False)
    out = evaluate(smol, smol, EnvConfig(name="constraints", turns=2), ["Tell me about owls."], judge, n=2, batch=2,
                   response_len=3)
    assert out["reward_policy"] == out["reward_reference"] and out["win_rate"] == 0.5  # the same episodes
    assert abs(out["kl"]) < 1e-3
    assert len(seen) == 4 and all(t.startswith("\n\nHuman: Tell me about owls.") and t.count("\n\nAssistant:") == 2
                                  for t in seen)


@pytest.mark.slow
def test_a_loop_round_on_constraints_episodes(tmp_path, cli):
    """One whole round (about a minute on two CPU cores): episode pairs judged whole on the page by the simulated
    annotator, a reward model on the conversations, then GRPO on constraints episodes scored by that reward model."""
    from minirlhf.rl.grpo import GRPOConfig
    from minirlhf.config import load_saved

    (tmp_path / "judge.py").write_text("def longer(prompts, responses):\n    return [len(r) for r in responses]\n")
    out = cli("loop", "--policy", "smollm2", "--env", "constraints", "--env.turns=2", "--rounds", "1", "--labels", "4",
              "--annotator", "simulate:judge:longer", "--beta", "1e9", "--method", "grpo", "--steps", "1",
              "--response_len", "4", "--ahead", "4", "--heldout_fraction", "0.5", "--out", "loop", "--device", "cpu",
              "--reward_model.max_length=64", "--reward_model_train.epochs=1", "--reward_model_train.batch_size=4",
              "--prompts.max_eval=1", "--eval_batch_size=2", "--policy_options.freeze_layers=29",
              "--policy_args=[--batch_size=2, --group_size=2, --minibatch_size=2, --prompts.max_eval=1]")
    assert out.returncode == 0, out.stderr[-3000:]
    round_1 = tmp_path / "loop" / "round-1"
    labels = [json.loads(line) for line in (round_1 / "labels.jsonl").read_text().splitlines()]
    assert len(labels) == 4 and all(isinstance(r["prompt"], list) and len(r["chosen"]) == 3 for r in labels)
    assert all(len(rest_text(r["chosen"])) >= len(rest_text(r["rejected"])) for r in labels)  # judged whole
    grpo = load_saved(GRPOConfig, round_1 / "policy" / "config.yaml")
    assert grpo.env.name == "minirlhf.feedback.loop_episodes:JudgedConstraints"
    assert grpo.env.judge == str(round_1.relative_to(tmp_path) / "reward_model") and grpo.env.turns == 2
    rows = [json.loads(line) for line in (round_1 / "policy" / "metrics.jsonl").read_text().splitlines()]
    assert "reward/all_turns" in rows[0]  # the instructions' checks still logged beside the reward model's score
    assert "constraints episodes of 2 turns" in (tmp_path / "loop" / "report.md").read_text()
