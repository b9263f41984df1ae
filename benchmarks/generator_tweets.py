"""Stage-3 bar: the default LSTM config on the default corpus (offline tweets).

Bar: trains in under 5 minutes on a 2-core CPU, and its validation perplexity is at most half that
of a unigram model of the same vocabulary. Prints one JSON object.
Run from the repository root: `.venv/bin/python -m benchmarks.generator_tweets`.
"""

import json
import sys

from benchmarks.common import ROOT, failed, new_run_dir, run_minirlhf, save_result


def main() -> int:
    out = new_run_dir("generator-tweets")
    proc, wall, peak_mb = run_minirlhf(["train-generator", "--out", str(out), *sys.argv[1:]])
    if failed(proc):
        return 1
    res = json.loads((out / "results.json").read_text())
    samples = [line for line in proc.stdout.splitlines() if line.startswith("  ")]
    report = {
        "benchmark": "generator_tweets", "run_dir": str(out.relative_to(ROOT)),
        "params": res["params"], "vocab_size": res["vocab_size"],
        "val_perplexity": round(res["val_perplexity"], 1), "unigram_perplexity": round(res["unigram_perplexity"], 1),
        "ratio_to_unigram": round(res["ratio_to_unigram"], 3),
        "train_seconds": res["train_seconds"], "wall_seconds": round(wall, 1), "peak_memory_mb": round(peak_mb),
        "samples": samples,
        "bar": {"ratio<=0.5": res["ratio_to_unigram"] <= 0.5, "train<300s": res["train_seconds"] < 300},
    }
    save_result("generator_tweets", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
