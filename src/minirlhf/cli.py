"""The `minirlhf` command: one sub-command per stage, plus doctor, generate, classify and the demo.

Training commands take `--config FILE.yaml`, `--data SOURCE`, `--out RUN_DIR`, `--device`, `--seed` and
any config key as a dotted override (`--train.lr=3e-5`); `--help` lists every key with its default.
"""

from __future__ import annotations

import argparse
import json
import sys

from minirlhf import UserError, __version__


def _overrides(extra: list[str]) -> list[str]:
    """`--a.b=v` and `--a.b v` both become `--a.b=v`; anything else is an error."""
    out, i = [], 0
    while i < len(extra):
        item = extra[i]
        if not item.startswith("--"):
            raise UserError(f"unexpected argument {item!r}; options look like --section.key=value")
        if "=" not in item and i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            item, i = f"{item}={extra[i + 1]}", i + 1
        elif "=" not in item:
            raise UserError(f"option {item} needs a value; write {item}=VALUE")
        out.append(item)
        i += 1
    return out


RESUME_FIXED = {"out", "seed", "policy", "policy_options", "reward", "data", "prompts", "batch_size", "group_size"}
"""what a resumed run may not change: it would no longer repeat the uninterrupted run"""


def _reward_key(run: str | None) -> str:
    """`--reward RUN` names a sentiment classifier run or a preference reward-model run; either is the reward."""
    from pathlib import Path

    return "reward.reward_model" if run and (Path(run) / "model" / "reward_model.json").is_file() else "reward.classifier"


def _stage_config(cls, args, extra):
    import dataclasses

    from minirlhf.config import load_config

    data_key = "data.source" if dataclasses.is_dataclass(getattr(cls(), "data", None)) else "data"
    cli = [f"--{key}={value}" for key, value in
           ((data_key, getattr(args, "data", None)), ("out", args.out), ("device", args.device), ("seed", args.seed),
            (_reward_key(getattr(args, "reward", None)), getattr(args, "reward", None)),
            ("preferences", getattr(args, "preferences", None)))
           if value is not None]
    if getattr(args, "resume", None) is None:
        return load_config(cls, args.config, _overrides(extra) + cli)
    return _resume_config(cls, args, _overrides(extra) + cli)


def _resume_config(cls, args, overrides: list[str]):
    """The config a run was started with, under the overrides that keep it the same run (e.g. --steps=200)."""
    from pathlib import Path

    from minirlhf.config import load_config, load_saved

    fixed = [o.split("=")[0] for o in overrides if o[2:].split("=")[0].split(".")[0] in RESUME_FIXED]
    if args.config is not None or fixed:
        raise UserError(f"--resume repeats the run as it was configured; {(fixed or ['--config'])[0]} cannot change "
                        "(others, such as --steps, can)")
    base = load_saved(cls, Path(args.resume) / "config.yaml")
    return load_config(cls, None, overrides + [f"--out={args.resume}"], base=base)


def _config_help(cls) -> str:
    from minirlhf.config import describe

    rows = describe(cls())
    width = max(len(k) for k, _, _ in rows)
    lines = [f"  --{k:<{width}}  {doc} (default: {v!r})" for k, v, doc in rows]
    return "config keys (set with --KEY=VALUE or in the --config YAML file):\n" + "\n".join(lines)


def _add_stage(sub, name: str, cls, help: str, run, rl: bool = False):
    p = sub.add_parser(name, help=help, description=help, epilog=_config_help(cls),
                       formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--config", help="YAML file of config values (overrides then apply on top)")
    if hasattr(cls(), "preferences"):
        p.add_argument("--preferences", metavar="FILE.jsonl", help="preference pairs {\"prompt\", \"chosen\", "
                       "\"rejected\"} (e.g. from `minirlhf feedback export`); sets the `preferences` key")
    if hasattr(cls(), "data"):
        p.add_argument("--data", help="corpus name (tweets, imdb), aclImdb folder, or .jsonl/.csv file")
    p.add_argument("--out", help="run directory (default: a new folder under runs/)")
    p.add_argument("--device", help="auto, cpu, cuda or mps")
    p.add_argument("--seed", type=int)
    if rl:
        p.add_argument("--reward", metavar="RUN", help="the reward: a classifier run (sets reward.classifier) or a "
                       "reward-model run (sets reward.reward_model)")
        p.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its last checkpoint "
                       "(its own config; --steps=N to train longer)")
        p.set_defaults(func=lambda args, extra: run(_stage_config(cls, args, extra), args.resume), stage=True)
        return
    p.set_defaults(func=lambda args, extra: run(_stage_config(cls, args, extra)), stage=True)


def _train_classifier(cfg) -> int:
    from minirlhf.algorithms.classifier import train

    run_dir = train(cfg)
    print(f"run directory: {run_dir}  (plots: loss.png, accuracy.png; model: model/)")
    return 0


def _train_generator(cfg) -> int:
    from minirlhf.algorithms.generator import train

    run_dir = train(cfg)
    print(f"run directory: {run_dir}  (plots: loss.png, perplexity.png; samples: samples.md)")
    return 0


def _train_reward_model(cfg) -> int:
    from minirlhf.algorithms.reward_model import train

    run_dir = train(cfg)
    print(f"run directory: {run_dir}  (results.json, plots; model/: `minirlhf eval-reward-model {run_dir} --preferences "
          f"FILE`, or the RLHF reward term --reward.reward_model={run_dir})")
    return 0


def _eval_reward_model(args, extra) -> int:
    from minirlhf.algorithms.reward_model import evaluate_run

    evaluate_run(args.run_dir, args.preferences, args.device, args.batch_size)
    return 0


def _rl(cfg, resume: str | None = None) -> int:
    from minirlhf.algorithms.rl import train

    run_dir = train(cfg, resume)
    if run_dir is not None:  # None on the other processes under torchrun
        print(f"run directory: {run_dir}  (report.md, results.json, samples.md, plots; checkpoint/: "
              f"`minirlhf generate {run_dir}`, `minirlhf evaluate {run_dir}`, `--resume {run_dir}`)")
    return 0


def _dpo(cfg) -> int:
    from minirlhf.algorithms.dpo import train

    run_dir = train(cfg)
    if run_dir is not None:  # None on the other processes under torchrun
        print(f"run directory: {run_dir}  (report.md, results.json, plots; checkpoint/policy: "
              f"`minirlhf generate {run_dir}`, or --policy {run_dir} for a later stage)")
    return 0


def _demo(cfg) -> int:
    from minirlhf.pipeline import run_demo

    run_demo(cfg)
    return 0


def _classify(args, extra) -> int:
    from minirlhf.models.classifier import SentimentClassifier
    from minirlhf.runtime import pick_device

    clf = SentimentClassifier.from_run(args.run_dir, pick_device(args.device)[0])
    probs, logits = clf.score(args.texts)
    for text, p, z in zip(args.texts, probs.tolist(), logits.tolist()):
        print(json.dumps({"text": text, "p_positive": round(p, 4), "positive_logit": round(z, 4)}, ensure_ascii=False))
    return 0


def _eval_classifier(args, extra) -> int:
    import torch

    from minirlhf.algorithms.classifier import binary_scores
    from minirlhf.data.sentiment import read_source
    from minirlhf.models.classifier import SentimentClassifier
    from minirlhf.runtime import pick_device

    parts = read_source(args.data)
    rows = parts.get("all") or parts["test"]
    clf = SentimentClassifier.from_run(args.run_dir, pick_device(args.device)[0])
    logits = clf.logits([t for t, _ in rows], batch_size=args.batch_size, show_progress=True)
    scores = binary_scores(logits, torch.tensor([y for _, y in rows]))
    print(json.dumps({"data": args.data, "n": len(rows), "accuracy": round(scores["accuracy"], 4),
                      "f1": round(scores["f1"], 4)}))
    return 0


def _generate(args, extra) -> int:
    import torch

    from minirlhf.models.policy import load_policy
    from minirlhf.runtime import pick_device, seed_everything

    seed_everything(args.seed)
    device = pick_device(args.device)[0]
    policy = load_policy(args.run_dir, device, value_head=False)
    prompts = [p for p in args.prompt or [""] for _ in range(args.n)]
    gen = torch.Generator(device=device).manual_seed(args.seed)
    rollout = policy.sample(prompts, args.max_new_tokens, gen, args.temperature, args.top_k, args.top_p)
    for prompt, text in zip(prompts, rollout.texts):
        print(policy.as_text(prompt, text))
    return 0


def _evaluate(args, extra) -> int:
    from minirlhf.evaluate import evaluate_run

    evaluate_run(args.run_dir, args.prompts, args.n, args.seed, args.device)
    return 0


def _feedback(args, extra) -> int:
    from minirlhf.feedback import store

    if args.feedback_command == "serve":
        from minirlhf.feedback.app import serve

        return serve(args)
    if args.feedback_command == "export":
        n = store.export_jsonl(args.db, args.out)
        print(f"{n} preference pairs (ties and skips left out) -> {args.out}")
        return 0
    added, skipped = store.import_jsonl(args.files, args.db)
    print(f"{added} pairs imported into {args.db}" + (f" ({skipped} already there)" if skipped else ""))
    return 0


def _add_feedback(sub) -> None:
    p = sub.add_parser("feedback", help="a web page where people judge pairs of responses; export/import them")
    fsub = p.add_subparsers(dest="feedback_command", required=True, metavar="COMMAND")
    db = {"default": "runs/feedback/feedback.sqlite", "help": "the SQLite store (default: %(default)s)"}
    s = fsub.add_parser("serve", help="serve pairs to judge (default: the newest RL run under runs/ against its "
                        "reference, else two samples of smollm2); prints the admin link")
    s.add_argument("--policy", metavar="RUN_DIR|MODEL", help="an RL run (against its reference), or a generator "
                   "run / model folder / model name (two samples of it)")
    s.add_argument("--prompts", metavar="FILE.jsonl", help="prompts to answer (default: the run's own, or the corpus's)")
    s.add_argument("--db", **db)
    s.add_argument("--host", default="127.0.0.1", help="0.0.0.0 shares it on your network (tokens still needed)")
    s.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed)")
    s.add_argument("--ahead", type=int, default=16, help="unjudged pairs kept ready")
    s.add_argument("--overlap", type=float, default=0.2, help="fraction of pairs wanted from two annotators")
    s.add_argument("--max-new-tokens", type=int, default=48)
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto")
    e = fsub.add_parser("export", help="write the A/B judgements as {prompt, chosen, rejected} JSONL")
    e.add_argument("--db", **db)
    e.add_argument("--out", required=True, metavar="FILE.jsonl")
    i = fsub.add_parser("import", help="load {prompt, chosen, rejected} JSONL files as judged pairs")
    i.add_argument("files", nargs="+", metavar="FILE.jsonl")
    i.add_argument("--db", **db)
    p.set_defaults(func=_feedback)


def _doctor(args, extra) -> int:
    from minirlhf.doctor import run

    return run()


def build_parser() -> argparse.ArgumentParser:
    from minirlhf.algorithms.classifier import ClassifierConfig
    from minirlhf.algorithms.dpo import DPOConfig
    from minirlhf.algorithms.generator import GeneratorConfig
    from minirlhf.algorithms.grpo import GRPOConfig
    from minirlhf.algorithms.ppo import A2CConfig, PPOConfig
    from minirlhf.algorithms.reward_model import RewardModelConfig
    from minirlhf.algorithms.rloo import RLOOConfig
    from minirlhf.pipeline import DemoConfig

    parser = argparse.ArgumentParser(prog="minirlhf", description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"minirlhf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("doctor", help="check the environment: versions, device, offline models and data")
    p.set_defaults(func=_doctor)
    _add_stage(sub, "demo", DemoConfig, "the whole pipeline on the offline default, end to end", _demo)
    _add_stage(sub, "train-classifier", ClassifierConfig, "stage 1: fine-tune an encoder as sentiment classifier", _train_classifier)
    _add_stage(sub, "train-generator", GeneratorConfig, "stage 3: train the word-level LSTM language model", _train_generator)
    _add_stage(sub, "train-reward-model", RewardModelConfig, "a Bradley-Terry reward model from preference pairs "
               "(--preferences FILE.jsonl)", _train_reward_model)
    for name, cls, what in (("ppo", PPOConfig, "PPO with a value head, GAE and adaptive KL"),
                            ("grpo", GRPOConfig, "GRPO: group-standardised rewards, no critic"),
                            ("rloo", RLOOConfig, "RLOO: leave-one-out baselines, no critic"),
                            ("a2c", A2CConfig, "A2C: one unclipped policy-gradient step per rollout")):
        _add_stage(sub, name, cls, f"RLHF with {what} (--policy GENERATOR_RUN|smollm2|MODEL --reward CLASSIFIER_RUN)",
                   _rl, rl=True)
    _add_stage(sub, "dpo", DPOConfig, "DPO/IPO from preference pairs, no reward model (--policy GENERATOR_RUN|smollm2|MODEL "
               "--preferences FILE.jsonl)", _dpo)

    p = sub.add_parser("evaluate", help="an RL run's policy vs its reference on held-out prompts: JSON and report.md")
    p.add_argument("run_dir")
    p.add_argument("--prompts", help="held-out prompts, a .jsonl file of {\"prompt\": ...} (default: the run's own)")
    p.add_argument("-n", type=int, help="use at most this many held-out prompts (default: the run's prompts.max_eval)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("eval-reward-model", help="held-out pair accuracy, mean margin and the length baseline (JSON)")
    p.add_argument("run_dir")
    p.add_argument("--preferences", required=True, help=".jsonl of {\"prompt\", \"chosen\", \"rejected\"}")
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
    p.add_argument("--data", required=True, help="labelled .jsonl/.csv file, aclImdb folder or corpus name")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_eval_classifier)

    p = sub.add_parser("generate", help="sample responses from a generator run, an RL run, or a causal LM")
    p.add_argument("run_dir")
    p.add_argument("--prompt", action="append", help="prompt text (repeat for several)")
    p.add_argument("-n", type=int, default=5, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=30)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_generate)
    _add_feedback(sub)
    return parser


def _check_sampling(args) -> None:
    n = getattr(args, "n", 1)
    if (n is not None and n < 1) or getattr(args, "max_new_tokens", 1) < 1:
        raise UserError("-n and --max-new-tokens must be at least 1")
    if getattr(args, "temperature", 1.0) <= 0:
        raise UserError(f"--temperature must be > 0, got {args.temperature}")
    if not 0 < getattr(args, "top_p", 1.0) <= 1 or getattr(args, "top_k", 0) < 0:
        raise UserError("--top-p must be in (0, 1] and --top-k >= 0")
    if getattr(args, "batch_size", 1) < 1:
        raise UserError("--batch-size must be at least 1")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "stage", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        _check_sampling(args)
        return args.func(args, extra)
    except UserError as e:
        print(f"minirlhf: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("minirlhf: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
