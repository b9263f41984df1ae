"""What one RL step of minirlhf costs as the model grows, on this machine (2 cores, fp32, CPU).

Llama-architecture models of SmolLM2's shape family with random weights (timing only; a random model never ends
a response early, so every response is `response_len` tokens): SmolLM2-135M's own config, SmolLM2-360M's shape
(hidden 960, 32 layers, 15 heads, 5 kv heads, intermediate 2560) and a ~1.07B member (hidden 2048, 16 layers,
32 heads, 8 kv heads, intermediate 8192), all with the 49152-token vocabulary and tied embeddings. Each is saved
once as a model folder (safetensors and the SmolLM2 tokenizer) under runs/bench-cache/model-size/ and loaded by
the real CLI as `--policy=<folder>`. Each size runs in three modes: `full` (every weight trains, the reference
is a whole second copy), `trunk` (`--policy_options.freeze_layers` = half the blocks: the frozen lower blocks
run once per rollout and are shared by the reference and the updates) and `lora` (rank-16 adapters on every
linear layer; the reference is the model with its adapters off).

Each cell is one child process, `minirlhf grpo` for 2 steps of 16 responses (4 prompts x 4), 24 tokens, with a
trivial length reward (benchmarks/size_reward.py); the times are step 2's (step 1 warms up): sampling
(`time/sample_s` where rl.py logs it, else the whole rollout: sampling, reward and reference pass), update, and
their sum. Peak memory: the child's peak resident memory when step 2 ends (its metrics row; `peak_wait4_mb`, from
os.wait4, agrees: the child is stopped once that row is written, before its final checkpoint). A cell whose
estimated memory exceeds what the machine has available now is not run; the report gives the arithmetic. Per
mode, s/step = a * N^b is fitted by least squares on logs. Prints one JSON object; writes model_size.png to the
run directory, and to docs/ only from a run of every size and mode.

With BENCH_LOCK=FILE it flocks FILE around each model build and each child (do not wrap it in flock): other jobs
that flock FILE do not run beside a timed cell.
Run from the repository root: `.venv/bin/python -m benchmarks.model_size [--sizes 135m,360m,1b] [--modes ...]`.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import matplotlib
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.common import ROOT, cpu_lock, new_run_dir, run_child, save_result

from minirlhf.checkpoint import atomic_dir
from minirlhf.models.pretrained import smollm2_path

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

CACHE = ROOT / "runs" / "bench-cache" / "model-size"
LOCK = os.environ.get("BENCH_LOCK") or None  # a file other jobs on this machine flock too (optional)
SHAPES = {"135m": {},  # SmolLM2-135M's own config
          "360m": dict(hidden_size=960, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5,
                       intermediate_size=2560),
          "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=8192)}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
LORA_RANK = 16
BATCH, GROUP, RESPONSE_LEN = 16, 4, 24
SEQ = 64 + RESPONSE_LEN  # tokens per sequence at most: a chat-templated short prompt, then the response
PROMPTS = ["Tell me about the sea", "Describe a quiet morning", "Write a line about trains", "What is a good breakfast",
           "Explain why the sky is blue", "Give advice to a new cook", "Describe your favourite city",
           "Write a short poem about rain", "What makes a good friend", "Tell a story about a cat",
           "Describe a mountain walk", "Why do people like music", "Write about the first snow",
           "Explain how bread rises", "Describe a busy market", "What should I read next"]
EVAL_PROMPTS = ["Describe a summer evening", "Tell me about rivers", "Write about an old house", "Why read books"]
MODES = ("full", "trunk", "lora")


def say(*what) -> None:
    print(*what, file=sys.stderr, flush=True)


def config_of(size: str) -> LlamaConfig:
    config = LlamaConfig.from_pretrained(smollm2_path())
    for key, value in SHAPES[size].items():
        setattr(config, key, value)
    config.head_dim = config.hidden_size // config.num_attention_heads  # 64 in every member
    return config


def model_folder(size: str) -> Path:
    """A random-init model of this size saved as a folder the CLI loads (cached: built once)."""
    folder = CACHE / f"smollm2-shape-{size}-random"
    if (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    say(f"building {folder.name} (once)")
    with cpu_lock(LOCK), atomic_dir(folder) as tmp:
        torch.manual_seed(0)
        model = LlamaForCausalLM(config_of(size))
        model.save_pretrained(tmp)
        del model
        for name in TOKENIZER_FILES:  # the tokenizer, chat template and end-of-text ids of the shipped SmolLM2
            shutil.copy(smollm2_path() / name, tmp / name)
    return folder


def counts(size: str) -> dict:
    """Parameters of the model, and those each mode trains (GRPO: no value head), by building it on no device."""
    config = config_of(size)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    numel = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731  (tied weights counted once)
    layers, freeze = model.model.layers, config.num_hidden_layers // 2
    linears = [m for m in layers[0].modules() if isinstance(m, torch.nn.Linear)]
    upper = sum(numel(block) for block in layers[freeze:])
    return {"params": numel(model), "freeze_layers": freeze, "layers": config.num_hidden_layers,
            "trainable": {"full": numel(model), "trunk": upper + numel(model.model.norm),
                          "lora": len(layers) * LORA_RANK * sum(m.in_features + m.out_features for m in linears)},
            "upper": upper, "act_per_token_layer": 8 * config.hidden_size + 4 * config.intermediate_size
            + 2 * config.num_key_value_heads * config.head_dim + config.num_attention_heads * SEQ}


def estimate_mb(c: dict, mode: str) -> dict:
    """The child's peak, estimated in MiB (fp32, 4 bytes a number): the weights, the reference's own weights
    (full: a whole copy; trunk: the upper blocks; LoRA: none), a gradient and Adam's two moments per trainable
    parameter, the activations the update keeps (the blocks gradients flow through, for a minibatch of 16
    sequences), the logits with their log-softmax and gradient, and ~1 GiB of Python, torch and transformers."""
    trained = c["trainable"][mode]
    ref = {"full": c["params"], "trunk": c["upper"], "lora": 0}[mode]
    grad_layers = c["layers"] - (c["freeze_layers"] if mode == "trunk" else 0)
    parts = {"weights": 4 * c["params"], "reference": 4 * ref, "grads_and_adam": 12 * trained,
             "activations": 4 * BATCH * SEQ * grad_layers * c["act_per_token_layer"],
             "logits": 4 * 4 * BATCH * SEQ * 49152, "runtime": 2**30}
    return {k: round(v / 2**20) for k, v in parts.items()} | {"total": round(sum(parts.values()) / 2**20)}


def available_mb() -> float:
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return int(meminfo["MemAvailable"].split()[0]) / 1024


def write_prompts(work: Path) -> tuple[Path, Path]:
    for name, rows in (("train", PROMPTS), ("eval", EVAL_PROMPTS)):
        (work / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in rows))
    return work / "train.jsonl", work / "eval.jsonl"


def mode_args(mode: str, c: dict) -> list[str]:
    return {"full": ["--policy_options.freeze_layers=0"],  # RL's default freezes a third
            "trunk": [f"--policy_options.freeze_layers={c['freeze_layers']}"],
            "lora": [f"--policy_options.lora_rank={LORA_RANK}"]}[mode]


def last_row(metrics: Path, step: int) -> dict | None:
    """The metrics row of `step` once it is written whole (the CLI flushes each line), else None."""
    text = metrics.read_text() if metrics.is_file() else ""
    rows = [json.loads(line) for line in text.split("\n")[:-1]]  # the part after the last newline may be half a row
    return next((r for r in rows if r["step"] == step), None)


def run_cell(name: str, folder: Path, args: list[str], work: Path, prompts: tuple[Path, Path], steps: int) -> dict:
    train, held = prompts
    cmd = [sys.executable, "-m", "minirlhf", "grpo", f"--policy={folder}", *args,
           "--reward.classifier_weight=0", "--reward.function=benchmarks.size_reward:length", f"--prompts.file={train}",
           f"--prompts.eval_file={held}", f"--prompts.max_eval={len(EVAL_PROMPTS)}", f"--batch_size={BATCH}",
           f"--group_size={GROUP}", f"--response_len={RESPONSE_LEN}", f"--steps={steps}", f"--save_every={steps}",
           "--sample_every=1000", "--device=cpu", "--dtype=fp32", f"--out={work / name}"]
    # the child runs in the repository root (run_child's cwd), where `benchmarks.size_reward` imports
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    say(f"== {name}")
    metrics = work / name / "metrics.jsonl"
    # The caller holds the CPU lock. The child is stopped once its last step's row is written (exit code 0): its
    # final checkpoint (GBs of weights and Adam state, which safetensors serialises through a whole copy in memory)
    # and held-out evaluation are not what this measures; after 10 minutes it is stopped with exit code 124 (a
    # locked job stays well under the machine's 12-minute rule).
    with (work / f"{name}.log").open("w") as log:
        code, _, wall, peak_mb = run_child(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, poll_s=0.5,
                                           until=lambda: last_row(metrics, steps) is not None, timeout_s=600)
    for part in (work / name).glob("*checkpoint*"):  # a checkpoint stopped half-written, if any
        shutil.rmtree(part, ignore_errors=True)
    if code != 0:
        return {"error": f"exit {code}; see {work / name}.log", "log_tail": (work / f"{name}.log").read_text()[-800:]}
    first, last = last_row(metrics, 1), last_row(metrics, steps)
    sample_key = "time/sample_s" if "time/sample_s" in last else "time/rollout_s"
    return {"sample_s": round(last[sample_key], 2), "sample_s_is": sample_key,
            "rollout_s": round(last["time/rollout_s"], 2), "update_s": round(last["time/update_s"], 2),
            "prompt_tokens": last.get("sample/prompt_len"),
            "step_s": round(last["time/rollout_s"] + last["time/update_s"], 2),
            "warmup_step_s": round(first["time/rollout_s"] + first["time/update_s"], 2),
            "peak_mb": round(last["memory/peak_rss_mb"]), "peak_wait4_mb": round(peak_mb), "wall_s": round(wall, 1),
            "memory_mb": {k.split("/")[1].removesuffix("_mb"): round(v) for k, v in last.items()
                          if k in ("memory/params_mb", "memory/grads_mb", "memory/optimizer_mb")}}


def cell(size: str, mode: str, c: dict, work: Path, prompts: tuple[Path, Path], steps: int) -> dict:
    """One size x mode: run, or, when its estimated peak exceeds the memory available now, say why not."""
    est = estimate_mb(c, mode)
    head = {"params": c["params"], "trainable_params": c["trainable"][mode], "estimated_peak_mb": est["total"]}
    if mode == "trunk":
        head["freeze_layers"] = c["freeze_layers"]
    with cpu_lock(LOCK):  # one hold for the memory check and the run: no other heavy job starts in between
        free = available_mb()
        if est["total"] > free - 1024:  # 1 GiB spare for the rest of the machine
            terms = " + ".join(f"{k} {v}" for k, v in est.items() if k != "total")
            return head | {"skipped": f"does not fit: estimated peak {terms} = {est['total']} MiB > {free:.0f} MiB "
                                      "available now - 1024 spare"}
        # the folder is built (main), so model_folder does not take the lock again, which would wait on this hold
        return head | run_cell(f"{size}-{mode}", model_folder(size), mode_args(mode, c), work, prompts, steps)


def fit(cells: dict) -> dict:
    """Per mode, s/step = a * N^b by least squares on (log N, log s); with the 1B prediction."""
    out = {}
    for mode in MODES:
        pts = [(r["params"], r["step_s"]) for k, r in cells.items() if k.endswith("-" + mode) and "step_s" in r]
        if len(pts) < 2:
            continue
        xs, ys = [math.log(n) for n, _ in pts], [math.log(s) for _, s in pts]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        a = math.exp(my - b * mx)
        out[mode] = {"a": float(f"{a:.4g}"), "b": round(b, 3), "points": len(pts)}
    return out


def plot(cells: dict, fits: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for mode, colour in zip(MODES, ("tab:red", "tab:blue", "tab:green")):
        pts = sorted((r["params"], r["step_s"]) for k, r in cells.items() if k.endswith("-" + mode) and "step_s" in r)
        if not pts:
            continue
        label = mode + (f": s = {fits[mode]['a']:.3g}·N^{fits[mode]['b']:.2f}" if mode in fits else "")
        ax.plot(*zip(*pts), "o-", color=colour, label=label)
        for k, r in cells.items():  # a cell that did not fit: the fit's prediction, hollow
            if k.endswith("-" + mode) and "skipped" in r and mode in fits:
                guess = fits[mode]["a"] * r["params"] ** fits[mode]["b"]
                ax.plot([pts[-1][0], r["params"]], [pts[-1][1], guess], ":", color=colour)
                ax.plot(r["params"], guess, "o", mfc="none", color=colour,
                        label=f"{mode} {k.split('-')[0]}: does not fit (fit's guess)")
    ax.set(xscale="log", yscale="log", xlabel="parameters", ylabel="seconds per GRPO step (16 x 24 tokens)",
           title="minirlhf: one RL step vs model size (2 CPU cores, fp32)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=",".join(SHAPES))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--steps", type=int, default=2, help="steps per cell; the last one is reported")
    args = ap.parse_args()
    t0 = time.time()
    work = new_run_dir("model-size")
    work.mkdir(parents=True)
    prompts = write_prompts(work)
    cells = {}
    for size in args.sizes.split(","):
        c = counts(size)
        model_folder(size)
        for mode in args.modes.split(","):
            cells[f"{size}-{mode}"] = cell(size, mode, c, work, prompts, args.steps)
            say(json.dumps({f"{size}-{mode}": cells[f"{size}-{mode}"]}))
    fits = fit(cells)
    for key, r in cells.items():  # what the fit predicts for a cell that could not run
        mode = key.split("-")[1]
        if "skipped" in r and mode in fits:
            r["fitted_step_s"] = round(fits[mode]["a"] * r["params"] ** fits[mode]["b"], 1)
    plot(cells, fits, work / "model_size.png")
    whole = args.sizes == ",".join(SHAPES) and args.modes == ",".join(MODES)
    if whole and (ROOT / "docs").is_dir():  # a partial run keeps its figure in its run folder, never over the docs'
        shutil.copy(work / "model_size.png", ROOT / "docs" / "model_size.png")
    report = {"benchmark": "model_size", "run_dir": str(work.relative_to(ROOT)),
              "machine": f"{os.cpu_count()} cores, 2 torch threads, fp32, each child under the lock {LOCK}",
              "batch": f"{BATCH} responses ({BATCH // GROUP} prompts x {GROUP}), {RESPONSE_LEN} tokens, GRPO, "
                       f"step {args.steps} of {args.steps} timed",
              "cells": cells, "fit_seconds_per_step": fits, "wall_seconds": round(time.time() - t0),
              "seconds_in_children": round(sum(r.get("wall_s", 0) for r in cells.values()))}
    (work / "results.json").write_text(json.dumps(report, indent=2))
    save_result("model_size", report)
    return 0 if all("error" not in r for r in cells.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
