"""minirlhf against TRL on one sentiment task, side by side in one run on this machine.

SmolLM2-135M-Instruct writes the next words of 64 movie-review openings (../shared/data/imdb); the reward is
the positive logit of the stage-1 classifier (benchmarks/sentiment_reward.py, the same function for every
system); 24-token responses, 16 a step, 2 threads, the same learning rate (3e-5) and KL weight (0.04) on both
sides. Systems, one child process each, one after another, each once per seed: minirlhf GRPO, 4 updates a batch
(2 passes over 2 minibatches), with 0, 5, 10 or 15 of its 30 blocks frozen (the sweep that picks the default), and
with 15 frozen and 32 responses a step; TRL's GRPOTrainer with one optimizer step per batch (its default shape)
and with 4 (num_iterations=2, 2 minibatches of 8). TRL is installed only for this benchmark
(`.venv/bin/pip install trl==1.16.0`); without it its systems are skipped with a note. PPO, full-model GRPO with
one update a batch and a trainable head remain selectable with --systems.

Precision by measurement, on both sides: minirlhf runs `--dtype auto` and `frozen_form auto` (each child says what
it took, recorded per system); TRL runs 3 steps of its default recipe in fp32 and in bf16 autocast (its own
default) first, and every TRL system then runs in the faster of the two. The sampler comparison (benchmarks/sampler.py):
the benchmark's sampling call (16 responses, 4 per opening, 24 tokens, 15 frozen blocks) with the frozen layers in
fp32 (the sampler before the forms), bf16 and int8: responses per second and the KL per token from fp32's
next-token distributions.

The verdict: the reference's reward on 160 held-out openings is measured once, before any system, with
several samples per opening until its standard error is 0.045 or less; the target is that + `--target-rise`;
each system's held-out reward (one sample per opening) is checked every `--eval-every` steps outside its
timed training, and TRL stops at its first check past the target. The speed-up over each TRL recipe is its
lower bound across seeds: TRL's quickest seed over minirlhf's slowest (of minirlhf's best system).

The machine's limits, measured before each system (the highest counts, as this shared machine's speed drifts):
the fp32 matmul peak (torch.mm, 2048^2) and the memory bandwidth (a 1 GiB tensor copy); for minirlhf, the
sampling phase's fraction of the bandwidth and roofline bounds and the update's model FLOP/s over the matmul peak
(benchmarks/limits.py).
Bars: minirlhf reaches the target at least 3x sooner than each TRL recipe (the lower bound), with no more peak
memory than the lowest TRL run; the sampler 1.5x the fp32 sampler's responses per second with at most 0.01 nats
per token of KL from it; the start's standard error at most 0.05; two or more seeds.
Run from the repository root: `.venv/bin/python -m benchmarks.sentiment_rlhf [--systems a,b] [--seeds 1,2]
[--lock /tmp/cpu.lock]`.
"""

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from benchmarks.common import ROOT, cpu_lock, new_run_dir, run_child, save_result
from benchmarks.limits import (decode_matmul_rate, matmul_peak, memory_bandwidth, model_shape, sampling_fractions,
                               update_flops)
from benchmarks.sampler import compare_forms
from benchmarks.verdict import lower_bound_speedup, reference_start, seconds_to, spread

from minirlhf.models.pretrained import smollm2_path
from minirlhf.models.rewards import RewardConfig
from minirlhf.pipeline import load_classifier
from minirlhf.precision import measured
from minirlhf.rundir import RunDir
from minirlhf.runtime import configure_process

SHARED = ROOT.parent / "shared" / "data" / "imdb"
TEMPLATE = "Continue this movie review: {}"
PPO = ["--ppo_epochs=2", "--minibatch_size=8", "--train.lr=3e-5", "--kl_coef=0.15", "--kl_target=6",
       "--kl_horizon=1000",
       "--target_kl=0.1"]
GRPO = ["--group_size=4", "--ppo_epochs=1", "--minibatch_size=16", "--train.lr=3e-5", "--kl_coef=0.04"]  # as TRL's run
FOUR_UPDATES = ["--ppo_epochs=2", "--minibatch_size=8"]  # 2 passes of 2 minibatches per batch, as TRL's 4-update run
SYSTEMS = {
    "minirlhf_ppo_full": ["ppo", *PPO, "--policy_options.freeze_layers=0"],  # RL's default freezes a third
    "minirlhf_ppo_shared_trunk": ["ppo", *PPO, "--policy_options.freeze_layers=15"],
    "minirlhf_grpo": ["grpo", *GRPO, "--policy_options.freeze_layers=0"],
    "minirlhf_grpo_shared_trunk": ["grpo", *GRPO, "--policy_options.freeze_layers=15"],
    "minirlhf_grpo_shared_trunk_head_4_updates": ["grpo", *GRPO, *FOUR_UPDATES, "--policy_options.freeze_layers=15",
                                                  "--policy_options.train_head"],
    **{f"minirlhf_grpo_frozen{n}_4_updates": ["grpo", *GRPO, *FOUR_UPDATES, f"--policy_options.freeze_layers={n}"]
       for n in (0, 5, 10, 15)},  # the sweep: how many blocks to freeze (15: the shared trunk of earlier sittings)
    # twice the responses a step (8 openings x 4) where sampling is cheap, in the same 4 minibatch updates a batch
    "minirlhf_grpo_frozen15_4_updates_32_responses": ["grpo", *GRPO, "--ppo_epochs=2", "--minibatch_size=16",
                                                      "--policy_options.freeze_layers=15", "--batch_size=32"],
}
SWEEP = [k for k in SYSTEMS if k.startswith("minirlhf_grpo_frozen")]
TRL = {"trl_grpo": [], "trl_grpo_4_updates": ["--iterations", "2", "--minibatch", "8"]}
EVAL_PROMPTS = 160  # a mean over 160 openings: its standard error near 0.05 with several samples each


def opening(text: str, words: int = 6) -> str:
    return " ".join(re.sub(r"<br\s*/?>", " ", text).split()[:words])


def write_prompts(work: Path, n_eval: int) -> tuple[Path, Path]:
    def head(name: str, n: int) -> list[dict]:  # split on "\n" only: reviews hold other line separators
        return [json.loads(line) for line in (SHARED / name).read_text().split("\n")[:n]]

    rows, held = head("train.jsonl", 64), head("test.jsonl", n_eval)
    for name, part in (("train", rows), ("eval", held)):
        (work / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": TEMPLATE.format(opening(r["text"]))}) + "\n"
                                                   for r in part))
    return work / "train.jsonl", work / "eval.jsonl"


def classifier() -> Path:
    """The stage-1 classifier on the offline tweets, trained once (demo settings) and reused."""
    path = ROOT / "runs" / "classifier-tweets"
    found = RunDir.find(path)
    if found is None or not found.results.is_file():
        shutil.rmtree(path, ignore_errors=True)  # unfinished, or made before runs recorded their kind
        with contextlib.redirect_stdout(sys.stderr):  # stdout is for the JSON report
            load_classifier(RewardConfig(classifier=str(path), train_missing=True), "cpu")
    return path


def minirlhf_result(out: Path, shape: dict, bandwidth: float, peak: float, decode: float) -> dict:
    """Per-step times, held-out checks, memory, and the sampling and update phases against the machine's limits
    (the first step, which warms up, left out, as TRL's)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] > 0]
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    per_step = sum(r["time/rollout_s"] + r["time/update_s"] for r in steps[1:]) / max(1, len(steps) - 1)
    return {"seconds_per_step": per_step,
            "update_seconds_per_step": sum(r["time/update_s"] for r in steps[1:]) / max(1, len(steps) - 1),
            **sampling_fractions(steps[1:], shape, cfg["batch_size"], bandwidth, peak, decode),
            "update_utilisation": update_flops(steps[1:], cfg, shape) / 1e9 / peak,
            "evals": [{"step": r["step"], "train_s": r["time/train_s"], "eval_reward": r["eval/reward"]}
                      for r in rows if "eval/reward" in r],
            "memory": {k: v for k, v in steps[-1].items() if k.startswith("memory/")}}


def command(name: str, seed: int, args, work: Path, prompts: tuple[Path, Path], stop_at: float) -> list[str]:
    train, held = prompts
    out = work / f"{name}@seed{seed}"
    if name in TRL:
        return [sys.executable, "-m", "benchmarks.trl_grpo_runner", "--model", str(smollm2_path()),
                "--prompts", str(train), *(["--eval-prompts", str(held)] if args.eval_every else []),
                "--reward", "benchmarks.sentiment_reward:positive_logit",
                "--steps", str(args.trl_steps), "--num-generations", "4", "--per-step", "16",
                "--max-completion-length", "24", "--lr", "3e-5", "--beta", "0.04", "--threads", "2",
                "--eval-every", str(args.eval_every), "--seed", str(seed), "--stop-at", str(stop_at), "--out", str(out),
                *(["--bf16"] if args.bf16 else []), *TRL[name]]
    algorithm, *flags = SYSTEMS[name]
    return [sys.executable, "-m", "minirlhf", algorithm, "--policy=smollm2", "--reward.classifier_weight=0",
            "--reward.function=benchmarks.sentiment_reward:positive_logit", f"--prompts.file={train}",
            f"--prompts.eval_file={held}", "--batch_size=16", "--response_len=24", f"--steps={args.steps}",
            f"--eval_every={args.eval_every}", f"--save_every={args.steps}", "--sample_every=10", "--device=cpu",
            f"--seed={seed}", f"--out={out}", *flags]  # the system's own flags last: they win


def run_system(name: str, seed: int, cmd: list[str], work: Path, env: dict, limits: dict) -> dict:
    """One system with one seed in a child process (holding the CPU lock, if any, with the limits measured just
    before it: this shared machine's speed drifts)."""
    with cpu_lock(env.get("BENCH_LOCK")):
        limits["matmul_peak_gflops"].append(matmul_peak())
        limits["bandwidth_gbs"].append(memory_bandwidth())
        limits["decode_matmul_gflops"].append(decode_matmul_rate())
        print(f"== {name} seed {seed}", file=sys.stderr, flush=True)
        log = work / f"{name}@seed{seed}.log"
        with log.open("w") as out:
            code, _, wall, peak_mb = run_child(cmd, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
    if code != 0:
        return {"error": f"exit {code}; see {log}", "log_tail": log.read_text()[-800:]}
    if name in TRL:
        out = json.loads(log.read_text().strip().splitlines()[-1])
        result = {"seconds_per_step": out["seconds_per_step"], "evals": out["evals"], "trl_version": out["trl_version"],
                  "precision": out["precision"] + " (the faster of the two on this machine: trl_precision)"}
    else:
        said = re.findall(r"(\w+ passes \(.*?\)$|frozen layers in .*$)", log.read_text(), re.M)
        result = {"out": work / f"{name}@seed{seed}", "precision": "; ".join(said)}
    return result | {"wall_seconds": round(wall, 1), "peak_memory_mb": round(peak_mb)}


def measure_trl_precision(args, work: Path, prompts: tuple[Path, Path], env: dict) -> dict:
    """TRL's precision by measurement, as minirlhf's: its default recipe for 3 steps in fp32 and in bf16 autocast
    (TRL's own default), no evaluation; the one with the shorter seconds per step (steps 2 and 3) is taken."""
    seconds = {}
    for bf16 in (False, True):
        probe = argparse.Namespace(**{**vars(args), "trl_steps": 3, "eval_every": 0, "bf16": bf16})
        cmd = command("trl_grpo", 1, probe, work, prompts, float("inf"))
        cmd[cmd.index("--out") + 1] += f"-precision-{'bf16' if bf16 else 'fp32'}"
        log = work / f"trl-precision-{'bf16' if bf16 else 'fp32'}.log"
        with cpu_lock(env.get("BENCH_LOCK")), log.open("w") as out:
            print(f"== TRL's precision: {'bf16 autocast' if bf16 else 'fp32'}", file=sys.stderr, flush=True)
            code, *_ = run_child(cmd, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
        if code == 0:
            seconds["bf16" if bf16 else "fp32"] = json.loads(log.read_text().strip().splitlines()[-1])["seconds_per_step"]
    faster = min(seconds, key=seconds.get) if seconds else "fp32"
    return {"seconds_per_step": {k: round(v, 2) for k, v in seconds.items()}, "bf16": faster == "bf16",
            "taken": "bf16 autocast" if faster == "bf16" else "fp32"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=14, help="minirlhf's step budget")
    ap.add_argument("--trl-steps", type=int, default=16, help="TRL's step budget (it stops at the target; a seed that "
                    "misses it counts with its whole training time, less than its time to the target)")
    ap.add_argument("--eval-every", type=int, default=2)
    ap.add_argument("--target-rise", type=float, default=1.0, choices=[0.5, 0.75, 1.0])
    ap.add_argument("--seeds", default="1,2", help="every system runs once per seed")
    ap.add_argument("--systems", default=",".join([*SWEEP, *TRL]),
                    help=f"any of {', '.join([*SYSTEMS, *TRL])}")
    ap.add_argument("--eval-prompts", type=int, default=EVAL_PROMPTS, help="held-out openings")
    ap.add_argument("--start", help="start.json of an earlier run on the same openings, instead of measuring again")
    ap.add_argument("--lock", help="a file to flock around each timed part (other jobs on this machine use it too)")
    ap.add_argument("--sampler-freeze", type=int, default=15, help="frozen blocks of the sampler comparison")
    args = ap.parse_args()
    configure_process()  # an entry point that loads models in this process: quiet transformers, offline hub
    torch.set_num_threads(2)
    work = new_run_dir("sentiment-rlhf")
    work.mkdir(parents=True)
    prompts = write_prompts(work, args.eval_prompts)
    os.environ["MINIRLHF_BENCH_CLASSIFIER"] = str(classifier())  # the reward, here (the start) and in every child
    # the children run in the work folder: the repository root on their path, for `benchmarks.sentiment_reward`
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "BENCH_LOCK": args.lock or "",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    if args.start:  # measured by an earlier run with these openings (the measurement is seeded: it repeats)
        start = json.loads(Path(args.start).read_text())
    else:
        with cpu_lock(args.lock):
            start = reference_start([json.loads(x)["prompt"] for x in prompts[1].read_text().splitlines()], 24)
    (work / "start.json").write_text(json.dumps(start))
    print(f"== the reference's reward: {start}", file=sys.stderr, flush=True)
    probe = measured(torch.device("cpu"))  # minirlhf's precision probe, reported
    trl_precision = measure_trl_precision(args, work, prompts, env) if any(k in TRL for k in args.systems.split(",")) \
        and importlib.util.find_spec("trl") else {"bf16": False}
    args.bf16 = trl_precision["bf16"]
    with cpu_lock(args.lock):
        sampler = compare_forms([json.loads(x)["prompt"] for x in prompts[0].read_text().splitlines()],
                                args.sampler_freeze)
    print(f"== the sampler's forms: {sampler}", file=sys.stderr, flush=True)
    target = start["reward"] + args.target_rise
    limits = {"matmul_peak_gflops": [], "bandwidth_gbs": [], "decode_matmul_gflops": []}
    results, seeds = {}, [int(x) for x in args.seeds.split(",")]
    for name in args.systems.split(","):
        if name in TRL and importlib.util.find_spec("trl") is None:
            results[name] = {"skipped": "trl is not installed: .venv/bin/pip install trl==1.16.0"}
            continue
        results[name] = []
        for s in seeds:
            results[name].append(run_system(name, s, command(name, s, args, work, prompts, target), work, env, limits))
            (work / "so_far.json").write_text(json.dumps({"limits": limits, "results": results}, default=str))
    peak, bandwidth, decode = (max(v) for v in limits.values())  # the highest of each: the conservative ratios
    shape = model_shape(smollm2_path())
    for runs in results.values():
        for r in runs if isinstance(runs, list) else []:
            if "out" in r:
                r |= minirlhf_result(r.pop("out"), shape, bandwidth, peak, decode)
    report = {"benchmark": "sentiment_rlhf", "run_dir": str(work.relative_to(ROOT)), "steps": args.steps,
              "trl_steps": args.trl_steps, "seeds": seeds, "start": start, "target_reward": round(target, 3),
              "precision_probe": probe, "trl_precision": trl_precision, "sampler": sampler,
              "sampling_speedup": sampler["sampling_speedup"], "sampler_kl_per_token": sampler["sampler_kl_per_token"],
              **{k: [round(x, 1) for x in v] for k, v in limits.items()}, **summarise(results, target, start, sampler)}
    save_result("sentiment_rlhf", report)
    return 0 if all(report.get("bar", {"ran": False}).values()) else 1


def summarise(results: dict, target: float, start: dict, sampler: dict) -> dict:
    """Seconds of training to the target per system and seed; minirlhf's best system (by its slowest seed)
    against each TRL recipe as the lower bound across seeds; and the bars."""
    ran = {k: v for k, v in results.items() if isinstance(v, list) and all("evals" in r for r in v)}
    times = {k: [seconds_to(target, r["evals"]) for r in v] for k, v in ran.items()}
    report = {"systems": results, "seconds_to_target": {k: spread(t) for k, t in times.items()}}
    ours = {k: t for k, t in times.items() if k.startswith("minirlhf") and all(x is not None for x in t)}
    theirs = {k: t for k, t in times.items() if k in TRL}
    if not (ours and theirs):
        return report
    best = min(ours, key=lambda k: max(ours[k]))
    speedup = {k: lower_bound_speedup(ours[best], t, [r["evals"][-1]["train_s"] for r in ran[k]])
               for k, t in theirs.items()}
    mine, trl_peaks = ran[best], [r["peak_memory_mb"] for k in theirs for r in ran[k]]
    memory_ok = max(r["peak_memory_mb"] for r in mine) <= min(trl_peaks)
    report |= {"best_minirlhf_system": best, "speedup_lower_bound": {k: round(v, 2) for k, v in speedup.items()},
               "no_more_memory_than_trl": memory_ok,
               "trl_reached_target": {k: spread(t)["reached"] for k, t in theirs.items()}}
    report["bar"] = {
        "3x_sooner_than_every_trl_recipe": min(speedup.values()) >= 3, "no_more_memory_than_lowest_trl": memory_ok,
        "sampling>=1.5x_the_fp32_sampler": sampler["sampling_speedup"] >= 1.5,
        "sampler_kl<=0.01_nats_per_token": sampler["sampler_kl_per_token"] <= 0.01,
        "start_se<=0.05": start["se"] <= 0.05, "seeds>=2": len(mine) >= 2}
    return report


if __name__ == "__main__":
    sys.exit(main())
