"""`minirlhf loop`: two rounds on tiny settings, each round's pairs served on a real page and judged by the
simulated annotator over HTTP, a reward model warm-started from the last round's, the policy trained on from where
it was against the fixed reference; killed with SIGKILL in round 2 and resumed; and online DPO."""

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time

from minirlhf.stages.dpo import DPOConfig
from minirlhf.rl.ppo import PPOConfig
from minirlhf.stages.reward_model import RewardModelConfig
from minirlhf.checkpoint import load_json
from minirlhf.config import load_saved

LABELS = 10


def loop_args(policy, judge, out, *extra):
    return ["loop", "--policy", str(policy), "--rounds", "2", "--labels", str(LABELS), "--annotator",
            f"simulate:{judge}", "--beta", "3", "--steps", "2", "--response_len", "10", "--out", out,
            "--device", "cpu", "--reward_model.max_length=32", "--reward_model_train.epochs=1",
            "--reward_model_train.batch_size=4", "--data.max_train=400", "--data.max_eval=100", "--prompts.max_eval=8",
            "--eval_batch_size=8", *extra]


def ab_labels(db) -> int:
    return sqlite3.connect(db).execute("SELECT COUNT(*) FROM judgements WHERE choice IN ('a', 'b')").fetchone()[0]


def test_two_rounds_killed_in_the_second_then_resumed(tiny_generator, tiny_classifier, tmp_path, cli):
    args = loop_args(tiny_generator, tiny_classifier, "loop", "--select", "uncertain", "--ahead", "12", "--ensemble", "2",
                     "--policy_args=[--batch_size=8, --minibatch_size=4, --ppo_epochs=1, --reward.ensemble=uwo]")
    proc = subprocess.Popen([sys.executable, "-u", "-m", "minirlhf", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    deadline = time.monotonic() + 300
    while not any("round 2 of 2" in line for line in lines):
        assert proc.poll() is None, "the loop ended before printing 'round 2 of 2':\n" + "".join(lines)
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("waited 300 s for the loop to print 'round 2 of 2':\n" + "".join(lines))
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    run = tmp_path / "loop"
    before = load_json(run / "checkpoint" / "state.json")
    assert before["step"] == 1 and [r["round"] for r in before["rows"]] == [1]

    out = cli("loop", "--resume", "loop")
    assert out.returncode == 0, out.stderr
    assert "loop: resuming after step 1" in out.stdout
    results = load_json(run / "results.json")
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert results["rounds"][0] == before["rows"][0]  # round 1 as it was before the crash
    assert [r["labels"] for r in results["rounds"]] == [LABELS, 2 * LABELS]
    assert ab_labels(run / "round-2" / "feedback.sqlite") == LABELS  # exactly N, though the crash cut the round
    row = results["rounds"][1]
    assert 0 <= row["rm/accuracy"] <= 1 and row["rm/heldout_pairs"] >= 2 and row["kl"] > -1
    assert 0 <= row["annotator/agreement"] <= 1 and "gold/reward" in row
    report = (run / "report.md").read_text()
    assert report.count("\n| 1 |") == 1 and report.count("\n| 2 |") == 1
    # round 2 started where round 1 ended; its reward model from round 1's; the reference stays the first policy
    rm = load_saved(RewardModelConfig, run / "round-2" / "reward_model" / "config.yaml")
    assert rm.model.init == str(run.relative_to(tmp_path) / "round-1" / "reward_model") and rm.ensemble == 2
    ppo = load_saved(PPOConfig, run / "round-2" / "policy" / "config.yaml")
    assert ppo.policy == str(run.relative_to(tmp_path) / "round-1" / "policy") and ppo.ref_policy == str(tiny_generator)
    assert ppo.reward.reward_model == rm.out and ppo.reward.ensemble == "uwo"
    steps = (run / "round-2" / "policy" / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line)["reward/ensemble_std"] >= 0 for line in steps if "reward/mean" in line)
    priorities = sqlite3.connect(run / "round-2" / "feedback.sqlite").execute("SELECT priority FROM pairs").fetchall()
    assert any(p != 0 for p, in priorities)  # round 2 chose by the round-1 reward model's uncertainty
    # the loop's run is a policy: its last round's
    gen = cli("generate", "loop", "--prompt", "I love", "--max-new-tokens", "5", "--device", "cpu")
    assert gen.returncode == 0 and gen.stdout.strip(), gen.stderr


def test_online_dpo_rounds(tiny_generator, tiny_classifier, tmp_path, cli):
    out = cli(*loop_args(tiny_generator, tiny_classifier, "loop", "--method", "dpo",
                         "--policy_args=[--train.batch_size=4, --eval_every=0, --samples=0]"))
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in (tmp_path / "loop" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows if "round" in r] == [1, 2]
    dpo = load_saved(DPOConfig, tmp_path / "loop" / "round-2" / "policy" / "config.yaml")
    assert dpo.preferences.endswith("round-2/labels.jsonl") and dpo.ref_policy == str(tiny_generator)
    assert (tmp_path / "loop" / "reward.png").is_file() and (tmp_path / "loop" / "kl.png").is_file()


def test_people_on_the_page_then_the_round_goes_on(tiny_generator, tiny_classifier, tmp_path, cli):
    """`--annotator web`: the round prints the admin link and waits; another process (here the simulated
    annotator, as a person's browser would) judges there; then the round trains on those labels."""
    args = loop_args(tiny_generator, tiny_classifier, "loop", "--rounds", "1", "--wait_s", "120",
                     "--policy_args=[--batch_size=8, --minibatch_size=4, --ppo_epochs=1]")
    args[args.index("--annotator") + 1] = "web"
    proc = subprocess.Popen([sys.executable, "-u", "-m", "minirlhf", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    deadline, link = time.monotonic() + 120, None
    while link is None:
        assert proc.poll() is None, "the loop ended before printing its admin link:\n" + "".join(lines)
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("waited 120 s for the loop to print its admin link:\n" + "".join(lines))
        link = next((w for line in list(lines) for w in line.split() if "/admin?token=" in w), None)
        time.sleep(0.05)
    try:
        out = cli("feedback", "simulate", "--url", link, "--judge", str(tiny_classifier), "--labels", str(LABELS),
                  "--timeout", "120")
        assert out.returncode == 0, out.stderr
        assert proc.wait(240) == 0, "".join(lines)
    finally:
        proc.kill()
    results = load_json(tmp_path / "loop" / "results.json")
    assert results["rounds"][0]["labels"] == LABELS and "gold/reward" not in results["rounds"][0]
    assert "rm/reward" in results["rounds"][0]  # no gold judge: the round's own reward model scores


def test_a_bad_setting_for_the_policy_stage_stops_the_loop_before_any_label(tiny_generator, cli):
    proc = cli("loop", "--policy", str(tiny_generator), "--annotator", "simulate:x:y", "--method", "dr-grpo",
               "--policy_args=[--group_size=1]")
    assert proc.returncode == 2 and "--policy_args: group_size must be >= 2" in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1
