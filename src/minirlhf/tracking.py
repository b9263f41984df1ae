"""Dashboards beside metrics.jsonl: `--report_to tensorboard,wandb,trackio` (several at once; `none`, the default,
writes metrics.jsonl and the PNGs only).

Every tracker gets exactly the rows of metrics.jsonl (the same names and steps) and the resolved config once, as
hyperparameters. TensorBoard writes RUN_DIR/tensorboard/ offline (`tensorboard --logdir runs`); W&B and Trackio are
used when installed, and a tracker that is not says so in one line and the run goes on without it. A resumed run
continues the same dashboard run: TensorBoard drops the events after the checkpoint, W&B and Trackio resume by name.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from minirlhf import ConfigError

REPORTERS = ("tensorboard", "wandb", "trackio")


def parse(report_to: str) -> list[str]:
    """`tensorboard,wandb` -> ["tensorboard", "wandb"]; `none` or "" -> []."""
    names = [n.strip() for n in report_to.split(",") if n.strip() and n.strip() != "none"]
    unknown = [n for n in names if n not in REPORTERS]
    if unknown:
        raise ConfigError(f"--report_to {unknown[0]!r} is not a dashboard minirlhf knows; use one or more of "
                          f"{', '.join(REPORTERS)} separated by commas, or none")
    return list(dict.fromkeys(names))


def open_trackers(report_to: str, run_dir: Path, config: dict, resumed_at: int | None) -> list:
    """The trackers `report_to` names that can run here (one line for each that cannot)."""
    trackers = []
    for name in parse(report_to):
        try:
            trackers.append(OPENERS[name](Path(run_dir), config, resumed_at))
        except ImportError:
            print(f"--report_to {name}: the {name} package is not installed (pip install {name}); logging to "
                  "metrics.jsonl only for it", flush=True)
    return trackers


def flatten(config: dict, prefix: str = "") -> dict[str, float | int | str | bool]:
    """Nested config -> {"train.lr": 3e-05, ...} with values a dashboard takes (None and lists as text)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def _numeric(row: dict) -> dict[str, float]:
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


class TensorBoard:
    def __init__(self, run_dir: Path, config: dict, resumed_at: int | None):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
        from torch.utils.tensorboard.summary import hparams

        # purge_step: a resumed run's events from after its checkpoint are dropped, as metrics.jsonl's are
        purge = None if resumed_at is None else resumed_at + 1
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)
        if resumed_at is None:
            for summary in hparams(flatten(config), {}):
                self.writer.file_writer.add_summary(summary)

    def log(self, step: int, row: dict) -> None:
        for key, value in _numeric(row).items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, run_dir: Path, config: dict, resumed_at: int | None):
        import wandb

        offline = not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE")
        if offline:
            print(f"--report_to wandb: no WANDB_API_KEY, so W&B logs offline to {run_dir / 'wandb'}; upload it with "
                  "`wandb sync`", flush=True)
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "minirlhf"), name=run_dir.name, dir=str(run_dir),
                              id=_run_id(run_dir), resume="allow", config=config, mode="offline" if offline else None)

    def log(self, step: int, row: dict) -> None:
        self.run.log(_numeric(row), step=step)

    def close(self) -> None:
        self.run.finish()


class Trackio:
    def __init__(self, run_dir: Path, config: dict, resumed_at: int | None):
        import trackio

        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", "minirlhf"), name=run_dir.name,
                                config=config, resume="allow")

    def log(self, step: int, row: dict) -> None:
        self.run.log(_numeric(row), step=step)

    def close(self) -> None:
        self.run.finish()


def _run_id(run_dir: Path) -> str:
    """A dashboard id that is the same each time this run directory is resumed."""
    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]


OPENERS = {"tensorboard": TensorBoard, "wandb": WandB, "trackio": Trackio}
