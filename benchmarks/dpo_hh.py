"""The DPO bar: SmolLM2-135M-Instruct trained with DPO on Anthropic HH-RLHF preference pairs, on a 2-core CPU.

A few hundred training pairs and ~100 held-out ones (split by prompt), prompts cut to their last 128 tokens and
responses to 64; the lowest 24 of the 30 layers are frozen (their output is computed once, with the reference
log-probs). Bar: on the held-out pairs the implicit-reward accuracy is above chance (0.5; at step 0 it is 0 by
construction, every implicit reward being 0, so "above step 0" would prove nothing) and the policy's log-prob
margin, log pi(chosen) - log pi(rejected), grows; reported besides: accuracy against the longer-response baseline.
Prints one JSON object. Run from the repository root: `.venv/bin/python -m benchmarks.dpo_hh [--lr=1e-4 ...]`
(overrides go to `minirlhf dpo`); the pairs are ../shared/data/preferences/hh_rlhf.jsonl, or $DPO_PAIRS.
"""

import json
import os
import sys
from pathlib import Path

from benchmarks.common import ROOT, failed, new_run_dir, run_minirlhf, save_result

PAIRS = Path(os.environ.get("DPO_PAIRS", ROOT.parent / "shared" / "data" / "preferences" / "hh_rlhf.jsonl"))
SETTINGS = ["--policy=smollm2", "--max_train=256", "--max_eval=128", "--policy_options.freeze_layers=24",
            "--max_prompt_tokens=128", "--max_response_tokens=64", "--train.batch_size=16", "--train.micro_batch_size=4",
            "--train.epochs=1", "--train.lr=1e-4", "--beta=0.1", "--eval_every=8", "--samples=3", "--device=cpu"]


def main() -> int:
    if not PAIRS.is_file():
        print(json.dumps({"error": f"{PAIRS} is missing; set DPO_PAIRS to an HH-RLHF .jsonl file"}))
        return 1
    work = new_run_dir("dpo-hh")
    proc, wall, peak_mb = run_minirlhf(["dpo", "--preferences", str(PAIRS), "--out", str(work), *SETTINGS,
                                        *sys.argv[1:]])
    if failed(proc):
        return 1
    res = json.loads((work / "results.json").read_text())
    before, after = res["before"], res["after"]
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    report = {
        "benchmark": "dpo_hh", "run_dir": str(work.relative_to(ROOT)), "settings": SETTINGS + sys.argv[1:],
        "pairs_train": res["pairs_train"], "pairs_eval": res["pairs_eval"], "steps": res["steps"],
        "wall_seconds": round(wall, 1), "reference_seconds": res["time_ref_s"], "train_seconds": res["time_train_s"],
        "peak_memory_mb": round(peak_mb),
        "held_out": {k: {"step_0": round(before[k], 4), "final": round(after[k], 4)}
                     for k in ("rewards/accuracy", "logps/margin", "rewards/margin", "loss", "logps/chosen",
                               "logps/rejected")},
        "train_accuracy_last_steps": round(sum(r["rewards/accuracy"] for r in rows[-4:] if "rewards/accuracy" in r)
                                           / max(1, sum("rewards/accuracy" in r for r in rows[-4:])), 3),
        "length_baseline": round(res["length_baseline"], 3),
        "samples": res["samples"],
        "bar": {"accuracy_above_chance": after["rewards/accuracy"] > 0.5,
                "logp_margin_grows": after["logps/margin"] > before["logps/margin"]},
        "also": {"accuracy_above_length_baseline": after["rewards/accuracy"] > res["length_baseline"],
                 "wall<=900s": wall <= 900},
    }
    save_result("dpo_hh", report)
    return 0 if all(report["bar"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
