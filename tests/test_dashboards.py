"""`--report_to`: the dashboards get the rows of metrics.jsonl, read back here from TensorBoard's own event files."""

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from minirlhf import ConfigError
from minirlhf.rl.ppo import PPOConfig
from minirlhf.stages.rl import train
from minirlhf.config import load_config
from minirlhf.tracking import flatten, parse


def test_an_rl_run_writes_tensorboard_events_with_the_metrics_and_config(tiny_generator, tiny_classifier, tmp_path,
                                                                          capsys):
    cfg = load_config(PPOConfig, overrides=[
        f"--policy={tiny_generator}", f"--reward.classifier={tiny_classifier}", "--steps=2", "--batch_size=8",
        "--minibatch_size=8", "--response_len=6", "--device=cpu", "--data.max_train=200", "--data.max_eval=50",
        "--prompts.max_eval=8", "--report_to=tensorboard,trackio", f"--out={tmp_path / 'run'}"])
    run = train(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    for key in ("reward/mean", "objective/kl", "policy/clipfrac", "value/explained_var", "response/distinct_2"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert logged == [(r["step"], pytest.approx(r[key], rel=1e-6, abs=1e-7)) for r in rows if key in r], key
    start = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    assert hparams["train.lr"].number_value == pytest.approx(3e-4)  # as resolved for an LSTM policy
    assert hparams["kl_coef"].number_value == pytest.approx(0.1) and hparams["device"].string_value == "cpu"
    out = capsys.readouterr().out
    assert "--report_to trackio: the trackio package is not installed (pip install trackio)" in out


def test_report_to_takes_several_names_and_refuses_unknown_ones():
    assert parse("tensorboard, wandb") == ["tensorboard", "wandb"] and parse("none") == [] and parse("") == []
    with pytest.raises(ConfigError, match="'tensorbord' is not a dashboard"):
        parse("tensorbord")


def test_hyperparameters_are_flat_and_plain():
    assert flatten({"train": {"lr": 1e-4, "betas": [0.9, 0.99]}, "out": None, "seed": 1}) == \
        {"train.lr": 1e-4, "train.betas": "[0.9, 0.99]", "out": "None", "seed": 1}
