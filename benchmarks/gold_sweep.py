"""Fewer labels, longer PPO: does the single reward model's gold reward peak and fall? One seed of the gold frontier's
offline arm (`minirlhf loop`, one round) per label count, reusing the frontier's gold judge, SFT policy, openings
and annotator noise (run `.venv/bin/python -m benchmarks.gold_frontier` first). Prints and saves per-8-step means
of KL, gold, proxy and the ensemble's disagreement, and the guards that fired.

Run from the repository root: `.venv/bin/python -m benchmarks.gold_sweep --labels 40,80 --steps 64 --lr 2e-4 --kl 0.001`
"""

import argparse
import json
from pathlib import Path

from benchmarks import gold_report
from benchmarks import gold_steps as steps
from benchmarks.common import ROOT, save_result

from minirlhf.runtime import configure_process

FRONTIER = ROOT / "runs" / "bench-gold-frontier"


def binned(curve: dict, width: int = 8) -> list[dict]:
    """Means of `width` steps (gold_report.binned) of each series, a row per bin."""
    series = {k: gold_report.binned(curve[k], width) for k in ("kl", "gold", "proxy", "ensemble_std")}
    steps = curve["step"]
    return [{"steps": f"{steps[i * width]}-{steps[min((i + 1) * width, len(steps)) - 1]}",
             **{k: round(v[i], 3) for k, v in series.items()}} for i in range(len(series["gold"]))]



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--labels", default="40,80")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--kl", type=float, default=0.001)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rm-model", choices=["minilm", "smollm2"], default="minilm",
                   help="the reward model's base: MiniLM, as the gold judge, or SmolLM2 (top 4 of 30 blocks trained)")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench-gold-sweep"))
    args = p.parse_args()
    configure_process()
    part = lambda name: json.loads((FRONTIER / "parts" / f"{name}.json").read_text())  # noqa: E731
    rm = ["--reward_model.name=smollm2", "--reward_model.freeze_layers=26"] if args.rm_model == "smollm2" else []
    shared = dict(rm_options=rm, steps=args.steps, lr=args.lr, kl=args.kl, members=4, response_len=24, eval_prompts_n=48,
                  gold=part("gold")["path"], sft=part("sft")["path"], beta=part("heldout")["beta"],
                  train_prompts=str(FRONTIER / "train_prompts.jsonl"), eval_prompts=str(FRONTIER / "eval_prompts.jsonl"))
    result = {"settings": vars(args), "runs": {}}
    for n in map(int, args.labels.split(",")):
        out = steps.loop_run(Path(args.out), f"labels-{n}-{args.rm_model}", 1, args.seed, argparse.Namespace(labels=n, **shared))
        rounds = out["rounds"][-1]
        result["runs"][f"{n}-{args.rm_model}"] = {"bins": binned(out["curve"]), "health": [f"{h['guard']}@{h['step']}" for h in
                                                                           out["curve"]["health"]], "round": rounds}
    path = ROOT / "benchmarks" / "results" / "gold_sweep.json"  # runs of other settings already there stay
    saved = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    result["runs"] = saved["runs"] | result["runs"]
    save_result("gold_sweep", result)


if __name__ == "__main__":
    main()
