"""Multi-turn RL bar: SmolLM2-135M-Instruct (4-bit-rounded weights, offline) learns to keep a scripted user's
verifiable instructions across a conversation (`configs/smollm2_constraints.yaml`: the `constraints` environment,
3 assistant turns, GRPO with per-turn credit).

Before (the starting model) and after (the trained policy) play the same 128 held-out episodes: held-out requests,
seeds 0..127, the same sampling seeds. Bars: the share of episodes with every instruction held at every turn rises by
>= 0.20 absolute, and by >= 0.15 at turn 3 alone; training (sampling and updates, evaluation excluded) takes <= 30
minutes and the process's peak memory is <= 4 GB on 2 CPU cores; the replies' perplexity under the reference stays
<= 1.5x the reference's own replies' (fluent, not gamed).

Run from the repository root: `.venv/bin/python -m benchmarks.multiturn [--steps=60 ...]` (extra arguments go to
`minirlhf grpo`). Prints one JSON object and saves it to benchmarks/results/multiturn.json.
"""

import json
import sys
from pathlib import Path

import yaml

from benchmarks.common import ROOT, commit, machine, new_run_dir, run_child, save_result

BARS = {"all_turns_rise": 0.20, "turn3_rise": 0.15, "train_seconds": 1800, "peak_mb": 4096, "ppl_ratio": 1.5}


def cpu() -> dict:
    """The CPU the figures came from (common.machine: lscpu), and whether it has AVX-512 BF16 and AMX."""
    m = machine()
    return {"model": m["cpu"], "cores": m["cores"], "avx512_bf16": m["avx512_bf16"], "amx_bf16": m["amx_bf16"]}


def train(run: Path, extra: list[str]) -> tuple[int, float, float, str]:
    """The run as a child process (its progress bars on this terminal); (exit code, wall s, peak MiB, command)."""
    cmd = [sys.executable, "-m", "minirlhf", "grpo", "--config", str(ROOT / "configs" / "smollm2_constraints.yaml"),
           "--prompts.max_eval=128", "--out", str(run), *extra]
    with (run.parent / "stdout.log").open("w") as log:
        code, _, wall, peak = run_child(cmd, stdout=log)
    return code, wall, peak, " ".join(["minirlhf", *cmd[3:]])


def main() -> int:
    work = new_run_dir("multiturn")
    work.mkdir(parents=True)
    code, wall, peak_mb, command = train(work / "grpo", sys.argv[1:])
    if code != 0:
        print(json.dumps({"error": f"minirlhf grpo exited {code}", "log": str(work / "stdout.log")}))
        return 1
    res = json.loads((work / "grpo" / "results.json").read_text())
    metrics = [json.loads(line) for line in (work / "grpo" / "metrics.jsonl").read_text().splitlines()]
    device = next((line for line in (work / "stdout.log").read_text().splitlines() if line.startswith("device:")), "")
    before, after = res["reference"], res["policy"]
    kl_coef = yaml.safe_load((work / "grpo" / "config.yaml").read_text())["kl_coef"]
    report = {
        "benchmark": "multiturn", "command": command, "commit": commit(), "run_dir": str(work.relative_to(ROOT)),
        "cpu": cpu(), "device": device, "model": "SmolLM2-135M-Instruct, 4-bit-rounded (Q4_1 GGUF)",
        "episodes": res["episodes"], "turns": res["turns"], "steps": len(metrics), "kl_coef": kl_coef,
        "all_turns_before": before["all_turns"], "all_turns_after": after["all_turns"],
        "turn3_before": before["all_held_per_turn"][2], "turn3_after": after["all_held_per_turn"][2],
        "all_held_per_turn_before": before["all_held_per_turn"], "all_held_per_turn_after": after["all_held_per_turn"],
        "reward_before": res["reward_reference"], "reward_after": res["reward_policy"], "win_rate": res["win_rate"],
        "kl": res["kl"], "kl_per_turn": after["kl_per_turn"], "ppl_before": before["ref_perplexity"],
        "ppl_after": after["ref_perplexity"], "ppl_ratio": res["ppl_ratio"],
        "kinds_before": before["kinds"], "kinds_after": after["kinds"],
        "tokens_per_turn_before": before["mean_tokens_per_turn"], "tokens_per_turn_after": after["mean_tokens_per_turn"],
        "train_seconds": round(sum(m["time/rollout_s"] + m["time/update_s"] for m in metrics), 1),
        "sample_seconds": round(sum(m["time/sample_s"] for m in metrics), 1), "wall_seconds": round(wall, 1),
        "peak_mb": round(peak_mb, 1), "sample_before": res["samples"][0]["reference"],
        "sample_after": res["samples"][0]["policy"]}
    rise, rise3 = report["all_turns_after"] - report["all_turns_before"], report["turn3_after"] - report["turn3_before"]
    report["bars"] = {"all_turns_rise": [round(rise, 3), rise >= BARS["all_turns_rise"]],
                      "turn3_rise": [round(rise3, 3), rise3 >= BARS["turn3_rise"]],
                      "train_seconds": [report["train_seconds"], report["train_seconds"] <= BARS["train_seconds"]],
                      "peak_mb": [report["peak_mb"], report["peak_mb"] <= BARS["peak_mb"]],
                      "ppl_ratio": [round(report["ppl_ratio"], 3), report["ppl_ratio"] <= BARS["ppl_ratio"]]}
    report["passed"] = all(ok for _, ok in report["bars"].values())
    save_result("multiturn", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
