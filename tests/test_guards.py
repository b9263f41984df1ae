"""The health checks of an RL run (rl/guards.py): each provoked by crafted metrics, then two real runs on
the LSTM whose responses are cut at one token and whose reward is the same for every response."""

import json

import pytest

from conftest import run_cli
from minirlhf import UserError
from minirlhf.rl.guards import Guards

HEALTHY = {"reward/mean": 0.0, "objective/kl": 0.5, "response/length": 10.0, "response/ended": 0.6,
           "response/distinct_2": 0.8, "response/ref_ppl": 30.0, "reward/flat_groups": 0.1}


def _fired(rows: list[dict], **kw) -> list[str]:
    g = Guards(**({"kl_target": 6.0, "group_size": 4} | kw))
    for step, row in enumerate(rows, 1):
        g.check(step, HEALTHY | row)
    return [f["guard"] for f in g.fired]


def test_a_healthy_run_fires_nothing():
    assert _fired([{"reward/mean": 0.1 * s, "objective/kl": 0.5 + 0.01 * s} for s in range(30)]) == []


@pytest.mark.parametrize("guard, rows", [
    ("truncation", [{"response/ended": 0.05}]),
    ("flat_groups", [{"reward/flat_groups": 0.75}]),
    ("kl", [{"objective/kl": 19.0}]),  # over 3 x kl_target
    ("kl", [{"objective/kl": 3.0 + 0.5 * s} for s in range(10)]),  # 3.0 -> 7.5 nats, past kl_target 6, rising
    ("length_drift", [{"response/length": 10.0}] * 3 + [{"response/length": 25.0}] * 3),
    ("length_drift", [{"response/length": 10.0}] * 3 + [{"response/length": 4.0}] * 3),
    ("diversity_collapse", [{"response/distinct_2": 0.8}] * 3 + [{"response/distinct_2": 0.3}] * 3),
    ("reward_hacking", [{"reward/mean": 0.0, "response/ref_ppl": 30.0}] * 3 +
     [{"reward/mean": 1.0, "response/ref_ppl": 70.0}] * 3),
    ("over_optimisation", [{"reward/reward_model": 0.0, "reward/ensemble_std": 0.2}] * 3 +
     [{"reward/reward_model": 0.8, "reward/ensemble_std": 0.35}] * 3),
])
def test_each_guard_fires_once_on_its_condition(guard, rows):
    assert _fired(rows + rows[-1:] * 3) == [guard]  # once, though the condition holds on later steps too


def test_near_misses_fire_nothing():
    assert _fired([{"reward/flat_groups": 0.75}], group_size=1) == []  # no groups: no group baseline to flatten
    assert _fired([{"objective/kl": 0.1 + 0.6 * s} for s in range(10)]) == []  # rising from 0 to kl_target: a start
    assert _fired([{"reward/mean": 1.0 - s, "response/ref_ppl": 30.0 + 20 * s} for s in range(6)]) == []  # reward fell
    assert _fired([{"response/length": 10.0}] * 3 + [{"response/length": 19.0}] * 3) == []
    start = [{"reward/reward_model": 0.0, "reward/ensemble_std": 0.2}] * 3
    assert _fired(start + [{"reward/reward_model": -0.5, "reward/ensemble_std": 0.5}] * 3) == []  # the score fell
    assert _fired(start + [{"reward/reward_model": 0.8, "reward/ensemble_std": 0.28}] * 3) == []  # 1.4x: not yet
    assert _fired([{"reward/reward_model": 0.1 * s} for s in range(8)]) == []  # one reward model: nothing to read


def test_strict_stops_and_state_survives_a_resume():
    g = Guards(mode="strict", kl_target=6.0)
    with pytest.raises(UserError, match=r"health check 'kl' at step 1: .* \(--guards strict stopped the run"):
        g.check(1, HEALTHY | {"objective/kl": 30.0})
    resumed = Guards(kl_target=6.0)
    resumed.load(json.loads(json.dumps(g.state())))
    resumed.check(2, HEALTHY | {"objective/kl": 30.0})
    assert [f["step"] for f in resumed.fired] == [1]  # already reported: not again after the resume


def test_runs_that_cannot_learn_say_so_and_strict_stops_them(tiny_generator, tmp_path):
    (tmp_path / "same.py").write_text("def reward(prompts, responses):\n    return [1.0] * len(responses)\n")
    args = ["grpo", "--policy", str(tiny_generator), "--reward.classifier_weight=0", "--reward.function=same:reward", "--response_len=1", "--steps=2", "--batch_size=8", "--group_size=4",
            "--minibatch_size=8", "--device=cpu", "--data.max_train=200", "--data.max_eval=50", "--prompts.max_eval=8"]
    warned = run_cli(*args, "--out", str(tmp_path / "warn"), cwd=tmp_path)
    assert warned.returncode == 0, warned.stderr[-2000:]
    lines = [line for line in warned.stdout.splitlines() if line.startswith("health check")]
    assert [line.split("'")[1] for line in lines] == ["truncation", "flat_groups"], warned.stdout  # once each
    assert "--response_len" in lines[0] and "--group_size" in lines[1]
    health = json.loads((tmp_path / "warn" / "results.json").read_text())["health"]
    assert [(h["step"], h["guard"]) for h in health] == [(1, "truncation"), (1, "flat_groups")]
    assert "## Health" in (tmp_path / "warn" / "report.md").read_text()
    card = (tmp_path / "warn" / "checkpoint" / "policy" / "README.md").read_text()  # the runner's model card
    assert "```bash\nminirlhf grpo --policy" in card and "| win_rate | 0.5 |" in card
    stopped = run_cli(*args, "--guards=strict", "--out", str(tmp_path / "strict"), cwd=tmp_path)
    assert stopped.returncode == 2 and "Traceback" not in stopped.stderr, stopped.stderr[-2000:]
    assert stopped.stderr.strip().splitlines()[-1].startswith("minirlhf: error: health check 'truncation' at step 1")
