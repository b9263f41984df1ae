"""The commands that read a run rather than train one: evaluate, eval-reward-model, classify, eval-classifier and
generate. Each is a config dataclass (its fields are the flags; their docstrings the `--help`) and a function of it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from minirlhf.config import DataConfig, DeviceConfig, setting
from minirlhf.flags import add_flags
from minirlhf.data.prompts import PromptConfig
from minirlhf.data.sentiment import read_source
from minirlhf.envs.base import EnvConfig, env_factory, env_prompts
from minirlhf.models.classifier import SentimentClassifier
from minirlhf.models.episodes import need_chat, sample_episodes
from minirlhf.models.load import load_policy
from minirlhf.models.policy import SamplingConfig, sample_with
from minirlhf.rundir import RunDir
from minirlhf.runtime import pick_device, seed_everything
from minirlhf.stages import classifier, reward_model
from minirlhf.stages.evaluate import evaluate_run


@dataclass
class EvaluateConfig(DeviceConfig):
    run_dir: str = setting("", positional=True)
    """the RL (or DPO, SFT) run whose policy is compared with its reference"""
    prompts: str | None = setting(None, metavar="FILE.jsonl|hf:NAME")
    """held-out prompts, a .jsonl file of {"prompt": ...} or hf:NAME[:split] (default: the run's own)"""
    n: int | None = setting(None, ge=1, flag="-n")
    """use at most this many held-out prompts (default: the run's prompts.max_eval)"""
    seed: int = 0
    """seed of the sampling"""


def evaluate(cfg: EvaluateConfig) -> int:
    evaluate_run(cfg.run_dir, cfg.prompts, cfg.n, cfg.seed, cfg.device)
    return 0


@dataclass
class EvalRewardModelConfig(DeviceConfig):
    run_dir: str = setting("", positional=True)
    """the reward-model run"""
    preferences: str = setting("", required=True, metavar="FILE.jsonl|hf:NAME")
    """.jsonl or hf:NAME[:split] of preference pairs (any layout DPO takes)"""
    batch_size: int = setting(32, ge=1)
    """pairs scored at once"""


def eval_reward_model(cfg: EvalRewardModelConfig) -> int:
    reward_model.evaluate_run(cfg.run_dir, cfg.preferences, cfg.device, cfg.batch_size)
    return 0


@dataclass
class ClassifyConfig(DeviceConfig):
    run_dir: str = setting("", positional=True)
    """the classifier run"""
    texts: list[str] = setting(default_factory=list, positional=True, nargs="+")
    """the texts to score"""


def classify(cfg: ClassifyConfig) -> int:
    run = RunDir.open(cfg.run_dir, "classifier", command="train-classifier")
    clf = SentimentClassifier.from_run(run.path, pick_device(cfg.device)[0])
    probs, logits = clf.score(cfg.texts)
    for text, p, z in zip(cfg.texts, probs.tolist(), logits.tolist()):
        print(json.dumps({"text": text, "p_positive": round(p, 4), "positive_logit": round(z, 4)}, ensure_ascii=False))
    return 0


@dataclass
class EvalClassifierConfig(DeviceConfig):
    run_dir: str = setting("", positional=True)
    """the classifier run"""
    data: str = setting("", required=True)
    """labelled .jsonl/.csv file, hf:NAME[:split], aclImdb folder or corpus name"""
    batch_size: int = setting(64, ge=1)
    """texts scored at once"""


def eval_classifier(cfg: EvalClassifierConfig) -> int:
    parts = read_source(cfg.data)
    rows = parts.get("all") or parts["test"]
    run = RunDir.open(cfg.run_dir, "classifier", command="train-classifier")
    clf = SentimentClassifier.from_run(run.path, pick_device(cfg.device)[0])
    logits = clf.logits([t for t, _ in rows], batch_size=cfg.batch_size, show_progress=True)
    scores = classifier.binary_scores(logits, torch.tensor([y for _, y in rows]))
    print(json.dumps({"data": cfg.data, "n": len(rows), "accuracy": round(scores["accuracy"], 4),
                      "f1": round(scores["f1"], 4)}))
    return 0


@dataclass
class GenerateConfig(SamplingConfig, DeviceConfig):
    run_dir: str = setting("", positional=True)
    """a generator run, an RL/DPO/SFT run, a causal LM folder or hub name, or smollm2"""
    prompt: list[str] = field(default_factory=list)
    """prompt text (repeat the flag for several; default: one empty prompt)"""
    n: int = setting(5, ge=1, flag="-n")
    """samples per prompt (with --env: conversations)"""
    max_new_tokens: int = 30
    """tokens (an LSTM: words) per sample at most; with --env: per turn"""
    env: str | None = setting(None, metavar="NAME")
    """play conversations with an environment (constraints, judge or module:Class) on its held-out openings instead
    of answering prompts; one per -n"""
    turns: int = setting(3, ge=1)
    """with --env: assistant turns per conversation"""
    seed: int = 0
    """seed of the sampling (with --env: of the first conversation)"""


def generate(cfg: GenerateConfig) -> int:
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)[0]
    policy = load_policy(cfg.run_dir, device, value_head=False)
    if cfg.env:
        return _generate_episodes(cfg, policy, device)
    prompts = [p for p in cfg.prompt or [""] for _ in range(cfg.n)]
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    rollout = sample_with(policy, prompts, cfg, gen)
    for prompt, text in zip(prompts, rollout.texts):
        print(policy.as_text(prompt, text))
    return 0


def _generate_episodes(cfg: GenerateConfig, policy, device) -> int:
    """`generate --env NAME`: n conversations (seeds seed..seed+n-1), each turn labelled, with its rewards."""
    need_chat(policy)
    env = EnvConfig(name=cfg.env, turns=cfg.turns)
    make = env_factory(env, env_prompts(env, PromptConfig(), DataConfig())[1], cfg.seed, device)
    seeds = list(range(cfg.seed, cfg.seed + cfg.n))
    gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    episodes = sample_episodes(policy, [make() for _ in seeds], seeds, cfg.turns, cfg.max_new_tokens, gens,
                               temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    for seed, messages, rewards in zip(seeds, episodes.rollout.messages, episodes.rewards.tolist()):
        print(f"--- episode {seed} (turn rewards {', '.join(f'{r:.2f}' for r in rewards)})")
        for m in messages:
            print(f"{m['role']}: {m['content']}")
    return 0


TOOLS = {
    "evaluate": (EvaluateConfig, evaluate, "an RL run's policy vs its reference on held-out prompts: JSON and "
                 "report.md"),
    "eval-reward-model": (EvalRewardModelConfig, eval_reward_model, "held-out pair accuracy, mean margin and the "
                          "length baseline (JSON)"),
    "classify": (ClassifyConfig, classify, "P(positive) and positive logit of texts under a classifier run"),
    "eval-classifier": (EvalClassifierConfig, eval_classifier, "accuracy and F1 (JSON) of a classifier run on "
                        "labelled data"),
    "generate": (GenerateConfig, generate, "sample responses from a generator run, an RL run, or a causal LM"),
}
"""command -> (its config, the function that runs it, its one-line help)"""


def add_tools(sub) -> None:
    """A sub-command per tool; `tool` on the parsed arguments names its config (cli.main builds it)."""
    for name, (config, run, help) in TOOLS.items():
        p = sub.add_parser(name, help=help, description=help, allow_abbrev=False)
        add_flags(p, config)
        p.set_defaults(tool=config, func=run)
