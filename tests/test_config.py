import re

import pytest
from test_cli import assert_one_line_error

from minirlhf.stages.classifier import ClassifierConfig
from minirlhf.stages.generator import GeneratorConfig
from minirlhf.rl.ppo import PPOConfig
from minirlhf.config import ConfigError, load_config, load_saved, save_config
from minirlhf.flags import describe
from minirlhf.pipeline import DemoConfig


def test_defaults_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 0.001\n  epochs: 5\nmodel:\n  freeze_layers: 2\n")
    cfg = load_config(ClassifierConfig, str(f), ["--train.lr=3e-5", "--data.max_train=10"])
    assert cfg.train.lr == 3e-5  # override beats file
    assert cfg.train.epochs == 5  # file beats default
    assert cfg.model.freeze_layers == 2
    assert cfg.data.max_train == 10
    assert cfg.train.batch_size == ClassifierConfig().train.batch_size


def test_ints_are_accepted_for_floats_and_null_for_optionals():
    cfg = load_config(ClassifierConfig, None, ["--train.lr=1", "--data.max_train=null"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.data.max_train is None


@pytest.mark.parametrize("override, message", [
    ("--train.lrr=1", "unknown config key 'train.lrr'"),
    ("--train.lr=fast", "train.lr must be float, got 'fast'"),
    ("--train.epochs=1.5", "train.epochs must be int"),
    ("--train.lr=-1", "train.lr must be > 0, got -1.0"),
    ("--train.warmup_ratio=2", "train.warmup_ratio must be in [0, 1]"),
    ("--device=tpu", "device must be one of auto, cpu, cuda, mps"),
    ("--model.truncation=middle", "model.truncation must be one of head, head_tail, tail"),
    ("--train=3", "train is a section"),
    ("lr=3", "write overrides as --section.key=value"),
])
def test_bad_values_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(ClassifierConfig, None, [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("value, shown", [
    ("inf", "inf"), ("-inf", "-inf"), ("nan", "nan"), ("Infinity", "Infinity"), ("NaN", "NaN"),  # as typed
    (".inf", "inf"), ("-.inf", "-inf"), (".nan", "nan"),  # YAML's spellings, read as floats
    ("1e400", "1e400"), ("1" + "0" * 400, "1" + "0" * 400),  # overflow: a string to float, an int YAML reads whole
])
def test_a_float_must_be_finite(value, shown):
    """inf passes `> 0` and nan fails every comparison, so the range checks cannot catch them: each is refused by
    name, whatever field, including ones with no range check (reward weights)."""
    for key in ("train.lr", "reward.unended_weight", "kl_coef"):
        with pytest.raises(ConfigError) as e:
            load_config(PPOConfig, None, [f"--{key}={value}"])
        assert str(e.value) == f"{key} must be a finite number, got {shown}"
    assert load_config(PPOConfig, None, ["--reward.function=inf"]).reward.function == "inf"  # a string stays one


def test_non_finite_values_in_a_yaml_file_or_on_the_command_line_are_one_line_exit_2(cli, tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  lr: .nan\n")
    assert_one_line_error(cli("train-classifier", "--config", "c.yaml"), "train.lr must be a finite number, got nan")
    assert_one_line_error(cli("grpo", "--train.lr=inf"), "train.lr must be a finite number, got inf")
    assert_one_line_error(cli("ppo", "--reward.length_weight", ".inf"),
                          "reward.length_weight must be a finite number, got inf")


def test_a_bare_option_is_a_switch_that_only_a_boolean_takes():
    from minirlhf.rl.grpo import GRPOConfig

    assert load_config(GRPOConfig, None, ["--policy_options.train_head"]).policy_options.train_head is True
    with pytest.raises(ConfigError, match="steps must be int"):
        load_config(GRPOConfig, None, ["--steps"])


def test_bad_yaml_files(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(ClassifierConfig, str(missing))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(ClassifierConfig, str(bad))
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(ClassifierConfig, str(scalar))


def test_nested_overrides_keep_the_parents_defaults():
    demo = load_config(DemoConfig, None, ["--classifier.train.lr=0.01"])
    assert demo.classifier.train.lr == 0.01
    # the demo's quicker defaults survive an override elsewhere in the same section
    assert demo.classifier.data.max_train == DemoConfig().classifier.data.max_train != ClassifierConfig().data.max_train


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(GeneratorConfig, None, ["--samples.prompts=[a, b c]", "--model.n_layers=3"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_saved(GeneratorConfig, tmp_path / "config.yaml") == cfg
    assert cfg.samples.prompts == ["a", "b c"]


def test_every_field_has_a_docstring():
    for cls in (ClassifierConfig, GeneratorConfig, DemoConfig):
        rows = describe(cls())
        undocumented = [key for key, _, doc in rows if not doc]
        assert not undocumented, undocumented


def test_choices_are_literal_types_read_from_yaml_and_the_command_line(tmp_path):
    from minirlhf.rl.ppo import A2CConfig

    f = tmp_path / "c.yaml"
    f.write_text("device: cpu\nkl_estimator: k3\n")
    cfg = load_config(PPOConfig, str(f), ["--critic=separate"])
    assert (cfg.device, cfg.kl_estimator, cfg.critic) == ("cpu", "k3", "separate")
    for bad in ("--critic=3", "--kl_estimator=K3", "--critic="):
        with pytest.raises(ConfigError, match="must be one of"):
            load_config(A2CConfig, None, [bad])


def test_bounds_live_in_field_metadata_and_a_subclass_that_redeclares_a_field_keeps_its_bases_bounds():
    """GroupConfig declares ppo_epochs again (default 1) without bounds: RLConfig's >= 1 still applies; A2C narrows
    it to exactly 1 with bounds of its own."""
    import dataclasses
    import typing

    from minirlhf.config import rules_of
    from minirlhf.rl.grpo import GRPOConfig
    from minirlhf.rl.ppo import A2CConfig

    assert rules_of(GRPOConfig)["ppo_epochs"] == {"ge": 1}
    assert rules_of(A2CConfig)["ppo_epochs"] == {"ge": 1, "le": 1}
    with pytest.raises(ConfigError, match=r"ppo_epochs must be >= 1, got 0"):
        load_config(GRPOConfig, None, ["--ppo_epochs=0"])
    with pytest.raises(ConfigError, match=r"ppo_epochs must be in \[1, 1\], got 2"):
        load_config(A2CConfig, None, ["--ppo_epochs=2"])
    # No rule is written anywhere but in the fields: the old `checks` mini-language is gone from every config.
    from minirlhf.registry import STAGES
    from minirlhf.rl import registry

    configs = [s.load_config() for s in STAGES.values() if s.config] + [a.config for a in registry.ALGORITHMS.values()]
    seen = set()
    while configs:
        cls = configs.pop()
        seen.add(cls)
        assert not hasattr(cls, "checks"), cls
        configs += [t for t in typing.get_type_hints(cls).values() if dataclasses.is_dataclass(t) and t not in seen]
    assert len(seen) > 15


def test_what_a_resume_may_not_change_is_field_metadata_and_covers_whole_sections():
    from minirlhf.config import fixed_on_resume
    from minirlhf.rl.grpo import GRPOConfig
    from minirlhf.stages.dpo import DPOConfig

    for key in ("seed", "out", "batch_size", "group_size", "policy", "reward.classifier", "policy_options.lora_rank",
                "prompts.file", "data.source"):
        assert fixed_on_resume(GRPOConfig, key), key
    for key in ("steps", "train.lr", "kl_coef", "save_every", "no_such_key"):
        assert not fixed_on_resume(GRPOConfig, key), key
    for key in ("preferences", "max_train", "split_seed", "train.batch_size", "train.micro_batch_size"):
        assert fixed_on_resume(DPOConfig, key), key
    assert not fixed_on_resume(DPOConfig, "train.epochs")
    assert not fixed_on_resume(ClassifierConfig, "train.epochs") and fixed_on_resume(ClassifierConfig, "model.name")


def test_help_shows_each_fields_choices_bounds_and_resume_rule():
    rows = {k: doc for k, _, doc in describe(PPOConfig())}
    assert rows["critic"].endswith("one of head, separate")
    assert rows["clip_eps"].endswith("> 0")
    assert rows["seed"].endswith("fixed on --resume")
    assert rows["policy_options.freeze_layers"].endswith(">= 0; fixed on --resume")  # the section is fixed
    assert "fixed on --resume" not in rows["steps"]


def test_a_tools_flags_are_its_config_fields_typed_and_bounded_as_a_stages_are():
    """`generate` and `feedback serve` take no argparse defaults of their own: the flags, their help and their checks
    come from the dataclass (GenerateConfig, ServeConfig), and a bad value names the flag as typed."""
    from minirlhf import cli
    from minirlhf.feedback.commands import ServeConfig
    from minirlhf.tools import GenerateConfig

    parser = cli.build_parser()
    cfg = cli.tool_config(parser.parse_args(["generate", "run", "--prompt", "a", "--prompt", "b", "-n", "2",
                                             "--top-p", "0.5", "--env", "constraints"]))
    assert cfg == GenerateConfig(run_dir="run", prompt=["a", "b"], n=2, top_p=0.5, env="constraints")
    serve = cli.tool_config(parser.parse_args(["feedback", "serve", "--mix", "--reward-model", "r1",
                                               "--reward-model", "r2", "--select", "uncertain"]))
    assert (serve.mix, serve.reward_model, serve.select, serve.temperature, serve.port) == \
        (True, ["r1", "r2"], "uncertain", 0.7, 8000)
    assert isinstance(serve, ServeConfig)
    for argv, message in ((["generate", "r", "--top-p", "2"], "--top-p must be in (0, 1], got 2.0"),
                          (["feedback", "serve", "--overlap", "-1"], "--overlap must be in [0, 1], got -1.0"),
                          (["feedback", "serve", "--select", "best"], "--select must be one of random, uncertain"),
                          (["evaluate", "r", "-n", "0"], "-n must be >= 1, got 0")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            cli.tool_config(parser.parse_args(argv))
