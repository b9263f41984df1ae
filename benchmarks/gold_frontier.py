"""The DPO paper's IMDb experiment on 2 CPU cores: which methods turn N human-like labels into the most gold reward
for the least KL, with the labels given on minirlhf's own feedback page.

- prompts: the first 6 words of IMDB reviews (../shared/data/imdb: train for training, test for evaluation);
- gold judge: a MiniLM sentiment classifier trained on IMDB train (trained once, cached under runs/bench-cache/);
  its positive logit of the prompt and response is the gold reward;
- policy: SmolLM2-135M-Instruct (4-bit-rounded weights) after `sft` on IMDB train reviews (cached), continuing
  each opening as plain text;
- labels: pairs of two SFT samples per prompt, served by a running feedback page (in this process, real HTTP) and
  judged there by simulated annotators with beta set so they agree with the gold judge on ~75% of pairs;
- active choice (benchmarks/gold_labels.py): the same candidates labelled in quarters by a random arm and by an
  active arm whose quarters after the first are served most-uncertain-first under the reward model(s) of the
  labels so far, each arm with several seeds; the labels the active arm's mean curve needs to reach the accuracy
  of the random arm's mean at N (accuracy: agreement with the gold judge on held-out pairs), over N;
- methods: PPO against the gold judge (the oracle) and against the Bradley–Terry reward model of the N labels, at
  three KL weights each; GRPO against the reward model; DPO at three betas and IPO, on the N pairs; best-of-n
  (4, 16) under the reward model. Each is scored on held-out openings: mean gold reward, and KL(pi || pi_SFT)
  per response in nats (k1 on the policy's own samples; best-of-n: log n - (n - 1) / n).

Prints one JSON object (`frontier` rows, `learned_vs_oracle_gain`, `dpo_minus_best_of_4`, `active_label_ratio`,
`wall_seconds`, the settings) and writes gold_frontier.png. Bars: learned_vs_oracle_gain >= 0.7,
dpo_minus_best_of_4 > 0, active_label_ratio <= 0.75, wall_seconds <= 5400.
Run from the repository root: `.venv/bin/python benchmarks/gold_frontier.py [--labels 400] [--quick]`.
"""

import argparse
import contextlib
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import torch

from common import ROOT
from gold_labels import collect_labels

from minirlhf.algorithms import classifier, dpo, registry, rl, sft
from minirlhf.config import load_config
from minirlhf.data.dialogue import dialogue_text
from minirlhf.feedback.simulate import reward_of
from minirlhf.models.judge import load_judge
from minirlhf.models.load import load_policy, load_reference
from minirlhf.models.reward_model import RewardModel
from minirlhf.rundir import RunDir
from minirlhf.runtime import configure_process

SHARED = ROOT.parent / "shared" / "data" / "imdb"
CACHE = ROOT / "runs" / "bench-cache"
LM = ["--policy_options.chat_template=false", "--policy_options.freeze_layers=24"]  # top 6 of 30 blocks train


def say(*what) -> None:
    print(*what, file=sys.stderr, flush=True)


def reviews(name: str, n: int, skip: int = 0) -> list[dict]:
    rows = [json.loads(line) for line in (SHARED / name).read_text().split("\n") if line.strip()]
    random.Random(f"gold-frontier-{name}").shuffle(rows)
    return rows[skip: skip + n]


def clean(text: str) -> str:
    return " ".join(re.sub(r"<br\s*/?>", " ", text).split())


def opening(text: str, words: int = 6) -> str:
    return " ".join(clean(text).split()[:words])


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def cached(name: str, make) -> Path:
    path = CACHE / name
    found = RunDir.find(path)
    if found is None or not found.results.is_file():
        say(f"training {name} (once; cached in {path})")
        CACHE.mkdir(parents=True, exist_ok=True)
        make(path)
    return path


def gold_judge(n_train: int) -> Path:
    def make(path: Path) -> None:
        data = write_jsonl(CACHE / "imdb-gold-train.jsonl", [{"text": clean(r["text"]), "label": r["label"]}
                                                             for r in reviews("train.jsonl", n_train)])
        classifier.train(load_config(classifier.ClassifierConfig, overrides=[
            f"--data.source={data}", "--data.max_eval=500", "--train.epochs=1", "--model.max_length=128",
            f"--out={path}", "--device=cpu"]))
    return cached(f"gold-imdb-{n_train}", make)


def sft_policy(examples: int) -> Path:
    """SmolLM2 fine-tuned for one pass over `examples` IMDB train reviews: opening -> the next 34 words."""
    def make(path: Path) -> None:
        rows = [{"prompt": opening(r["text"]), "response": " " + " ".join(clean(r["text"]).split()[6:40])}
                for r in reviews("train.jsonl", examples + 64, skip=6000)]
        data = write_jsonl(CACHE / "imdb-sft.jsonl", rows)
        sft.train(load_config(sft.SFTConfig, overrides=[
            f"--data={data}", *LM, "--train.batch_size=8", "--max_response_tokens=48", f"--max_train={examples}",
            "--eval_every=0", "--max_eval=64", "--samples=0", f"--out={path}", "--device=cpu"]))
    return cached(f"sft-imdb-smollm2-{examples}", make)


# ---------------------------------------------------------------------------- methods and their scores
@torch.no_grad()
def score(policy, ref, gold, prompts: list[str], args) -> tuple[float, float, float]:
    """Mean gold reward, its standard error, and mean KL(pi || ref) per response (k1 summed over the response's
    tokens), over `args.eval_samples` samples per held-out opening."""
    gen = torch.Generator().manual_seed(args.seed + 7)
    rewards, kls = [], []
    rows = [p for p in prompts for _ in range(args.eval_samples)]
    for i in range(0, len(rows), 16):
        rollout = policy.sample(rows[i: i + 16], args.response_len, gen)
        rewards.append(gold(policy, rollout)[0])
        ref_logprobs = ref(rollout, entropy=False)[0]
        kls.append(((rollout.logprobs - ref_logprobs) * rollout.response_mask).sum(1).cpu())
    rewards = torch.cat(rewards)
    return rewards.mean().item(), (rewards.std() / len(rewards) ** 0.5).item(), torch.cat(kls).mean().item()


def rl_run(work: Path, name: str, algorithm: str, reward: list[str], strength: float, files: dict, args) -> Path:
    recipe = {"ppo": ["--ppo_epochs=2", "--minibatch_size=8", "--adaptive_kl=false"],
              "grpo": ["--group_size=4", "--ppo_epochs=1", "--minibatch_size=16"]}[algorithm]
    cfg = load_config(registry.get(algorithm).config, overrides=[
        f"--policy={files['sft']}", *LM, *reward, f"--prompts.file={files['train_prompts']}",
        f"--prompts.eval_file={files['eval_prompts']}", "--prompts.max_eval=8", f"--steps={args.steps}",
        "--batch_size=16", f"--response_len={args.response_len}", "--train.lr=3e-5", f"--kl_coef={strength}",
        "--sample_every=1000", f"--out={work / name}", "--device=cpu", *recipe])
    return rl.train(cfg)


def dpo_run(work: Path, name: str, loss: str, beta: float, files: dict, args) -> Path:
    cfg = load_config(dpo.DPOConfig, overrides=[
        f"--policy={files['sft']}", *LM, f"--preferences={files['labels']}", f"--beta={beta}", f"--loss_type={loss}",
        "--train.epochs=2", "--train.batch_size=16", "--train.micro_batch_size=8", f"--train.lr={args.dpo_lr}",
        f"--max_response_tokens={args.response_len + 1}", "--eval_every=0", "--samples=0", f"--out={work / name}",
        "--device=cpu"])
    return dpo.train(cfg)


def best_of_n(sft_run: Path, rm: Path, gold_judge, prompts: list[str], n: int, args) -> tuple[float, float, float]:
    """Gold reward of the reward model's favourite of n SFT samples; its KL from the SFT policy is analytic."""
    policy = load_policy(str(sft_run), "cpu", value_head=False, chat_template=False)
    scorer, gen, gold = RewardModel.from_run(rm), torch.Generator().manual_seed(args.seed + 11), []
    for _ in range(args.eval_samples):
        for i in range(0, len(prompts), max(1, 32 // n)):
            chunk = prompts[i: i + max(1, 32 // n)]
            rows = [p for p in chunk for _ in range(n)]
            texts = policy.sample(rows, args.response_len, gen).texts
            r = scorer.normalized([dialogue_text(p, t) for p, t in zip(rows, texts)]).view(len(chunk), n)
            picked = [texts[j * n + k] for j, k in enumerate(r.argmax(1).tolist())]
            gold += gold_judge(chunk, picked).tolist()
    gold = torch.tensor(gold)
    return gold.mean().item(), (gold.std() / len(gold) ** 0.5).item(), math.log(n) - (n - 1) / n


def interpolate(points: list[tuple[float, float]], kl: float) -> float | None:
    """Gold reward of a frontier (KL, reward points) at `kl`, linear between points; None outside their range."""
    points = sorted(points)
    for (k0, r0), (k1, r1) in zip(points, points[1:]):
        if k0 <= kl <= k1:
            return r0 + (r1 - r0) * (kl - k0) / (k1 - k0) if k1 > k0 else max(r0, r1)
    return None


def learned_vs_oracle(frontier: list[dict], sft_gold: float) -> float | None:
    """Mean over the learned-RM PPO points inside the oracle's KL range of (gain over SFT) / (oracle's gain at
    the same KL); the SFT policy itself is the oracle frontier's point at KL 0."""
    oracle = [(0.0, sft_gold)] + [(r["kl"], r["gold_reward"]) for r in frontier if r["method"] == "ppo_oracle"]
    ratios = []
    for r in (r for r in frontier if r["method"] == "ppo_learned_rm"):
        at = interpolate(oracle, max(r["kl"], 0.0))
        if at is not None and at - sft_gold > 1e-6:
            ratios.append((r["gold_reward"] - sft_gold) / (at - sft_gold))
    return sum(ratios) / len(ratios) if ratios else None


def plot(frontier: list[dict], sft_gold: float, labels: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, acc) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    for method in dict.fromkeys(r["method"] for r in frontier):
        pts = sorted((r["kl"], r["gold_reward"]) for r in frontier if r["method"] == method)
        ax.plot(*zip(*pts), marker="o", label=method)
    ax.axhline(sft_gold, color="grey", linestyle=":", label="SFT policy")
    ax.set_xlabel("KL(policy || SFT) per response, nats")
    ax.set_ylabel("gold reward (held-out openings)")
    ax.set_title("Gold reward against KL, SmolLM2-135M (4-bit-rounded weights)", fontsize=10)
    ax.legend(fontsize=8)
    for name, curves in labels["curves"].items():
        for curve in curves:
            acc.plot(*zip(*curve), color="C0" if name == "random" else "C1", alpha=0.25)
        mean = labels["random_curve"] if name == "random" else labels["active_curve"]
        acc.plot(*zip(*mean), marker="o", color="C0" if name == "random" else "C1", label=f"{name} (mean of seeds)")
    acc.set_xlabel("labels")
    acc.set_ylabel("reward model's agreement with the gold judge")
    acc.set_title("Random against active pair choice", fontsize=10)
    acc.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def arguments():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--labels", type=int, default=400, help="N: labels given on the page")
    p.add_argument("--response-len", type=int, default=24)
    p.add_argument("--steps", type=int, default=16, help="RL steps of 16 responses")
    p.add_argument("--eval-prompts", type=int, default=48)
    p.add_argument("--eval-samples", type=int, default=2, help="responses per held-out opening")
    p.add_argument("--heldout-pairs", type=int, default=400, help="pairs the reward models are measured on")
    p.add_argument("--pool", type=int, default=4, help="candidate pairs per label: what choice chooses among")
    p.add_argument("--active-seeds", type=int, default=3, help="seeds of each arm of random against active choice")
    p.add_argument("--active-select", choices=["uncertain", "ensemble"], default="ensemble",
                   help="one reward model's closeness to P(A) = 0.5, or an ensemble's disagreement")
    p.add_argument("--agreement", type=float, default=0.75, help="the simulated annotators' agreement with the gold")
    p.add_argument("--gold-train", type=int, default=4000, help="IMDB train reviews the gold judge learns from")
    p.add_argument("--sft-examples", type=int, default=480)
    p.add_argument("--ppo-kl", default="0.3,0.1,0.03", help="kl_coef of oracle and learned-RM PPO")
    p.add_argument("--dpo-beta", default="0.5,0.1,0.03")
    p.add_argument("--dpo-lr", type=float, default=2e-4, help="DPO and IPO learning rate (2 passes over the N pairs)")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny sizes, one strength each")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="work folder (default: runs/bench-gold-frontier-TIME)")
    args = p.parse_args()
    if args.quick:
        args.__dict__.update(labels=24, response_len=10, steps=2, eval_prompts=8, eval_samples=1, heldout_pairs=32,
                             gold_train=300, sft_examples=32, ppo_kl="0.1", dpo_beta="0.1",
                             active_seeds=1)
    return args


def run_methods(work: Path, files: dict, gold: Path, rm: Path, args) -> tuple[list[dict], float, float]:
    gold_reward = reward_of(str(gold), args.response_len, "cpu")
    ref = load_reference(str(files["sft"]), "cpu", chat_template=False)
    sft_gold, sft_se, _ = score(ref, ref, gold_reward, files["eval_prompt_list"], args)
    say(f"SFT policy: gold {sft_gold:.3f} +- {sft_se:.3f}")
    frontier = []

    def add(method: str, strength: float, labels: int, train) -> None:
        t = time.time()
        run_dir = train()
        policy = load_policy(str(run_dir), "cpu", value_head=False, chat_template=False)
        gold_mean, se, kl = score(policy, ref, gold_reward, files["eval_prompt_list"], args)
        frontier.append({"method": method, "strength": strength, "labels": labels, "gold_reward": round(gold_mean, 4),
                         "gold_se": round(se, 4), "kl": round(kl, 4), "seconds": round(time.time() - t, 1)})
        say(f"{method} {strength}: gold {gold_mean:.3f} (SFT {sft_gold:.3f}), KL {kl:.3f}")

    n = args.labels
    for c in map(float, args.ppo_kl.split(",")):
        add("ppo_oracle", c, 0, lambda c=c: rl_run(work, f"ppo-oracle-{c}", "ppo", [f"--reward.classifier={gold}"], c,
                                                   files, args))
        add("ppo_learned_rm", c, n, lambda c=c: rl_run(work, f"ppo-rm-{c}", "ppo", [f"--reward.reward_model={rm}"], c,
                                                       files, args))
    add("grpo_learned_rm", 0.04, n, lambda: rl_run(work, "grpo-rm", "grpo", [f"--reward.reward_model={rm}"], 0.04,
                                                   files, args))
    for b in map(float, args.dpo_beta.split(",")):
        add("dpo", b, n, lambda b=b: dpo_run(work, f"dpo-{b}", "sigmoid", b, files, args))
    add("ipo", 0.1, n, lambda: dpo_run(work, "ipo", "ipo", 0.1, files, args))
    for k in (4, 16):
        t = time.time()
        g, se, kl = best_of_n(files["sft"], rm, load_judge(str(gold)), files["eval_prompt_list"], k, args)
        frontier.append({"method": "best_of_n", "strength": k, "labels": n, "gold_reward": round(g, 4),
                         "gold_se": round(se, 4), "kl": round(kl, 4), "seconds": round(time.time() - t, 1)})
        say(f"best-of-{k}: gold {g:.3f}, KL {kl:.3f}")
    return frontier, sft_gold, sft_se


def main() -> None:
    args = arguments()
    configure_process()
    with contextlib.redirect_stdout(sys.stderr):  # the stages' own lines: stdout is the JSON alone
        out = measure(args)
    print(json.dumps(out))


def measure(args) -> dict:
    t0 = time.time()
    work = Path(args.out) if args.out else ROOT / "runs" / f"bench-gold-frontier-{time.strftime('%Y%m%d-%H%M%S')}"
    work.mkdir(parents=True, exist_ok=True)
    gold, sft_run = gold_judge(args.gold_train), sft_policy(args.sft_examples)
    train_prompts = [opening(r["text"]) for r in reviews("train.jsonl", 512, skip=10000)]
    eval_prompts = [opening(r["text"]) for r in reviews("test.jsonl", args.eval_prompts)]
    files = {"sft": sft_run, "train_prompt_list": train_prompts, "eval_prompt_list": eval_prompts,
             "train_prompts": write_jsonl(work / "train_prompts.jsonl", [{"prompt": p} for p in train_prompts]),
             "eval_prompts": write_jsonl(work / "eval_prompts.jsonl", [{"prompt": p} for p in eval_prompts])}
    heldout_prompts = [opening(r["text"]) for r in reviews("test.jsonl", args.heldout_pairs, skip=5000)]
    labels = collect_labels(work, files, gold, heldout_prompts, args, say)
    files["labels"] = labels["labels"]
    frontier, sft_gold, sft_se = run_methods(work, files, gold, labels["rm"], args)
    learned = learned_vs_oracle(frontier, sft_gold)
    dpo_points = [(0.0, sft_gold)] + [(r["kl"], r["gold_reward"]) for r in frontier if r["method"] == "dpo"]
    bo4 = next(r for r in frontier if r["method"] == "best_of_n" and r["strength"] == 4)
    dpo_at_bo4 = interpolate(dpo_points, bo4["kl"])
    plot(frontier, sft_gold, labels, work / "gold_frontier.png")
    wall = time.time() - t0
    out = {"frontier": frontier, "sft_gold_reward": round(sft_gold, 4), "sft_gold_se": round(sft_se, 4),
           "learned_vs_oracle_gain": None if learned is None else round(learned, 3),
           "dpo_minus_best_of_4": None if dpo_at_bo4 is None else round(dpo_at_bo4 - bo4["gold_reward"], 4),
           "active_label_ratio": None if labels["active_label_ratio"] is None else round(labels["active_label_ratio"], 3),
           "reward_model_accuracy": round(labels["rm_accuracy"], 4), "random_curve": labels["random_curve"],
           "active_curve": labels["active_curve"], "curves_by_seed": labels["curves"],
           "annotator_beta": round(labels["beta"], 4), "annotator_agreement": round(labels["agreement"], 4),
           "wall_seconds": round(wall), "settings": {k: v for k, v in vars(args).items() if k != "out"},
           "gold_judge": str(gold), "sft_policy": str(sft_run), "plot": str(work / "gold_frontier.png"),
           "bars": {"learned_vs_oracle_gain >= 0.7": learned is not None and learned >= 0.7,
                    "dpo_minus_best_of_4 > 0": dpo_at_bo4 is not None and dpo_at_bo4 > bo4["gold_reward"],
                    "active_label_ratio <= 0.75": labels["active_label_ratio"] is not None
                    and labels["active_label_ratio"] <= 0.75, "wall_seconds <= 5400": wall <= 5400}}
    (work / "result.json").write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
