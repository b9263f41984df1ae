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
import json
import math
import os
import sqlite3
import sys
import traceback

import torch

from minirlhf import ConfigError, MachineError, UserError, __version__, distributed, doctor
from minirlhf.rl import registry
from minirlhf.stages import classifier, reward_model
from minirlhf.stages.evaluate import evaluate_run
from minirlhf.config import DataConfig, describe, load_config, load_saved
from minirlhf.data.prompts import PromptConfig
from minirlhf.envs.base import EnvConfig, env_factory, env_prompts
from minirlhf.data.sentiment import read_source
from minirlhf.feedback import commands
from minirlhf.feedback.pairs import Sampling, add_sampling_flags
from minirlhf.models.classifier import SentimentClassifier
from minirlhf.models.episodes import need_chat, sample_episodes
from minirlhf.models.judge import judge_kind
from minirlhf.models.load import load_policy
from minirlhf.pipeline import DemoConfig, run_demo, train_missing_reward
from minirlhf.registry import STAGES
from minirlhf.rundir import RunDir, check_new
from minirlhf.runtime import configure_process, pick_device, seed_everything

RESUME_FIXED = {"out", "seed", "policy", "ref_policy", "policy_options", "reward", "data", "prompts", "batch_size",
                "group_size", "model", "vocab", "preferences", "eval_file", "eval_fraction", "max_train", "max_eval",
                "split_seed", "train.batch_size", "train.micro_batch_size", "ensemble", "bootstrap"}
"""what a resumed run may not change: it would no longer repeat the uninterrupted run"""


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
    fixed = [f"--{k}" for k in keys if k in RESUME_FIXED or k.split(".")[0] in RESUME_FIXED]
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
    _add_stage(sub, "demo", DemoConfig, "the whole pipeline on the offline default, end to end", _demo, resume=False)
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
    run_demo(cfg, overwrite)
    return 0


def _evaluate(args, extra) -> int:
    evaluate_run(args.run_dir, args.prompts, args.n, args.seed, args.device)
    return 0


def _eval_reward_model(args, extra) -> int:
    reward_model.evaluate_run(args.run_dir, args.preferences, args.device, args.batch_size)
    return 0


def _classify(args, extra) -> int:
    run = RunDir.open(args.run_dir, "classifier", command="train-classifier")
    clf = SentimentClassifier.from_run(run.path, pick_device(args.device)[0])
    probs, logits = clf.score(args.texts)
    for text, p, z in zip(args.texts, probs.tolist(), logits.tolist()):
        print(json.dumps({"text": text, "p_positive": round(p, 4), "positive_logit": round(z, 4)}, ensure_ascii=False))
    return 0


def _eval_classifier(args, extra) -> int:
    parts = read_source(args.data)
    rows = parts.get("all") or parts["test"]
    run = RunDir.open(args.run_dir, "classifier", command="train-classifier")
    clf = SentimentClassifier.from_run(run.path, pick_device(args.device)[0])
    logits = clf.logits([t for t, _ in rows], batch_size=args.batch_size, show_progress=True)
    scores = classifier.binary_scores(logits, torch.tensor([y for _, y in rows]))
    print(json.dumps({"data": args.data, "n": len(rows), "accuracy": round(scores["accuracy"], 4),
                      "f1": round(scores["f1"], 4)}))
    return 0


def _generate(args, extra) -> int:
    seed_everything(args.seed)
    device = pick_device(args.device)[0]
    policy = load_policy(args.run_dir, device, value_head=False)
    prompts = [p for p in args.prompt or [""] for _ in range(args.n)]
    gen = torch.Generator(device=device).manual_seed(args.seed)
    if args.env:
        return _generate_episodes(args, policy, device)
    rollout = policy.sample(prompts, args.max_new_tokens, gen, args.temperature, args.top_k, args.top_p)
    for prompt, text in zip(prompts, rollout.texts):
        print(policy.as_text(prompt, text))
    return 0


def _generate_episodes(args, policy, device) -> int:
    """`generate --env NAME`: n conversations (seeds seed..seed+n-1), each turn labelled, with its rewards."""
    need_chat(policy)
    env = EnvConfig(name=args.env, turns=args.turns)
    make = env_factory(env, env_prompts(env, PromptConfig(), DataConfig())[1], args.seed, device)
    seeds = list(range(args.seed, args.seed + args.n))
    gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    episodes = sample_episodes(policy, [make() for _ in seeds], seeds, args.turns, args.max_new_tokens, gens,
                               temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    for seed, messages, rewards in zip(seeds, episodes.rollout.messages, episodes.rewards.tolist()):
        print(f"--- episode {seed} (turn rewards {', '.join(f'{r:.2f}' for r in rewards)})")
        for m in messages:
            print(f"{m['role']}: {m['content']}")
    return 0


def _add_tools(sub) -> None:
    """The commands that read a run rather than train one."""
    p = sub.add_parser("evaluate", help="an RL run's policy vs its reference on held-out prompts: JSON and report.md")
    p.add_argument("run_dir")
    p.add_argument("--prompts", help="held-out prompts, a .jsonl file of {\"prompt\": ...} or hf:NAME[:split] "
                   "(default: the run's own)")
    p.add_argument("-n", type=int, help="use at most this many held-out prompts (default: the run's prompts.max_eval)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_evaluate)
    p = sub.add_parser("eval-reward-model", help="held-out pair accuracy, mean margin and the length baseline (JSON)")
    p.add_argument("run_dir")
    p.add_argument("--preferences", required=True,
                   help=".jsonl or hf:NAME[:split] of preference pairs (any layout DPO takes)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_eval_reward_model)
    p = sub.add_parser("classify", help="P(positive) and positive logit of texts under a classifier run")
    p.add_argument("run_dir")
    p.add_argument("texts", nargs="+")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_classify)
    p = sub.add_parser("eval-classifier", help="accuracy and F1 (JSON) of a classifier run on labelled data")
    p.add_argument("run_dir")
    p.add_argument("--data", required=True,
                   help="labelled .jsonl/.csv file, hf:NAME[:split], aclImdb folder or corpus name")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_eval_classifier)
    p = sub.add_parser("generate", help="sample responses from a generator run, an RL run, or a causal LM")
    p.add_argument("run_dir")
    p.add_argument("--prompt", action="append", help="prompt text (repeat for several)")
    p.add_argument("-n", type=int, default=5, help="samples per prompt")
    p.add_argument("--env", metavar="NAME", help="play conversations with an environment (constraints, judge or "
                   "module:Class) on its held-out openings instead of answering prompts; one per -n")
    p.add_argument("--turns", type=int, default=3, help="with --env: assistant turns per conversation")
    add_sampling_flags(p, Sampling(max_new_tokens=30))
    p.set_defaults(func=_generate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minirlhf", description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"minirlhf {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (or MINIRLHF_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("doctor", help="check the environment: versions, device, offline models and data")
    p.set_defaults(func=lambda args, extra: doctor.run())
    _add_stages(sub)
    _add_tools(sub)
    commands.add_feedback(sub)
    return parser


def _check_sampling(args) -> None:
    n = getattr(args, "n", 1)
    if (n is not None and n < 1) or getattr(args, "max_new_tokens", 1) < 1:
        raise ConfigError("-n and --max-new-tokens must be at least 1")
    numbers = {k: v for k, v in vars(args).items() if isinstance(v, float)}
    bad = next((k for k, v in numbers.items() if not math.isfinite(v)), None)
    if bad is not None:
        raise ConfigError(f"--{bad.replace('_', '-')} must be a finite number, got {numbers[bad]}")
    if getattr(args, "temperature", 1.0) <= 0:
        raise ConfigError(f"--temperature must be > 0, got {args.temperature}")
    if not 0 < getattr(args, "top_p", 1.0) <= 1 or getattr(args, "top_k", 0) < 0:
        raise ConfigError("--top-p must be in (0, 1] and --top-k >= 0")
    if getattr(args, "batch_size", 1) < 1:
        raise ConfigError("--batch-size must be at least 1")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "stage", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    debug = args.debug or os.environ.get("MINIRLHF_DEBUG", "") not in ("", "0")
    try:
        configure_process()
        _check_sampling(args)
        return args.func(args, extra)
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
