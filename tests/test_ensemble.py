"""Reward-model ensembles (Coste et al., ICLR 2024): the combinations against their formulas, an ensemble run's
members (shared frozen layers, their own heads and bootstrap draws), reloading, and the ensemble reward in RL with
its disagreement logged."""

import json

import pytest
import torch

from conftest import write_length_pairs
from minirlhf import ConfigError
from minirlhf.stages.reward_model import RewardModelConfig, train
from minirlhf.config import load_config
from minirlhf.data.dialogue import dialogue_text
from minirlhf.models.reward_model import RewardModel, combine
from minirlhf.models.trunk import find_trunk


def test_combinations_match_their_formulas():
    scores = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, 0.5], [2.0, 1.0, 0.5]])  # (K=3, N=3)
    for n in range(3):
        col = scores[:, n].tolist()
        mean = sum(col) / 3
        var = sum((x - mean) ** 2 for x in col) / 3  # population variance, as eq. 4
        assert combine(scores, "mean")[n].item() == pytest.approx(mean)
        assert combine(scores, "wco")[n].item() == pytest.approx(min(col))
        assert combine(scores, "uwo", 0.5)[n].item() == pytest.approx(mean - 0.5 * var)
    assert torch.equal(combine(scores, "single"), scores[0])  # the first member; the rest only watched
    assert torch.equal(combine(scores[:1], "wco"), scores[0])  # one model: itself, whatever the mode


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ensemble")
    pairs = write_length_pairs(folder / "pairs.jsonl", 40)
    cfg = load_config(RewardModelConfig, overrides=[
        f"--preferences={pairs}", "--model.max_length=32", "--train.epochs=1", "--train.batch_size=8",
        "--ensemble=3", "--train.log_every=1", f"--out={folder / 'run'}", "--device=cpu"])
    return train(cfg), pairs


def test_an_ensemble_trains_members_that_share_their_frozen_layers_and_differ_above(ensemble_run):
    run, pairs = ensemble_run
    results = json.loads((run / "results.json").read_text())
    assert results["members"] == 3 and len(results["eval_member_accuracy"]) == 3
    meta = json.loads((run / "model" / "reward_model.json").read_text())
    assert meta["members"] == 3 and meta["bootstrap"] is True
    rm = RewardModel.from_run(run)
    assert len(rm.models) == 3 and len({s for s in rm.stats}) == 3  # each member its own standardisation
    heads = [m.head.weight for m in rm.models]
    assert not torch.equal(heads[0], heads[1]) and not torch.equal(heads[1], heads[2])
    low = [find_trunk(m).blocks[0].state_dict() for m in rm.models]
    assert all(torch.equal(low[0][k], low[2][k]) for k in low[0])  # frozen: the same pretrained layer
    top = [find_trunk(m).blocks[-1].state_dict() for m in rm.models]
    assert any(not torch.equal(top[0][k], top[1][k]) for k in top[0])  # trained apart: own seeds and draws

    texts = [dialogue_text("Tell me about film 1", r) for r in ("good film great plot love it fun", "bad")]
    scores = rm.member_scores(texts)  # (K, N)
    assert scores.shape == (3, 2)
    assert torch.allclose(rm.normalized(texts), scores.mean(0))
    wco = RewardModel.from_run(run, ensemble="wco")
    assert torch.allclose(wco.normalized(texts), scores.min(0).values)
    assert torch.allclose(rm.disagreement(texts), scores.std(0, unbiased=False))
    assert [len(m.models) for m in rm.as_members()] == [1, 1, 1]


def test_each_member_sees_its_own_bootstrap_resample_and_a_single_model_all_pairs():
    from minirlhf.stages.reward_model import _bootstrap

    cfg = RewardModelConfig(ensemble=4)
    w = _bootstrap(cfg, 500)
    assert w.shape == (4, 500) and (w >= 0).all() and abs(w.mean().item() - 1) < 0.1
    assert (w == 0).float().mean().item() == pytest.approx(0.368, abs=0.05)  # e^-1 of the pairs left out
    assert not torch.equal(w[0], w[1])
    assert torch.equal(_bootstrap(RewardModelConfig(), 500), torch.ones(1, 500))
    assert torch.equal(_bootstrap(RewardModelConfig(ensemble=4, bootstrap=False), 5), torch.ones(4, 5))


def test_rl_with_an_ensemble_reward_logs_its_disagreement(ensemble_run, tiny_generator, tmp_path):
    from minirlhf.rl.grpo import GRPOConfig
    from minirlhf.stages.rl import train as rl_train

    run, _ = ensemble_run
    cfg = load_config(GRPOConfig, overrides=[
        f"--policy={tiny_generator}", f"--reward.reward_model={run}", "--reward.ensemble=uwo",
        "--reward.uwo_lambda=0.5", "--steps=2", "--batch_size=8", "--group_size=4", "--minibatch_size=8",
        "--prompts.max_eval=4", "--data.max_train=200", "--data.max_eval=50", f"--out={tmp_path / 'rl'}",
        "--device=cpu"])
    out = rl_train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["reward/ensemble_std"] > 0 for r in rows if "reward/mean" in r)
    assert all(r["reward/mean"] == pytest.approx(r["reward/reward_model"]) for r in rows if "reward/mean" in r)
    with pytest.raises(ConfigError, match="ensemble"):
        load_config(GRPOConfig, overrides=[f"--reward.reward_model={run}", "--reward.ensemble=best"])


def test_a_single_member_trains_while_the_ensemble_and_a_monitor_judge_are_only_logged(ensemble_run,
                                                                                    tiny_generator, tmp_path):
    from minirlhf.rl.grpo import GRPOConfig
    from minirlhf.stages.rl import train as rl_train

    run, _ = ensemble_run
    cfg = load_config(GRPOConfig, overrides=[
        f"--policy={tiny_generator}", f"--reward.reward_model={run}", "--reward.ensemble=single",
        f"--reward.monitor={run}", "--steps=2", "--batch_size=8", "--group_size=4", "--minibatch_size=8",
        "--prompts.max_eval=4", "--data.max_train=200", "--data.max_eval=50", f"--out={tmp_path / 'rl'}",
        "--device=cpu"])
    out = rl_train(cfg)
    rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "reward/mean" in r]
    assert len(rows) == 2 and all(r["reward/ensemble_std"] > 0 for r in rows)
    for r in rows:  # the total is member 0's score; the monitor (the ensemble's mean) is logged, never added
        assert r["reward/mean"] == pytest.approx(r["reward/reward_model"])
        assert r["reward/monitor"] != pytest.approx(r["reward/reward_model"], abs=1e-6)
    with pytest.raises(ConfigError, match="--reward.monitor"):
        from minirlhf.models.rewards import Reward, RewardConfig
        Reward(RewardConfig(reward_model=str(run), monitor=str(tmp_path / "nothing")), 8, "cpu")


def test_a_reward_model_at_weight_0_is_scored_and_logged_but_adds_nothing(ensemble_run):
    from types import SimpleNamespace

    from minirlhf.models.rewards import Reward, RewardConfig

    run, _ = ensemble_run
    reward = Reward(RewardConfig(reward_model=str(run), reward_model_weight=0.0, length_weight=1.0), 4, "cpu")
    rollout = SimpleNamespace(prompts=["Tell me about film 1"] * 2, texts=["good film great plot", "bad"],
                              ended=torch.tensor([True, True]), response_mask=torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]]))
    total, terms = reward(None, rollout)
    assert torch.allclose(total, torch.tensor([1.0, 0.25]))  # the length term alone
    assert terms["reward_model"].shape == (2,) and (terms["ensemble_std"] > 0).all()  # watched: for the guard
