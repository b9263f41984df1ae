"""The stage registry: every stage is one file plus one `Stage` entry, and a new one needs nothing else. A toy stage
(a file written here, fitting y = 2x with one weight) is registered and then trained through the real `minirlhf`
command, resumed, refused where it must be, and found by RunDir by its registered name."""

import dataclasses
import json
import sys
import textwrap

import pytest

from minirlhf import cli, registry
from minirlhf.rl import registry as rl_registry
from minirlhf.rundir import RunDir

TOY = textwrap.dedent('''
    """A toy stage: fit y = 2x with one weight."""
    import dataclasses

    import torch

    from minirlhf import runner
    from minirlhf.config import OptimConfig, TrainingRunConfig, setting


    @dataclasses.dataclass
    class ToyConfig(TrainingRunConfig):
        steps: int = setting(6, ge=1)
        """updates"""
        train: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=0.1, warmup_ratio=0.0))
        """the optimiser"""


    class ToyJob(runner.ModelJob):
        stage, name, base = "toy", "toy", None
        progress_keys = {"loss": "train/loss"}

        def __init__(self, cfg):
            self.cfg, self.steps = cfg, cfg.steps

        def setup(self, run):
            self.run, self.model = run, torch.nn.Linear(1, 1, bias=False)
            torch.nn.init.zeros_(self.model.weight)
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.cfg.train.lr)
            self.scheduler = None

        def step(self, step):
            x = torch.linspace(-1, 1, 16).unsqueeze(1)  # (16, 1)
            loss = ((self.model(x) - 2 * x) ** 2).mean()
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            return {"train/loss": loss.item()}

        def finish(self, run):
            run.metrics.plot(run.dir.plot("loss"), ["train/loss"], "toy loss")
            return {"weight": self.model.weight.item()}

        def report(self, run, results):
            run.say(f"weight {results['weight']:.3f}")


    def train(cfg, resume=None, overwrite=False):
        return runner.run(ToyJob(cfg), cfg, resume, overwrite)
''')


@pytest.fixture
def toy_stage(tmp_path, monkeypatch):
    (tmp_path / "toy_stage.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    stage = registry.Stage("toy", "a toy", "least squares on y = 2x", "toy_stage:ToyConfig", "toy_stage:train",
                           "train-toy", "fit y = 2x with one weight", "results.json, loss.png")
    monkeypatch.setitem(registry.STAGES, "toy", stage)
    yield stage
    sys.modules.pop("toy_stage", None)


def test_a_stage_added_through_the_registry_alone_trains_resumes_and_is_known(toy_stage, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train-toy", f"--out={out}", "--device=cpu", "--steps=3"]) == 0
    run = RunDir.open(out, "toy")
    assert run.stage == "toy" and run.policy() is None and run.plot("loss").is_file()
    first = json.loads(run.results.read_text())["weight"]
    assert 0 < first < 2
    assert cli.main(["train-toy", f"--resume={out}", "--steps=6"]) == 0
    assert first < json.loads(run.results.read_text())["weight"] < 2  # three more steps, from where it stopped
    assert cli.main(["train-toy", f"--out={out}", "--device=cpu"]) == 2  # never written over without --overwrite
    assert "already holds a toy run" in capsys.readouterr().err
    assert cli.main(["train-toy", f"--out={tmp_path / 'bad'}", "--steps=0"]) == 2  # its own check, from its config
    assert "steps must be >= 1" in capsys.readouterr().err


def test_a_run_of_another_stage_is_named_by_the_registry(toy_stage, tmp_path):
    RunDir.create(tmp_path / "run", "toy")
    with pytest.raises(Exception, match="is a toy run, not an SFT run"):
        RunDir.open(tmp_path / "run", "sft")
    with pytest.raises(ValueError, match="unknown stage"):
        RunDir.create(tmp_path / "other", "not-a-stage")


def test_every_registered_stage_loads_and_every_command_is_a_command():
    commands = cli.build_parser()._subparsers._group_actions[0].choices
    for stage in registry.STAGES.values():
        if stage.config:
            assert dataclasses.is_dataclass(stage.load_config()), stage.name
        if stage.train:
            assert callable(stage.load_train()), stage.name
        if stage.command:
            assert stage.command in commands, stage.command
    assert {a.name.replace("_", "-") for a in rl_registry.ALGORITHMS.values()} <= set(commands)
    assert [s.name for s in registry.STAGES.values() if s.policy] == ["generator", "sft", "dpo", "rl"]


def test_registering_a_name_twice_is_refused():
    with pytest.raises(ValueError, match="registered already"):
        registry.register(registry.STAGES["sft"])
