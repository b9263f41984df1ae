"""The multi-turn bar: SmolLM2-135M-Instruct trained with PPO on HH-RLHF dialogue prompts against the Bradley–Terry
reward model of benchmarks/reward_model_hh.py; each prompt is a whole conversation, put to the policy through its
chat template, and the reward model scores the conversation with the new assistant turn.

Training prompts come from the reward model's training pairs and held-out dialogues from its held-out pairs
(the same split by prompt), so neither model saw the held-out conversations.
Bar: the held-out mean reward rises over the reference's with KL under 10 nats per response; prints samples
before and after. Prints one JSON object.
Run from the repository root: `.venv/bin/python -m benchmarks.dialogue_ppo [--reward-model RUN] [overrides ...]`
(without --reward-model it uses the newest runs/bench-reward-model-hh-* run, training one first if there is none).
"""

import argparse
import json
import sys

from benchmarks.common import ROOT, failed, new_run_dir, run_minirlhf, save_result

HH = ROOT.parent / "shared" / "data" / "preferences" / "hh_rlhf.jsonl"
PPO = ["--policy=smollm2", "--policy_options.freeze_layers=15", "--steps=30", "--batch_size=16", "--response_len=32",
       "--ppo_epochs=2", "--minibatch_size=8", "--train.lr=3e-5", "--kl_coef=0.1", "--kl_target=6", "--kl_horizon=1000",
       "--target_kl=0.1", "--prompts.max_eval=48", "--sample_every=10", "--save_every=10"]
MAX_PROMPT_CHARS = 500  # shorter conversations: a 2-core CPU's time goes to the policy's reply, not to reading


def reward_model() -> str:
    """The newest reward-model benchmark run; trains one first when there is none."""
    import subprocess

    runs = sorted((ROOT / "runs").glob("bench-reward-model-hh-*/results.json"))
    if not runs:
        subprocess.run([sys.executable, "-m", "benchmarks.reward_model_hh"], cwd=ROOT, stdout=sys.stderr)
        runs = sorted((ROOT / "runs").glob("bench-reward-model-hh-*/results.json"))
    return str(runs[-1].parent)


def write_prompts(work, split_seed: int = 0, eval_fraction: float = 0.2):
    from minirlhf.data.preferences import read_pairs, split_pairs

    train, held = split_pairs(read_pairs(HH), eval_fraction, split_seed)
    for name, pairs in (("train", train), ("eval", held)):
        prompts = sorted({p.prompt for p in pairs if len(p.prompt) <= MAX_PROMPT_CHARS})
        (work / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return work / "train.jsonl", work / "eval.jsonl"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reward-model")
    args, overrides = ap.parse_known_args()
    rm = args.reward_model or reward_model()
    work = new_run_dir("dialogue-ppo")
    work.mkdir(parents=True)
    train, held = write_prompts(work)
    proc, wall, peak_mb = run_minirlhf(["ppo", "--reward", rm, f"--prompts.file={train}", f"--prompts.eval_file={held}",
                                        "--out", str(work / "ppo"), *PPO, *overrides])
    if failed(proc):
        return 1
    res = json.loads((work / "ppo" / "results.json").read_text())
    rise = res["reward_policy"] - res["reward_reference"]
    samples = [{"last_turn": s["prompt"].rsplit("Human:", 1)[-1].replace("Assistant:", "").strip()[-200:],
                "before": s["reference"], "before_reward": s["reference_reward"],
                "after": s["policy"], "after_reward": s["policy_reward"]} for s in res["samples"][:6]]
    report = {"benchmark": "dialogue_ppo", "run_dir": str(work.relative_to(ROOT)), "reward_model": rm,
              "wall_seconds": round(wall, 1), "peak_memory_mb": round(peak_mb), "held_out_dialogues": res["prompts"],
              "reward_reference": round(res["reward_reference"], 3), "reward_policy": round(res["reward_policy"], 3),
              "reward_rise": round(rise, 3), "win_rate": round(res["win_rate"], 3), "kl_nats": round(res["kl"], 2),
              "samples": samples, "bar": {"reward_rises": rise > 0, "kl<10": res["kl"] < 10}}
    save_result("dialogue_ppo", report)
    return 0 if all(report["bar"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
