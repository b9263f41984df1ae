"""The real-LM bar: PPO on SmolLM2-135M-Instruct with `configs/smollm2_sentiment.yaml`, as on a fresh checkout.

It runs in a new folder, so the reward classifier the config names does not exist yet and is trained first;
the time includes that. Bar: within 15 minutes on a 2-core CPU the held-out mean reward (positive logit)
rises by at least 1.0 over the reference's, with KL under 10 nats per response and peak memory under 6 GB;
the samples show the responses still read as English. Prints one JSON object.
Run from the repository root: `.venv/bin/python -m benchmarks.smollm2_sentiment [--steps=40 ...]`.
"""

import json
import sys

from benchmarks.common import ROOT, failed, new_run_dir, run_minirlhf, save_result


def main() -> int:
    work = new_run_dir("smollm2")  # a fresh folder: the reward classifier is trained first, as on a new checkout
    work.mkdir(parents=True)
    proc, wall, peak_mb = run_minirlhf(["ppo", "--config", str(ROOT / "configs" / "smollm2_sentiment.yaml"),
                                        "--out", "ppo", *sys.argv[1:]], cwd=work)
    if failed(proc):
        return 1
    res = json.loads((work / "ppo" / "results.json").read_text())
    clf = json.loads((work / "runs" / "classifier-tweets" / "results.json").read_text())
    metrics = [json.loads(line) for line in (work / "ppo" / "metrics.jsonl").read_text().splitlines()]
    rise = res["reward_policy"] - res["reward_reference"]
    report = {
        "benchmark": "smollm2_sentiment", "run_dir": str(work.relative_to(ROOT)), "wall_seconds": round(wall, 1),
        "classifier_seconds": clf["total_seconds"], "ppo_steps": len(metrics),
        "seconds_per_step": round(sum(m["time/rollout_s"] + m["time/update_s"] for m in metrics) / len(metrics), 2),
        "peak_memory_mb": round(peak_mb), "held_out_prompts": res["prompts"],
        "reward_reference": round(res["reward_reference"], 3), "reward_policy": round(res["reward_policy"], 3),
        "reward_rise": round(rise, 3), "win_rate": round(res["win_rate"], 3), "kl_nats": round(res["kl"], 2),
        "distinct_2": {"reference": round(res["reference"]["distinct_2"], 3), "policy": round(res["policy"]["distinct_2"], 3)},
        "ref_perplexity": {"reference": round(res["reference"]["ref_perplexity"], 2),
                           "policy": round(res["policy"]["ref_perplexity"], 2)},
        "samples": res["samples"],
        "bar": {"wall<=900s": wall <= 900, "rise>=1.0": rise >= 1.0, "kl<10": res["kl"] < 10, "peak<6GB": peak_mb < 6144},
    }
    save_result("smollm2_sentiment", report)
    return 0 if all(report["bar"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
