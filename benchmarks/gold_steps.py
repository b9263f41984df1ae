"""The parts of the gold-judge frontier (gold_frontier.py), each a function of the settings that returns a JSON-able
dict: the frontier writes each one to its own file and never runs a finished part again.

Per seed: `minirlhf loop` with one round (offline: N labels on the SFT policy's samples, one ensemble reward model,
T policy steps trained on its first member alone, the others watched); RL from the SFT policy against the same
ensemble combined worst-case (wco) or uncertainty-weighted (uwo); the oracle (the gold judge as reward, the learned
ensemble watched at weight 0); `loop` with R rounds of N/R labels and T/R steps each (online); DPO on the offline
labels, a pass at a time; best-of-n from 64 SFT samples per held-out opening. Every RL step logs the gold judge's
score of its own samples (`--reward.monitor`), so each run is a curve of gold and proxy reward against KL.
"""

import json
import math
from pathlib import Path

import torch

from minirlhf.rl import registry

from minirlhf.stages import dpo, rl
from minirlhf.checkpoint import load_json
from minirlhf.config import load_config
from minirlhf.data.dialogue import dialogue_text
from minirlhf.data.prompts import read_prompts
from minirlhf.feedback import loop
from minirlhf.models.judge import load_judge
from minirlhf.models.load import load_policy, load_reference
from minirlhf.models.reward_model import RewardModel, combine
from minirlhf.ops import beirami_kl, order_weights, response_kl

LM = ["--policy_options.chat_template=false", "--policy_options.freeze_layers=24"]  # top 6 of 30 blocks train
BON_N = (1, 2, 4, 8, 16, 32, 64)


def rl_recipe(args) -> list[str]:
    """The policy stage's settings shared by every RL run and both loops."""
    return ["--batch_size=16", "--ppo_epochs=2", "--minibatch_size=8", "--adaptive_kl=false",
            f"--train.lr={args.lr}", "--sample_every=1000", "--guards=warn", f"--reward.monitor={args.gold}"]


def curve(run: Path, proxy: str = "reward/reward_model") -> dict:
    """Per step of an RL run: KL from the reference (nats per response), the gold judge's mean score of the step's
    samples (and their std), the proxy reward, the ensemble's disagreement; and the guards that fired."""
    rows = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "reward/monitor" in r]
    out = {"step": [r["step"] for r in rows], "kl": [r["objective/kl"] for r in rows],
           "gold": [r["reward/monitor"] for r in rows], "proxy": [r.get(proxy) for r in rows],
           "ensemble_std": [r.get("reward/ensemble_std") for r in rows]}
    out["health"] = load_json(run / "results.json").get("health", [])
    return out


def loop_run(work: Path, name: str, rounds: int, seed: int, args) -> dict:
    """`minirlhf loop` on the frontier's openings: `rounds` rounds of labels/rounds simulated labels and
    steps/rounds policy steps each; its rounds' RL curves joined, and its held-out evaluation per round."""
    per_round = [f"--labels={args.labels // rounds}", f"--steps={args.steps // rounds}"]
    cfg = load_config(loop.LoopConfig, overrides=[
        f"--policy={args.sft}", *LM, f"--rounds={rounds}", *per_round, f"--annotator=simulate:{args.gold}",
        f"--beta={args.beta}", "--annotators=2", f"--gold={args.gold}", f"--ensemble={args.members}",
        f"--prompts.file={args.train_prompts}", f"--prompts.eval_file={args.eval_prompts}",
        f"--prompts.max_eval={args.eval_prompts_n}", f"--response_len={args.response_len}", f"--kl_coef={args.kl}",
        "--reward_model.max_length=96", *args.rm_options, "--reward_model_train.epochs=3",
        f"--seed={seed}",
        "--policy_args=[" + ", ".join(rl_recipe(args) + ["--reward.ensemble=single"]) + "]",
        f"--out={work / name}", "--device=cpu"])
    run = loop.train(cfg)
    rounds_out = [curve(run / f"round-{k}" / "policy") for k in range(1, rounds + 1)]
    joined = {k: sum((c[k] for c in rounds_out), []) for k in ("kl", "gold", "proxy", "ensemble_std")}
    joined["step"] = list(range(1, len(joined["gold"]) + 1))
    joined["health"] = [h | {"round": k + 1} for k, c in enumerate(rounds_out) for h in c["health"]]
    rows = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "round" in r]
    return {"run": str(run), "curve": joined, "rounds": rows, "reward_model": str(run / "round-1" / "reward_model"),
            "labels": str(run / "round-1" / "rm_train.jsonl")}


def rl_run(work: Path, name: str, reward: list[str], seed: int, args, start: str = "") -> dict:
    """PPO from the SFT policy (or, continuing, from `start`, the SFT policy still the reference)."""
    frm = [f"--policy={start}", f"--ref_policy={args.sft}"] if start else [f"--policy={args.sft}"]
    steps = args.more_steps if start else args.steps
    cfg = load_config(registry.get("ppo").config, overrides=[
        *frm, *LM, *reward, f"--prompts.file={args.train_prompts}",
        f"--prompts.eval_file={args.eval_prompts}", "--prompts.max_eval=8", f"--steps={steps}",
        f"--response_len={args.response_len}", f"--kl_coef={args.kl}", f"--seed={seed}", *rl_recipe(args),
        f"--out={work / name}", "--device=cpu"])
    run = rl.train(cfg)
    return {"run": str(run), "curve": curve(run)}


@torch.no_grad()
def score(policy, ref, gold, prompts: list[str], args, seed: int) -> dict:
    """Mean gold reward (and its standard error) and KL(pi || ref) per response (k1 summed over the response),
    over `args.eval_samples` samples per held-out opening."""
    gen, rows = torch.Generator().manual_seed(seed), [p for p in prompts for _ in range(args.eval_samples)]
    rewards, kls = [], []
    for i in range(0, len(rows), 16):
        rollout = policy.sample(rows[i: i + 16], args.response_len, gen)
        rewards.append(gold(rollout.prompts, rollout.texts).float())
        ref_logprobs = ref(rollout, entropy=False)[0]
        kls.append(response_kl(rollout.logprobs, ref_logprobs, rollout.response_mask).cpu())
    rewards = torch.cat(rewards)
    return {"gold": rewards.mean().item(), "gold_se": (rewards.std() / len(rewards) ** 0.5).item(),
            "kl": torch.cat(kls).mean().item()}


def dpo_passes(work: Path, name: str, labels: str, seed: int, args) -> dict:
    """DPO on the labels one pass at a time (each pass from the last, the SFT policy the reference throughout;
    the optimizer restarts each pass), each pass scored on the held-out openings."""
    gold, ref = load_judge(args.gold), load_reference(args.sft, "cpu", chat_template=False)
    prompts = read_prompts(args.eval_prompts)
    policy, points = args.sft, [{"pass": 0, **score(ref, ref, gold, prompts, args, seed)}]
    for k in range(1, args.dpo_passes + 1):
        cfg = load_config(dpo.DPOConfig, overrides=[
            f"--policy={policy}", f"--ref_policy={args.sft}", *LM, f"--preferences={labels}", f"--beta={args.dpo_beta}",
            "--train.epochs=1", "--train.batch_size=16", "--train.micro_batch_size=8", f"--train.lr={args.dpo_lr}",
            f"--max_response_tokens={args.response_len + 1}", "--eval_every=0", "--samples=0", f"--seed={seed}",
            f"--out={work / f'{name}-pass{k}'}", "--device=cpu"])
        policy = str(dpo.train(cfg))
        trained = load_policy(policy, "cpu", value_head=False, chat_template=False)
        points.append({"pass": k, **score(trained, ref, gold, prompts, args, seed)})
    return {"points": points}


@torch.no_grad()
def bon_samples(args, seed: int) -> dict:
    """`max(BON_N)` SFT samples per held-out opening, with their gold score and log-probability under the SFT
    policy (it sampled them at temperature 1, so that is the reference's own log-probability)."""
    policy, gold = load_policy(args.sft, "cpu", value_head=False, chat_template=False), load_judge(args.gold)
    prompts = read_prompts(args.eval_prompts)
    gen, m, out = torch.Generator().manual_seed(seed), max(BON_N), {"prompts": prompts, "texts": [], "gold": [],
                                                                      "logprob": []}
    for p in prompts:
        texts, golds, logprobs = [], [], []
        for i in range(0, m, 32):
            rollout = policy.sample([p] * 32, args.response_len, gen)
            texts += rollout.texts
            golds += gold(rollout.prompts, rollout.texts).tolist()
            logprobs += (rollout.logprobs * rollout.response_mask).sum(1).tolist()
        out["texts"].append(texts)
        out["gold"].append(golds)
        out["logprob"].append(logprobs)
    return out


def bon_curves(samples: dict, reward_model: str, modes: tuple[str, ...]) -> dict:
    """Best-of-n under a reward model, its ensemble combined by each of `modes`, for each n in BON_N: expected gold
    and proxy reward of the chosen sample, KL by the bound log n - (n-1)/n and by Beirami et al.'s estimator. The
    members score the samples once; every mode combines those scores."""
    rm = RewardModel.from_run(reward_model, "cpu")
    gold, logprob = torch.tensor(samples["gold"]), torch.tensor(samples["logprob"])  # (P, M)
    members = [rm.member_scores([dialogue_text(p, t) for t in texts])
               for p, texts in zip(samples["prompts"], samples["texts"])]  # P x (K, M)
    return {mode: bon_points(gold, logprob, torch.stack([combine(m, mode) for m in members])) for mode in modes}


def bon_points(gold: torch.Tensor, logprob: torch.Tensor, proxy: torch.Tensor) -> dict:
    order = proxy.argsort(1)  # (P, M), ascending proxy
    sorted_gold, sorted_proxy = gold.gather(1, order).double(), proxy.gather(1, order).double()
    sorted_logprob = logprob.gather(1, order)
    points = []
    for n in BON_N:
        w = order_weights(gold.size(1), n)  # (M,)
        per_prompt = sorted_gold @ w  # (P,)
        points.append({"n": n, "gold": per_prompt.mean().item(), "gold_se": per_prompt.std().item()
                       / len(per_prompt) ** 0.5, "proxy": (sorted_proxy @ w).mean().item(),
                       "kl_bound": math.log(n) - (n - 1) / n,
                       "kl_beirami": (beirami_kl(sorted_logprob, n) @ w).mean().item()})
    return {"points": points}


def reward_model_accuracy(reward_model: str, heldout: str) -> dict:
    """Each member's and the ensemble's (mean) agreement with the gold judge on held-out pairs of SFT samples."""
    rm = RewardModel.from_run(reward_model, "cpu")
    rows = [json.loads(line) for line in Path(heldout).read_text().splitlines() if line.strip()]
    chosen = rm.member_scores([dialogue_text(r["prompt"], r["chosen"]) for r in rows])  # (K, N)
    rejected = rm.member_scores([dialogue_text(r["prompt"], r["rejected"]) for r in rows])
    members = (chosen > rejected).float().mean(1).tolist()
    return {"members": members, "mean": (chosen.mean(0) > rejected.mean(0)).float().mean().item(),
            "pairs": len(rows)}
