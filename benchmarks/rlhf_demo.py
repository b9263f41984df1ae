"""The demo's bar: `minirlhf demo` (classifier -> LSTM generator -> PPO -> evaluation) on the offline tweets.

Bar: whole demo at most 10 minutes on a 2-core CPU, peak memory under 4 GB, and on held-out prompts a healthy
win: the PPO policy beats the reference (win rate at least 0.8) while keeping at least half the reference's
distinct-2 (no collapse onto one answer), with KL from the reference under 10 nats per response and no health
check fired during training.
Prints one JSON object. Run from the repository root: `.venv/bin/python -m benchmarks.rlhf_demo`.
"""

import json
import sys

from benchmarks.common import ROOT, failed, new_run_dir, run_minirlhf, save_result


def main() -> int:
    out = new_run_dir("demo")
    proc, wall, peak_mb = run_minirlhf(["demo", "--out", str(out), *sys.argv[1:]])
    if failed(proc):
        return 1
    res = json.loads((out / "ppo" / "results.json").read_text())
    clf = json.loads((out / "classifier" / "results.json").read_text())
    gen = json.loads((out / "generator" / "results.json").read_text())
    report = {
        "benchmark": "rlhf_demo", "run_dir": str(out.relative_to(ROOT)), "wall_seconds": round(wall, 1),
        "peak_memory_mb": round(peak_mb), "classifier_test_accuracy": round(clf["test_accuracy"], 4),
        "generator_ratio_to_unigram": round(gen["ratio_to_unigram"], 3),
        "held_out_prompts": res["prompts"], "reward_reference": round(res["reward_reference"], 3),
        "reward_policy": round(res["reward_policy"], 3), "win_rate": round(res["win_rate"], 3),
        "kl_nats": round(res["kl"], 2), "distinct_2": {"reference": round(res["reference"]["distinct_2"], 3),
                                                       "policy": round(res["policy"]["distinct_2"], 3)},
        "health": [f"{h['guard']} at step {h['step']}" for h in res.get("health", [])],
        "samples": res["samples"][:5],
        "bar": {"wall<=600s": wall <= 600, "peak<4GB": peak_mb < 4096, "win_rate>=0.8": res["win_rate"] >= 0.8,
                "distinct_2>=0.5x_reference": res["policy"]["distinct_2"] >= 0.5 * res["reference"]["distinct_2"],
                "kl<10": res["kl"] < 10, "no_health_check_fired": not res.get("health")},
    }
    save_result("rlhf_demo", report)
    return 0 if all(report["bar"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
