"""A run directory: every path a run writes, what kind of run made it, and its atomic checkpoint.

    RUN_DIR/
      run.json        what made it, written when the run starts: stage, algorithm, base model, minirlhf version
      config.yaml     the resolved config;  metrics.jsonl, *.png, results.json, report.md, samples.md
      model/          a classifier's or reward model's weights (transformers' own format)
      checkpoint/     the last checkpoint, replaced whole: state.json (step and the stage's JSON state),
                      trainer_state.safetensors (optimizer and RNG), and model folders such as policy/
      checkpoint-STEP/  the checkpoints before it (`--keep_checkpoints`), the latest first to resume from when
                      checkpoint/ cannot be read
      resumes.jsonl   each resume that changed a setting: the step, and each setting's old and new value
      round-K/        a `loop` run's round K: feedback.sqlite, labels.jsonl, train/heldout pairs, reward_model/, policy/
A generator run keeps its LSTM (model.safetensors, vocab.json, checkpoint.json) at the top, the policy folder that
`--policy RUN` loads. Readers never guess a run's kind from its files: they ask `RunDir.find(path).stage`.
"""

from __future__ import annotations

import datetime
import os
import shutil
from contextlib import contextmanager
from functools import cached_property
from dataclasses import dataclass
from pathlib import Path

from minirlhf import RunError, __version__
from minirlhf.checkpoint import atomic_dir, discard, load_json, old_copy, recover_dir, save_json
from minirlhf.config import save_config
from minirlhf.registry import STAGES, noun

@dataclass(frozen=True)
class RoundDir:
    """The files of one round of a `loop` run (RUN_DIR/round-K/)."""

    folder: Path
    db = property(lambda self: self.folder / "feedback.sqlite")
    """the page's pairs and judgements"""
    labels = property(lambda self: self.folder / "labels.jsonl")
    train_pairs = property(lambda self: self.folder / "train_pairs.jsonl")
    heldout_pairs = property(lambda self: self.folder / "heldout_pairs.jsonl")
    rm_train = property(lambda self: self.folder / "rm_train.jsonl")
    """every round's training pairs so far: what the round's reward model trains on"""
    rm_heldout = property(lambda self: self.folder / "rm_heldout.jsonl")
    reward_model = property(lambda self: self.folder / "reward_model")
    """the round's reward-model run"""
    policy_run = property(lambda self: self.folder / "policy")
    """the round's policy run (RL or DPO)"""


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:  # a RunDir is a path too: Path(run), open(run / "x"), RunDir(run)
        return str(self.path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # ---------------------------------------------------------------- paths
    info_file = property(lambda self: self.path / "run.json")
    config = property(lambda self: self.path / "config.yaml")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    results = property(lambda self: self.path / "results.json")
    report = property(lambda self: self.path / "report.md")
    eval = property(lambda self: self.path / "eval.json")  # `minirlhf evaluate RUN`'s figures
    samples = property(lambda self: self.path / "samples.md")
    feedback = property(lambda self: self.path / "feedback.sqlite")  # an RL run's page's database, by default
    model = property(lambda self: self.path / "model")
    checkpoint = property(lambda self: self.path / "checkpoint")
    state = property(lambda self: self.path / "checkpoint" / "state.json")
    trainer_state = property(lambda self: self.path / "checkpoint" / "trainer_state.safetensors")
    resumes = property(lambda self: self.path / "resumes.jsonl")

    def plot(self, name: str) -> Path:
        return self.path / f"{name}.png"

    def round(self, k: int) -> "RoundDir":
        """Round k's folder of a `loop` run: its pairs' database, labels, reward-model and policy runs."""
        return RoundDir(self.path / f"round-{k}")

    def saved(self, name: str) -> Path:
        """A model folder inside the last checkpoint (`policy`, `value_model`, `model`)."""
        return self.checkpoint / name

    # ---------------------------------------------------------------- what kind of run
    @cached_property
    def info(self) -> dict:
        """run.json, read once: it is written when the run starts and never changes."""
        return load_json(self.info_file)

    stage = property(lambda self: self.info.get("stage"))
    algorithm = property(lambda self: self.info.get("algorithm"))

    def policy(self) -> Path | None:
        """The folder of the policy this run trained (None for runs that train no policy)."""
        if self.stage == "generator":
            return self.path
        if self.stage == "loop":  # the policy of the last round it finished
            inner = RunDir.find(self.path / load_json(self.state)["policy_run"]) if self.state.is_file() else None
            return inner.policy() if inner is not None else None
        if self.stage in STAGES and STAGES[self.stage].policy and self.saved("policy").is_dir():
            return self.saved("policy")
        return None

    # ---------------------------------------------------------------- making and finding runs
    @classmethod
    def create(cls, out: str | Path | None, stage: str, algorithm: str | None = None, base: str | None = None,
               overwrite: bool = False, config=None) -> "RunDir":
        """A new run directory (`out`, or a time-stamped folder under runs/) recording what makes it and its
        `config`, made whole at once (a crash leaves it as it was, or complete). A run already at `out` is never
        written into: it stops the run (`check_new`), or with `overwrite` is moved aside whole."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}")
        path = Path(out) if out is not None else fresh_path(Path("runs"), (algorithm or stage).replace("_", "-"))
        if check_new(path, overwrite):
            aside = fresh_path(path.parent, f"{path.name}.replaced")
            os.replace(path, aside)
            print(f"--overwrite: the run that was in {path} is now in {aside} (nothing deleted)", flush=True)
        with atomic_dir(path) as tmp:
            if config is not None:
                save_config(config, tmp / "config.yaml")
            save_json({"stage": stage, "algorithm": algorithm, "base": base, "version": __version__}, tmp / "run.json")
        return cls(path)

    @classmethod
    def find(cls, path: str | Path | None) -> "RunDir | None":
        """The run at `path`, its folders recovered from a crash mid-checkpoint; None if `path` is no run."""
        if path is None or not (Path(path) / "run.json").is_file():
            return None
        run = cls(Path(path))
        for folder in (run.checkpoint, run.model):
            recover_dir(folder)
        previous = old_copy(run.checkpoint)  # a crash after the swap, before the previous one was set aside
        if previous.is_dir() and (previous / "state.json").is_file():
            try:
                os.replace(previous, run.path / f"checkpoint-{int(load_json(previous / 'state.json')['step'])}")
            except (OSError, RunError, KeyError, ValueError, TypeError):
                pass  # a damaged leftover: the next checkpoint replaces it
        return run

    @classmethod
    def open(cls, path: str | Path, stage: str | None = None, command: str = "") -> "RunDir":
        """The run at `path`, which must be of `stage`; else one line saying what it is and what to do."""
        run = cls.find(path)
        if run is None:
            raise RunError(f"{path} is not a minirlhf run directory (no run.json)" +
                           (f"; make one with `minirlhf {command}`" if command else ""))
        if stage is not None and run.stage != stage:
            raise RunError(f"{path} is {noun(run.stage)} run, not {noun(stage)} run" +
                           (f"; make one with `minirlhf {command}`" if command else ""))
        return run

    # ---------------------------------------------------------------- the checkpoint
    @contextmanager
    def write_checkpoint(self, keep: int = 1):
        """A folder to fill; on success it replaces checkpoint/ whole (a crash, or weights that are not finite, leave
        the previous one intact), which moves to checkpoint-STEP/ while `keep` checkpoints are kept in all."""
        previous = self.checkpoint_step() if keep > 1 else 0
        with atomic_dir(self.checkpoint, self.path / f"checkpoint-{previous}" if previous else None) as tmp:
            yield tmp
        self.prune(keep)

    def prune(self, keep: int) -> None:
        """Keep `keep` checkpoints in all (a resume prunes too: a crash may have come before the last save did)."""
        for old in self.earlier_checkpoints()[keep - 1:]:
            discard(old)

    def earlier_checkpoints(self) -> list[Path]:
        """The checkpoint-STEP/ folders kept besides checkpoint/, the latest first."""
        found = [(int(p.name.split("-", 1)[1]), p) for p in self.path.glob("checkpoint-*")
                 if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
        return [p for _, p in sorted(found, reverse=True)]

    def clear_leftovers(self) -> None:
        """Remove what writes cut short by a crash left (atomic writes' `.NAME.*.tmp` files and folders): done when
        the run resumes, when nothing else writes to it."""
        for leftover in self.path.glob(".*.tmp"):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink(missing_ok=True)

    def checkpoint_step(self) -> int:
        """The step of the last checkpoint (0 if there is none)."""
        return int(load_json(self.state).get("step", 0)) if self.state.is_file() else 0


def check_new(out: str | Path | None, overwrite: bool = False) -> bool:
    """Whether a new run may go to `out` (None: a fresh folder under runs/): one line and no change when it may not.
    True when `out` holds a run that `overwrite` will move aside."""
    if out is None:
        return False
    path = Path(out)
    if str(out).strip() == "":
        raise RunError("--out is empty; name a folder for the run, or leave --out out for a new one under runs/")
    if path.exists() and not path.is_dir():
        raise RunError(f"--out {path} is a file; give a directory path")
    if (path / "run.json").is_file():
        if overwrite:
            return True
        kind = noun(load_json(path / "run.json").get("stage") or "a")
        raise RunError(f"{path} already holds {kind} run; continue it with --resume {path}, or pass --overwrite "
                       f"to move it aside (to {path}.replaced-TIME) and start anew there")
    if path.is_dir() and any(path.iterdir()):
        raise RunError(f"--out {path} is not empty and holds no minirlhf run; give a new or empty folder")
    return False


def fresh_path(root: Path, name: str) -> Path:
    """`root/NAME-TIME` (a -2, -3 ... after it if that exists already): a new name for a run or a folder set aside."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = root / f"{name}-{stamp}", 1
    while path.exists():
        n += 1
        path = root / f"{name}-{stamp}-{n}"
    return path
