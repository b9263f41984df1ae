"""What the stages that train a policy (SFT, DPO, RL) give the runner alike: the checkpoint holds the policy (and RL's
separate critic) as policy folders, read back into the models set up from the starting policy, beside JSON state.
`ModelJob` (runner.py) is the same for the stages that train one plain model."""

from __future__ import annotations

from pathlib import Path

from minirlhf.models.load import restore_policy


class PolicyJob:
    """A base for a policy stage's job: `policies()` names the models the checkpoint holds, `kept` the attributes it
    keeps as JSON; `cfg.policy` and `cfg.policy_options` are the starting policy and how it is set up."""

    algorithm = None
    kept: tuple[str, ...] = ()

    def policies(self) -> dict:
        """checkpoint folder name -> model (None: not in this run)"""
        return {"policy": self.policy}

    def save(self, folder: Path) -> dict:
        for name, model in self.policies().items():
            if model is not None:
                model.save(folder / name)
        return {"policy_from": self.cfg.policy} | {name: getattr(self, name) for name in self.kept}

    def load(self, folder: Path, state: dict) -> None:
        """The checkpoint's policies (a LoRA policy's adapters stay adapters); the reference stays the starting
        policy, never saved."""
        for name, model in self.policies().items():
            if model is not None:
                restore_policy(model, folder / name, self.run.device, **self.cfg.policy_options.as_kwargs())
        for name in self.kept:
            if name in state:  # (a checkpoint written before the job kept it: the job's start value stays)
                setattr(self, name, state[name])

    def end(self) -> None:
        return None
