"""Stage-1 bar: MiniLM fine-tuned on ../shared/data/imdb/train.jsonl, scored on all 12,500 test reviews.

Bar: test accuracy >= 0.88 within 10 minutes (training and the full test evaluation) on a 2-core
CPU, peak memory at most 2 GB. Prints one JSON object. Extra arguments are passed to train-classifier.
Run from the repository root: `.venv/bin/python -m benchmarks.classifier_imdb`.
"""

import json
import sys

from benchmarks.common import ROOT, failed, new_run_dir, run_minirlhf, save_result

IMDB = ROOT.parent / "shared" / "data" / "imdb"


def main() -> int:
    if not (IMDB / "train.jsonl").is_file():
        print(json.dumps({"error": f"{IMDB} not found; this benchmark needs ../shared/data/imdb"}))
        return 1
    out = new_run_dir("classifier-imdb")
    proc, wall, peak_mb = run_minirlhf(["train-classifier", "--data", str(IMDB / "train.jsonl"),
                                        f"--data.test_source={IMDB / 'test.jsonl'}",
                                        "--config", str(ROOT / "configs" / "imdb_classifier.yaml"), "--out", str(out),
                                        *sys.argv[1:]])
    if failed(proc):
        return 1
    res = json.loads((out / "results.json").read_text())
    report = {
        "benchmark": "classifier_imdb",
        "run_dir": str(out.relative_to(ROOT)),
        "train_examples": res["train_examples"], "test_examples": res["test_examples"],
        "test_accuracy": round(res["test_accuracy"], 4), "test_f1": round(res["test_f1"], 4),
        "best_val_accuracy": round(res["best_val_accuracy"], 4),
        "trainable_params": res["trainable_params"], "total_params": res["total_params"],
        "cache_seconds": res["cache_seconds"], "train_seconds": res["train_seconds"], "wall_seconds": round(wall, 1), "peak_memory_mb": round(peak_mb),
        "bar": {"accuracy>=0.88": res["test_accuracy"] >= 0.88, "wall<=600s": wall <= 600, "peak<=2GB": peak_mb <= 2048},
    }
    save_result("classifier_imdb", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
