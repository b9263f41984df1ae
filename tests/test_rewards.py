"""Reward terms, the user function, normalisation, and the classifier that trains itself when missing."""

import json

import numpy as np
import pytest
import torch
from test_cli import assert_one_line_error

from minirlhf import ConfigError, UserError
from minirlhf.config import DataConfig
from minirlhf.models.policy import Rollout
from minirlhf.models.judge import load_function
from minirlhf.models.rewards import Reward, RewardConfig, RunningMoments, repetition, weighted_terms
from minirlhf.pipeline import load_classifier


class TextPolicy:
    """The one policy method a reward reads: how prompt and response appear to a reader."""

    def as_text(self, prompt, response):
        return f"{prompt} {response}"


def rollout(texts, lengths, ended):
    B, T = len(texts), max(lengths)
    mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths])
    zeros = torch.zeros(B, T)
    return Rollout(["p"] * B, torch.ones(B, 1, dtype=torch.long), torch.ones(B, 1, dtype=torch.long),
                   torch.zeros(B, T, dtype=torch.long), mask, texts, torch.tensor(ended), zeros, None, zeros)


def test_repetition_counts_repeated_word_bigrams():
    assert repetition("the cat sat") == 0.0
    assert repetition("go go go go") == pytest.approx(2 / 3)  # (go, go) three times: two repeats
    assert repetition("one") == 0.0


def test_terms_are_weighted_and_summed(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def shout(prompts, responses):\n    return [r.count('!') for r in responses]\n")
    monkeypatch.chdir(tmp_path)
    cfg = RewardConfig(classifier_weight=0, unended_weight=-1.0, length_weight=0.5, repetition_weight=-2.0,
                       function="my_rewards:shout", function_weight=0.25)
    reward = Reward(cfg, response_len=4, device="cpu")
    r = rollout(["wow!!", "no no no"], [2, 4], [True, False])
    total, terms = reward(TextPolicy(), r)
    assert terms["unended"].tolist() == [0.0, 1.0]
    assert terms["length"].tolist() == [0.5, 1.0]
    assert terms["function"].tolist() == [2.0, 0.0]
    expected = [0.5 * 0.5 + 0.25 * 2, -1 + 0.5 - 2 * repetition("no no no")]
    assert total.tolist() == pytest.approx(expected)


@pytest.mark.parametrize("source, body, message", [
    ("nocolon", "", "must look like module:function"),
    ("missing_mod:f", "", "cannot load reward function"),
    ("bad_rewards:f", "f = 3\n", "is not callable"),
])
def test_bad_user_functions_are_one_line_errors(tmp_path, monkeypatch, source, body, message):
    (tmp_path / "bad_rewards.py").write_text(body)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=message):
        load_function(source)


def test_a_function_returning_the_wrong_count_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "short_rewards.py").write_text("def f(prompts, responses):\n    return [1.0]\n")
    monkeypatch.chdir(tmp_path)
    reward = Reward(RewardConfig(classifier_weight=0, function="short_rewards:f"), 4, "cpu")
    with pytest.raises(UserError, match="returned 1 values for 2 responses"):
        reward(TextPolicy(), rollout(["a", "b"], [1, 1], [True, True]))


def test_running_moments_match_numpy_over_all_batches():
    rng = np.random.default_rng(0)
    batches = [rng.normal(3, 2, size=n) for n in (5, 17, 1, 40)]
    m = RunningMoments()
    for b in batches:
        m.update(torch.tensor(b))
    everything = np.concatenate(batches)
    assert m.mean == pytest.approx(everything.mean()) and m.var == pytest.approx(everything.var())
    assert m.count == len(everything)


def test_normalisation_standardises_with_the_running_moments():
    reward = Reward(RewardConfig(classifier_weight=0, length_weight=1, normalize=True), 4, "cpu")
    out = reward.normalized(torch.tensor([1.0, 3.0]))
    assert out.tolist() == pytest.approx([-1.0, 1.0], abs=1e-4)
    plain = Reward(RewardConfig(classifier_weight=0, length_weight=1), 4, "cpu")
    assert plain.normalized(torch.tensor([5.0])).item() == 5.0


@pytest.mark.parametrize("cfg, off", [
    (RewardConfig(classifier_weight=0), "classifier_weight=0, no reward_model, no function"),
    (RewardConfig(classifier="clf", classifier_weight=0, reward_model="rm", reward_model_weight=0),
     "classifier_weight=0, reward_model_weight=0, no function"),
    (RewardConfig(reward_model="rm", reward_model_weight=0), "no classifier, reward_model_weight=0"),  # rm replaces it
    (RewardConfig(classifier_weight=0, function="m:f", function_weight=0), "no reward_model, function_weight=0"),
])
def test_a_reward_with_every_term_off_is_refused_before_any_model_loads(cfg, off):
    """Every response would score 0 and the policy would train on the KL penalty alone. The runs named here do not
    exist: the check comes before anything is loaded, so it is what answers."""
    with pytest.raises(ConfigError) as e:
        Reward(cfg, 4, "cpu")
    assert str(e.value).startswith("the reward is 0 for every response: no term has a source and a nonzero weight")
    assert off in str(e.value) and "--reward.function=module:fn" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("cfg, terms", [
    (RewardConfig(), ["classifier"]),  # no source named: the classifier, which load_classifier then asks for
    (RewardConfig(reward_model="rm"), ["reward_model"]),
    (RewardConfig(classifier="clf", reward_model="rm"), ["classifier", "reward_model"]),
    (RewardConfig(classifier_weight=0, function="m:f", function_weight=-0.5), ["function"]),
    (RewardConfig(classifier_weight=0, repetition_weight=-1), ["repetition"]),
])
def test_the_weighted_terms_are_those_with_a_source_and_a_nonzero_weight(cfg, terms):
    assert weighted_terms(cfg) == terms


def test_a_reward_with_every_term_off_stops_the_command_in_one_line(cli, tiny_generator):
    assert_one_line_error(cli("ppo", "--policy", str(tiny_generator), "--reward.classifier_weight=0", "--device=cpu"),
                          "the reward is 0 for every response", "classifier_weight=0")


def test_a_missing_classifier_is_an_error_unless_asked_to_train_it(tmp_path):
    with pytest.raises(UserError, match="is not a trained classifier run"):
        load_classifier(RewardConfig(classifier=str(tmp_path / "nope")), "cpu")
    with pytest.raises(UserError, match="needs a classifier"):
        load_classifier(RewardConfig(), "cpu")
    rows = [{"text": f"i love this {i}", "label": 1} if i % 2 else {"text": f"i hate this {i}", "label": 0} for i in range(60)]
    (tmp_path / "tiny.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = RewardConfig(classifier=str(tmp_path / "runs" / "clf"), train_missing=True)
    clf = load_classifier(cfg, "cpu", DataConfig(source=str(tmp_path / "tiny.jsonl")))
    assert (tmp_path / "runs" / "clf" / "model" / "config.json").is_file()
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["clf"]  # trained beside, then renamed into place
    assert clf.score(["i love it"])[1].shape == (1,)
