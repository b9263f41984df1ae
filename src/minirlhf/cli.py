"""The `minirlhf` command: a sub-command per stage and per RL algorithm, and the tools that read runs.

The RL algorithms come from the registry; the tools are doctor, generate, classify, evaluate, feedback and the demo.

Training commands take `--config FILE.yaml`, `--data SOURCE`, `--out RUN_DIR`, `--device`, `--seed`, `--resume RUN_DIR`
and any config key as a dotted override (`--train.lr=3e-5`); `--help` lists every key with its default. Errors the
user can fix print as one line and exit 2; `--debug` (or MINIRLHF_DEBUG=1) shows the traceback too.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import sqlite3
import sys
import traceback

from minirlhf import ConfigError, MachineError, UserError, __version__, distributed, doctor
from minirlhf.config import fixed_on_resume, load_config, load_saved
from minirlhf.feedback import commands
from minirlhf.flags import describe, from_args
from minirlhf.models.judge import judge_kind
from minirlhf.pipeline import DemoConfig, run_demo, train_missing_reward
from minirlhf.registry import STAGES
from minirlhf.rl import registry
from minirlhf.rundir import RunDir, check_new
from minirlhf.runtime import configure_process
from minirlhf.tools import add_tools


def _overrides(extra: list[str]) -> list[str]:
    """`--a.b=v` and `--a.b v` both become `--a.b=v`, and `--a.b` alone (a switch) `--a.b=true`; anything else is
    an error."""
    out, i = [], 0
    while i < len(extra):
        item = extra[i]
        if not item.startswith("--"):
            raise ConfigError(f"unexpected argument {item!r}; options look like --section.key=value")
        if "=" not in item and i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            item, i = f"{item}={extra[i + 1]}", i + 1
        elif "=" not in item:
            item = f"{item}=true"  # a field that is not a boolean says so when the config is checked
        out.append(item)
        i += 1
    return out


def _reward_key(run: str | None) -> str:
    """`--reward RUN` names a sentiment classifier run or a preference reward-model run; either is the reward."""
    return "reward.reward_model" if judge_kind(run) == "reward_model" else "reward.classifier"


def _stage_config(cls, args, extra):
    data_key = "data.source" if dataclasses.is_dataclass(getattr(cls(), "data", None)) else "data"
    cli = [f"--{key}={value}" for key, value in
           ((data_key, getattr(args, "data", None)), ("out", args.out), ("device", args.device), ("seed", args.seed),
            (_reward_key(getattr(args, "reward", None)), getattr(args, "reward", None)),
            ("env.name", getattr(args, "env", None)),
            ("preferences", getattr(args, "preferences", None)))
           if value is not None]
    if getattr(args, "resume", None) is None:
        return load_config(cls, args.config, _overrides(extra) + cli)
    return _resume_config(cls, args, _overrides(extra) + cli)


def _resume_config(cls, args, overrides: list[str]):
    """The config a run was started with, under the overrides that keep it the same run (e.g. --steps=200)."""
    keys = [o[2:].split("=")[0] for o in overrides]
    fixed = [f"--{k}" for k in keys if fixed_on_resume(cls, k)]
    if args.config is not None or fixed:
        raise ConfigError(f"--resume repeats the run as it was configured; {(fixed or ['--config'])[0]} cannot "
                          "change (others, such as --steps, can)")
    base = load_saved(cls, RunDir(args.resume).config)
    return load_config(cls, None, overrides + [f"--out={args.resume}"], base=base)


def _config_help(cls) -> str:
    rows = describe(cls())
    width = max(len(k) for k, _, _ in rows)
    lines = [f"  --{k:<{width}}  {doc} (default: {v!r})" for k, v, doc in rows]
    return "config keys (set with --KEY=VALUE or in the --config YAML file):\n" + "\n".join(lines)


def _add_stage(sub, name: str, cls, help: str, run, resume: bool = True) -> None:
    p = sub.add_parser(name, help=help, description=help, epilog=_config_help(cls),
                       formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--config", help="YAML file of config values (overrides then apply on top)")
    if hasattr(cls(), "preferences"):
        p.add_argument("--preferences", metavar="FILE.jsonl|hf:NAME", help="preference pairs {\"prompt\", \"chosen\", "
                       "\"rejected\"} (e.g. from `minirlhf feedback export`); sets the `preferences` key")
    if hasattr(cls(), "data"):
        p.add_argument("--data", help="corpus name (tweets, imdb), hf:NAME[:split], aclImdb folder, or "
                       ".jsonl/.csv file")
    if hasattr(cls(), "reward"):
        p.add_argument("--reward", metavar="RUN", help="the reward: a classifier run (sets reward.classifier) or a "
                       "reward-model run (sets reward.reward_model)")
    if hasattr(cls(), "env"):
        p.add_argument("--env", metavar="NAME", help="multi-turn episodes: constraints, judge or module:Class (sets "
                       "env.name; --env.turns=T, --env.turn_credit=turn|episode)")
    p.add_argument("--out", help="run directory (default: a new folder under runs/)")
    p.add_argument("--device", help="auto, cpu, cuda or mps")
    p.add_argument("--seed", type=int)
    p.add_argument("--overwrite", action="store_true", help="--out holds a run: move it aside (to OUT.replaced-TIME, "
                   "nothing deleted) and start anew there; without it, a run is never written over")
    if resume:
        p.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its last checkpoint (its own "
                       "config; --steps=N or more epochs to train longer)")
    p.set_defaults(func=lambda args, extra: run(_stage_config(cls, args, extra), getattr(args, "resume", None),
                                                args.overwrite), stage=True)


def _train(train, what: str, cfg, resume, overwrite: bool) -> int:
    """A stage's command: train, then say where the run is and what to do with it (not on the other processes)."""
    if resume is None:
        check_new(cfg.out, overwrite)  # a run in the way stops the command before a missing reward is trained
    if hasattr(cfg, "reward"):
        train_missing_reward(cfg)
    run_dir = train(cfg, resume, overwrite)
    if run_dir is not None:
        print(f"run directory: {run_dir}  ({what.format(run=run_dir)})")
    return 0


def _add_stages(sub) -> None:
    """A command per stage of the registry that has one, and one per RL algorithm."""
    _add_stage(sub, "demo", DemoConfig, "the whole pipeline on the offline default, end to end", _demo)
    for stage in STAGES.values():
        if stage.command:
            _add_stage(sub, stage.command, stage.load_config(), stage.help,
                       lambda cfg, *run, s=stage: _train(s.load_train(), s.done, cfg, *run))
    rl = STAGES["rl"]
    for algo in registry.ALGORITHMS.values():
        _add_stage(sub, algo.name.replace("_", "-"), algo.config, f"RLHF with {algo.summary} (--policy "
                   "GENERATOR_RUN|smollm2|MODEL --reward CLASSIFIER_RUN)",
                   lambda cfg, *run: _train(rl.load_train(), rl.done, cfg, *run))


def _demo(cfg, resume, overwrite: bool) -> int:
    if resume is not None and overwrite:
        raise ConfigError("--overwrite starts a run anew and --resume continues one; give one of them")
    run_demo(cfg, overwrite, resume)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minirlhf", description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"minirlhf {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (or MINIRLHF_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("doctor", help="check the environment: versions, device, offline models and data")
    p.set_defaults(func=lambda args, extra: doctor.run())
    _add_stages(sub)
    add_tools(sub)
    commands.add_feedback(sub)
    return parser


def tool_config(args):
    """A tool's config from its flags (checked: a bad value is one line, exit 2); None for a stage's command."""
    return from_args(args.tool, args) if getattr(args, "tool", None) else None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "stage", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    debug = args.debug or os.environ.get("MINIRLHF_DEBUG", "") not in ("", "0")
    try:
        configure_process()
        cfg = tool_config(args)
        return args.func(args, extra) if cfg is None else args.func(cfg)
    except UserError as e:
        return _error(str(e), 2, debug)
    except MachineError as e:
        return _error(str(e), 1, debug)
    except KeyboardInterrupt:
        print("minirlhf: interrupted", file=sys.stderr)
        return 130
    except (OSError, sqlite3.Error, RuntimeError) as e:
        line = environment_error(e)
        if line is None:
            raise  # a bug: its traceback
        return _error(line, 1, debug)
    finally:
        distributed.close()  # a run stopped by an error leaves no process group behind


def _error(line: str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    sys.stderr.write(f"minirlhf: error: {line}\n")  # one write: the processes of a torchrun share the stream
    sys.stderr.flush()
    return code


def environment_error(e: BaseException) -> str | None:
    """One line for what the machine did rather than the user or minirlhf: a full disk or any other failed file
    operation, a database error, a collective that another process never joined. Written files stay whole
    (every write is atomic), so the line says how to go on. None for anything else (a bug)."""
    if isinstance(e, OSError):
        where = f" ({e.filename})" if e.filename else ""
        hint = ("free some space" if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "check the path and "
                "its permissions")
        return (f"{e.strerror or e}{where}; {hint}, then run again (a training run: --resume it; what was saved "
                "before is intact)")
    if isinstance(e, sqlite3.Error):
        return f"the feedback database failed ({e}); nothing half-written was kept; check the disk, then run again"
    if distributed.timed_out(e):
        return ("another process of this torchrun stopped or did not answer within --dist_timeout_s (see its own "
                f"output): {str(e).splitlines()[0][:200]}")
    return None


if __name__ == "__main__":
    sys.exit(main())
