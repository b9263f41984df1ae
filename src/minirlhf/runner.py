"""One lifecycle for every stage: run directory, resolved config, seed, device and torchrun, metrics, progress,
a checkpoint every `save_every` steps, `--resume`, results with the memory report, and teardown.

A stage is a `Job`: it says how to set itself up, what one step does, what its checkpoint holds beyond the
optimizer, and what its results are; `run(job, cfg)` does everything else, the same way for every stage:

    (a new run never goes where one is: check_new)  ->  distributed.init, device, precision, seed  ->  job.setup
    ->  RunDir.create, or restore from RUN_DIR/checkpoint  ->  job.begin (step 0)
    ->  job.step(s) for s = done + 1 .. job.steps, checkpointing  ->  job.end
    ->  job.finish (main process)  ->  model cards, job.report  ->  results.json (last: the run has finished)

The passes run under `--dtype`'s autocast; every metrics row also goes to the `--report_to` dashboards. Under
torchrun the processes agree on every outcome that is one process's own before the next collective
(distributed.agree), so a failure anywhere stops all of them with the same line.

A resumed run repeats exactly what the uninterrupted run did (on CPU; tested with SIGKILL at random moments of
every stage, benchmarks/faults.py): a step's data and random draws derive from (seed, step), every random stream
is checkpointed, and metrics.jsonl keeps only the rows the checkpoint had seen. Settings changed on resume are
applied and recorded (`apply_changes`); only finite weights are ever saved.
"""

from __future__ import annotations

import gc
import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from minirlhf import RunError, distributed, sharding, strict, tracking
from minirlhf.checkpoint import (NotFinite, atomic_write_text, load_json, load_optimizer_state, load_weights,
                                 optimizer_state, save_json, save_weights)
from minirlhf.config import load_yaml_dict, save_config, to_dict
from minirlhf.metrics import MetricsWriter
from minirlhf.modelcard import write_model_card
from minirlhf.registry import STAGES
from minirlhf.rundir import RunDir, check_new, fresh_path
from minirlhf.precision import Precision, measured, precision, set_precision
from minirlhf.runtime import memory_report, peak_memory_mb, pick_device, rng_state, seed_everything, set_rng_state
from minirlhf.tracking import flatten
from minirlhf.training import progress, skips


@dataclass
class Run:
    """What a job sees of the run it is part of."""

    cfg: object
    device: torch.device
    main: bool
    """rank 0 (or the only process): the one that writes files"""
    dir: RunDir | None = None
    """None on the other processes under torchrun"""
    metrics: MetricsWriter | None = None
    done: int = 0
    """steps finished before this process started (a resumed run)"""
    memory: dict | None = None
    precision: Precision | None = None
    """the arithmetic of the passes (`--dtype`)"""

    def say(self, *lines: str) -> None:
        if self.main:
            print(*lines, sep="\n", flush=True)


class Job(Protocol):
    """What a stage gives the runner. Attributes are set by `setup` at the latest."""

    name: str  # the progress bar's label and the default run folder's prefix
    stage: str  # a name in registry.STAGES
    algorithm: str | None
    base: str | None  # what it starts from (a model or a run): a resumed run must start from the same
    steps: int
    optimizer: torch.optim.Optimizer | None  # None: a job that trains nothing itself (the loop)
    scheduler: object | None
    progress_keys: dict[str, str]  # progress-bar label -> metric shown there

    def setup(self, run: Run) -> None: ...
    def begin(self, run: Run) -> dict | None: ...  # before the first step: the step-0 metrics of a fresh run
    def step(self, step: int) -> dict | None: ...  # one step; the metrics row to log, if any
    def save(self, folder: Path) -> dict: ...  # model folders into `folder`; returns the stage's JSON state
    def load(self, folder: Path, state: dict) -> None: ...
    def end(self) -> None: ...  # release what holds the process group (DDP wrappers)
    def modules(self) -> list: ...
    def finish(self, run: Run) -> dict: ...  # plots and the results (main process only)
    def report(self, run: Run, results: dict) -> None: ...  # report.md and the closing lines


def run(job: Job, cfg, resume: str | Path | None = None, overwrite: bool = False) -> Path | None:
    """Run `job` to its last step (from RUN_DIR's last checkpoint with `resume`); the run directory, or None on
    the other processes under torchrun. A new run never writes into another: `overwrite` moves it aside first."""
    if resume is None:
        check_new(cfg.out, overwrite)  # before anything loads, so that a refusal is quick and changes nothing
    elif overwrite:
        raise RunError("--overwrite starts a run anew and --resume continues one; give one of them")
    strict.install()  # MINIRLHF_STRICT_DEVICES=1 only
    tracking.parse(cfg.report_to)  # a misspelt dashboard fails before anything runs
    distributed.init(cfg.device, cfg.strategy, cfg.dist_timeout_s)
    device, why = (distributed.device(), "torchrun, NCCL") if distributed.device() else pick_device(cfg.device)
    run_ = Run(cfg, device, distributed.is_main())
    # what a resumed run was configured with, read by every process before the main one writes the new config
    saved = load_yaml_dict(RunDir(resume).config) if resume is not None else {}
    if cfg.dtype in ("auto", "bf16"):
        with distributed.main_first():  # one process times the precision probe (once a machine); the others read it
            measured(device)
    run_.precision = set_precision(device, cfg.dtype, agree=distributed.everywhere)
    skips(cfg.guards)  # a count of skipped updates for this run (a resumed run takes its checkpoint's)
    seed_everything(cfg.seed)
    run_.say(f"device: {device} ({why}), {distributed.world_size()} process(es), {run_.precision.name} passes "
             f"({run_.precision.why})")
    with distributed.main_first():
        job.setup(run_)  # bad input fails here, before anything is written
    with distributed.main_first():  # it writes the run, and may set a damaged checkpoint aside, before the others read
        _open(run_, job, cfg, resume, overwrite, saved)
    with run_.precision.autocast():
        first = job.begin(run_)
        sharding.adopt(job.optimizer)  # --strategy fsdp: the optimizer steps the shards `begin` made
        if run_.main and first and run_.done == 0:
            run_.metrics.log(0, **first)
        _loop(run_, job, cfg)
    job.end()
    gc.collect()  # DDP's reducers must go before the process group does, or the exit can abort
    with sharding.unsharded(job.modules()), distributed.agreeing():  # fsdp: whole weights, for the main process
        if run_.main:
            with run_.precision.autocast():
                _finish(run_, job)
    distributed.close(together=True)
    return run_.dir.path if run_.main else None


def _open(run_: Run, job: Job, cfg, resume, overwrite: bool = False, saved: dict | None = None) -> None:
    """The run directory: a new one, or `resume`'s with the job restored from its checkpoint and the settings changed
    since `saved` (its config) applied."""
    rows = None  # the metrics rows a resumed run keeps
    if resume is not None:
        run_.dir = RunDir.open(resume, job.stage)
        if run_.dir.algorithm != job.algorithm:
            raise RunError(f"{resume} holds a {run_.dir.algorithm or run_.dir.stage} run, not {job.algorithm}; "
                           "resume it with its own command")
        if run_.main:
            run_.dir.clear_leftovers()
        run_.done, rows = restore(run_.dir, job)
        if run_.main:
            run_.dir.prune(cfg.keep_checkpoints)
        if run_.done >= job.steps and run_.dir.results.is_file():
            raise RunError(f"{resume} already ran {run_.done} steps; pass --steps=N with N > {run_.done} "
                           "(or more epochs) to train further")
        run_.say(f"{job.name}: resuming after step {run_.done}")
        apply_changes(run_, job, saved or {})
    elif run_.main:
        run_.dir = RunDir.create(cfg.out, job.stage, job.algorithm, job.base, overwrite, config=cfg)
    if run_.main:
        save_config(cfg, run_.dir.config)
        # the rows the checkpoint had seen stay (none without a checkpoint: `begin` logs step 0 again; nor the closing
        # rows of a run killed in its last phase, which `finish` logs again)
        resumed_at = (run_.done if run_.done > 0 else -1) if resume is not None else None
        trackers = tracking.open_trackers(cfg.report_to, run_.dir.path, to_dict(cfg), resumed_at)
        run_.metrics = MetricsWriter(run_.dir.path, keep_until=resumed_at, trackers=trackers,
                                     keep_rows=rows)


def _loop(run_: Run, job: Job, cfg) -> None:
    bar = progress(range(run_.done + 1, job.steps + 1), desc=job.name, unit="step", disable=not run_.main)
    for step in bar:
        row = job.step(step)
        if row and skips().total:
            row["train/skipped_updates"] = skips().total
        if run_.main and row:
            run_.metrics.log(step, **row)
            shown = {label: f"{row[key]:.3f}" for label, key in job.progress_keys.items() if key in row}
            if shown:
                bar.set_postfix(shown, refresh=False)
        if step % cfg.save_every == 0 or step == job.steps:
            with sharding.gathered(job.modules(), job.optimizer), distributed.agreeing():  # fsdp: all lend shards
                if run_.main:
                    save_checkpoint(run_.dir, job, step, cfg.keep_checkpoints, len(run_.metrics.rows))


def _finish(run_: Run, job: Job) -> None:
    run_.memory = memory_report(job.modules(), job.optimizer)
    results = job.finish(run_)  # may log last rows (test figures) before the metrics file closes
    run_.metrics.close()
    results.setdefault("memory", run_.memory)
    results.setdefault("peak_memory_mb", round(peak_memory_mb()))
    _model_cards(run_, job, results)
    job.report(run_, results)
    save_json(results, run_.dir.results)  # last: a run with results.json has finished (a resume stops there)


def _model_cards(run_: Run, job: Job, results: dict) -> None:
    """README.md in the folder of every model the run made (the policy; a classifier's or reward model's model/),
    as the Hugging Face hub shows it."""
    folders = [run_.dir.policy() if STAGES[job.stage].policy else None, run_.dir.model]
    cfg = run_.cfg
    data = getattr(cfg, "preferences", None) or getattr(getattr(cfg, "data", None), "source", None)
    command = (f"minirlhf {shlex.join(sys.argv[1:])}" if Path(sys.argv[0]).name in ("minirlhf", "__main__.py")
               else f"the Python API (minirlhf {job.algorithm or job.stage}), with the config in {run_.dir.config}")
    for folder in folders:
        if folder is not None and folder.is_dir():
            write_model_card(folder, base_model=job.base, method=job.algorithm or job.stage, data=data,
                             results=results, command=command, title=getattr(job, "title", None))


def save_checkpoint(run_dir: RunDir, job: Job, step: int, keep: int = 1, metrics_rows: int | None = None) -> None:
    """checkpoint/, replaced whole: the job's model folders and JSON state, the optimizer's tensors and every random
    stream (safetensors), the gradient scaler, the count of skipped updates, the step, and how many rows
    metrics.jsonl held (what a resume keeps of it). A crash while writing, or weights that are not finite, leave
    the previous checkpoint in place; `keep` checkpoints are kept in all."""
    tensors, optimizer_meta = optimizer_state(job.optimizer) if job.optimizer is not None else ({}, None)
    rng, rng_meta = rng_state()
    try:
        with run_dir.write_checkpoint(keep) as tmp:
            state = job.save(tmp)
            save_weights({**{f"optimizer.{k}": v for k, v in tensors.items()}, **rng}, tmp / run_dir.trainer_state.name)
            scheduler = job.scheduler.state_dict() if job.scheduler is not None else None
            save_json({"stage": job.stage, "algorithm": job.algorithm, "step": step, "base": job.base, **state,
                       "optimizer": optimizer_meta, "scheduler": scheduler, "rng": rng_meta,
                       "scaler": precision().scaler.state_dict(), "skipped_updates": skips().total,
                       "metrics_rows": metrics_rows},
                      tmp / run_dir.state.name)
    except NotFinite as e:
        name = str(e).split(" in ", 1)[0]
        raise NotFinite(f"the weights became non-finite by step {step} ({name}), so they were not saved; checkpoint/ "
                        f"still holds step {run_dir.checkpoint_step()}: resume it with a lower --train.lr") from e


class WrongRun(RunError):
    """A checkpoint of another run (another starting policy): never a reason to try an earlier checkpoint."""


def restore(run_dir: RunDir, job: Job) -> tuple[int, int | None]:
    """Load the last checkpoint into the freshly set-up job; the step it was taken at and the metrics rows it had seen
    ((0, 0) if there is none yet: the run then starts again from the beginning, in the same directory). A checkpoint
    that cannot be read gives way to the latest earlier one that can (`--keep_checkpoints`), which takes its place;
    the damaged one is kept aside."""
    folders = [run_dir.checkpoint, *run_dir.earlier_checkpoints()]
    if not any(f.is_dir() for f in folders):
        return 0, 0
    first_error = None
    for folder in folders:
        try:
            step, rows = _load_checkpoint(folder, job)
        except WrongRun:
            raise
        except RunError as e:
            first_error = first_error or e
            continue
        if folder != run_dir.checkpoint:
            damaged = fresh_path(run_dir.path, "checkpoint.damaged")
            if run_dir.checkpoint.exists():
                os.replace(run_dir.checkpoint, damaged)
            os.replace(folder, run_dir.checkpoint)
            print(f"checkpoint/ could not be read ({first_error}); resuming from {folder.name}/ instead (step {step}); "
                  f"the damaged one is kept as {damaged.name}/", flush=True)
        return step, rows
    raise first_error


def _load_checkpoint(folder: Path, job: Job) -> tuple[int, int | None]:
    state = load_json(folder / "state.json")
    if state.get("base") != job.base:
        raise WrongRun(f"{folder} holds a run of {state.get('base')!r}, not of {job.base!r}; resume it with the "
                       "config it was started with")
    tensors = load_weights(folder / "trainer_state.safetensors")
    job.load(folder, state)
    try:
        if job.optimizer is not None:  # (a job that trains nothing itself, such as the loop, has none)
            load_optimizer_state(job.optimizer, {k[len("optimizer."):]: v for k, v in tensors.items()
                                                 if k.startswith("optimizer.")}, state["optimizer"], folder)
        if job.scheduler is not None:
            job.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(tensors, state.get("rng", {}))
        if state.get("scaler"):
            precision().scaler.load_state_dict(state["scaler"])
        skips().total = int(state.get("skipped_updates", 0))
        return int(state["step"]), state.get("metrics_rows")
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise RunError(f"{folder} is incomplete ({e!r} missing or malformed); resume from an intact run") from e


OPTIMIZER_KEYS = {"train.lr": "lr", "train.weight_decay": "weight_decay"}
"""settings a checkpoint's optimizer state holds, which a resume must set again when they were changed"""


def apply_changes(run_: Run, job: Job, saved: dict) -> None:
    """The settings a resume changed (the overrides of fields not `fixed_on_resume`, such as --steps or --train.lr) take
    effect from the next step: those the checkpoint's state would have undone are set again (the optimizer's lr and
    weight decay; `job.resumed` for the job's own, such as RL's kl_coef). Each is said and recorded."""
    before, after = flatten(saved), flatten(to_dict(run_.cfg))
    changed = {k: [before.get(k), v] for k, v in after.items() if k != "out" and before.get(k) != v}
    if not changed:
        return
    for key, name in OPTIMIZER_KEYS.items():
        if key in changed and job.optimizer is not None:
            _set_hyperparameter(job, name, changed[key][1])
    if hasattr(job, "resumed"):
        job.resumed(changed)
    if not run_.main:  # every process applies them; the main one writes
        return
    lines = [json.loads(x) for x in run_.dir.resumes.read_text().splitlines()] if run_.dir.resumes.is_file() else []
    atomic_write_text(run_.dir.resumes, "".join(json.dumps(x) + "\n" for x in [
        *lines, {"after_step": run_.done, "changed": changed}]))
    run_.say("settings changed on resume, applied from step " + str(run_.done + 1) + ": " +
             ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()) + f" (recorded in {run_.dir.resumes.name})")


def _set_hyperparameter(job: Job, name: str, value: float) -> None:
    """An optimizer hyperparameter as the config now says, over what the checkpoint restored (with an LR schedule,
    the schedule's base rate, and this step's rate from it)."""
    scheduler = job.scheduler
    for i, group in enumerate(job.optimizer.param_groups):
        group[name] = value
        if name == "lr" and scheduler is not None:
            group["initial_lr"] = scheduler.base_lrs[i] = value
            group["lr"] = value * scheduler.lr_lambdas[i](scheduler.last_epoch)
    if name == "lr" and scheduler is not None:
        scheduler._last_lr = [g["lr"] for g in job.optimizer.param_groups]  # what get_last_lr() reports


class ModelJob:
    """What the supervised stages (classifier, generator, reward model) share: one model, whose whole weights the
    checkpoint holds beside the attributes named in `kept` (JSON), and nothing to do at `begin` or `end`."""

    algorithm = None
    kept: tuple[str, ...] = ()

    def begin(self, run: Run) -> dict | None:
        return None

    def save(self, folder: Path) -> dict:
        save_weights(self.model.state_dict(), folder / "model.safetensors")
        return {name: getattr(self, name) for name in self.kept}

    def load(self, folder: Path, state: dict) -> None:
        self.model.load_state_dict(load_weights(folder / "model.safetensors", self.run.device))
        for name in self.kept:
            if name in state:  # (a checkpoint written before the job kept it: the job's start value stays)
                setattr(self, name, state[name])

    def end(self) -> None:
        return None

    def modules(self) -> list:
        return [self.model]
