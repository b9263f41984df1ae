"""Dr. GRPO, the algorithm added as one file (rl/dr_grpo.py) plus its registry entry: its advantage and its
loss normalisation against naive loops, two steps through the shared loop and the CLI, and a learning test."""

import json
import math

import pytest
import torch

from minirlhf.rl import registry
from minirlhf.rl.dr_grpo import DR_GRPO, DrGRPOConfig, advantages, constant_normaliser, group_center
from minirlhf.stages.rl import train
from minirlhf.rl.core import KLTerms, policy_loss
from minirlhf.config import load_config


def test_group_center_matches_naive_loop():
    torch.manual_seed(0)
    scores = torch.randn(12)
    out = group_center(scores, 4)
    for i in range(12):
        group = scores[4 * (i // 4): 4 * (i // 4) + 4].tolist()
        assert out[i].item() == pytest.approx(scores[i].item() - sum(group) / 4, abs=1e-6)


def test_advantages_are_not_divided_by_the_group_std():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]], dtype=torch.float32)
    rollout = type("R", (), {"response_mask": mask, "turn_ids": None})()
    scores = torch.tensor([1.0, 3.0, 10.0, 30.0])  # groups of 2 with stds 1.41 and 14.1
    kl = KLTerms(torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(4))
    batch = advantages(DrGRPOConfig(group_size=2), rollout, scores, kl, 0.0)
    naive = [[-1.0] * 2 + [0], [1.0, 0, 0], [-10.0] * 3, [10.0] * 2 + [0]]
    assert batch.advantages.tolist() == naive


def test_the_loss_is_a_token_sum_over_responses_times_response_len():
    torch.manual_seed(0)
    B, T, L = 3, 4, 6  # minibatch rows, the longest response here, response_len
    logp, old, adv = torch.randn(B, T) * 0.2, torch.randn(B, T) * 0.2, torch.randn(B, T)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.float32)
    cfg = DrGRPOConfig(response_len=L)
    loss, _ = policy_loss(logp, old, adv, mask, 0.2, constant_normaliser(mask, cfg))
    total = 0.0
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                r = math.exp(logp[b, t].item() - old[b, t].item())
                a = adv[b, t].item()
                total += -min(r * a, min(max(r, 0.8), 1.2) * a)
    assert loss.item() == pytest.approx(total / (B * L), rel=1e-5)  # not / 7 real tokens, not per response


def test_it_is_registered_and_a_command():
    assert registry.get("dr_grpo") is DR_GRPO and DR_GRPO.grouped and not DR_GRPO.critic


def test_two_steps_change_the_policy_with_finite_losses(tiny_generator, tiny_classifier, tmp_path):
    from minirlhf.models.lstm import load_generator

    cfg = load_config(DrGRPOConfig, overrides=[
        f"--policy={tiny_generator}", f"--reward.classifier={tiny_classifier}", f"--out={tmp_path / 'run'}",
        "--device=cpu", "--data.max_train=400", "--data.max_eval=100", "--prompts.max_eval=16", "--steps=2",
        "--batch_size=8", "--minibatch_size=4", "--group_size=4"])
    run = train(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["policy/loss"]) and math.isfinite(r["policy/kl_loss"]) for r in rows)
    before, _ = load_generator(tiny_generator)
    after, _ = load_generator(run / "checkpoint" / "policy")
    assert not torch.equal(before.lstm.weight_hh_l0, after.lstm.weight_hh_l0)
    assert json.loads((run / "run.json").read_text())["algorithm"] == "dr_grpo"


def test_the_command_runs(cli, tiny_generator, tiny_classifier):
    proc = cli("dr-grpo", "--policy", str(tiny_generator), "--reward", str(tiny_classifier), "--steps=1",
               "--batch_size=8", "--minibatch_size=8", "--prompts.max_eval=8", "--data.max_train=400",
               "--data.max_eval=100", "--device=cpu", "--out", "run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "held-out reward" in proc.stdout


@pytest.mark.slow
def test_dr_grpo_raises_the_reward_of_the_lstm(tiny_generator, learned_classifier, tmp_path):
    """Learning test: the group-mean baseline with token sums over a constant raises the reward."""
    cfg = load_config(DrGRPOConfig, overrides=[
        f"--policy={tiny_generator}", f"--reward.classifier={learned_classifier}", f"--out={tmp_path / 'run'}",
        "--device=cpu", "--data.max_train=400", "--data.max_eval=100", "--steps=25", "--batch_size=32",
        "--train.lr=1e-3", "--ppo_epochs=4", "--minibatch_size=16", "--prompts.max_eval=64"])
    rows = [json.loads(line) for line in (train(cfg) / "metrics.jsonl").read_text().splitlines()]
    first = sum(r["reward/mean"] for r in rows[:5]) / 5
    last = sum(r["reward/mean"] for r in rows[-5:]) / 5
    assert last > first + 0.3, (first, last)
