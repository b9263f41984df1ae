"""Train a causal LM with TRL's GRPOTrainer on CPU, for comparison with minirlhf's own GRPO.

Needs TRL, installed only for the benchmark, as an optional extra:
    .venv/bin/pip install trl==1.16.0      (adds trl only; torch/transformers/accelerate/datasets unchanged)

Settings kept equal to minirlhf: fp32, or with --bf16 bf16 autocast (TRL's own default; the benchmark measures both
and takes the faster), no vLLM, temperature 1.0, a generation batch of --per-step completions (prompts x
--num-generations) per step, used for --iterations passes of --minibatch completions per optimizer
step (default one optimizer step per batch), DAPO token-mean loss, k3 KL with weight --beta,
Adam (no weight decay) at a constant learning rate, gradient norm clipped to 1, chat template applied.

A "step" below is one generation batch, as in minirlhf, whatever the optimizer steps it takes.
Run as `.venv/bin/python -m benchmarks.trl_grpo_runner --model ... --reward benchmarks.sentiment_reward:positive_logit
...` (benchmarks/sentiment_rlhf.py runs it so, in a run folder, with the repository root on PYTHONPATH).
Writes DIR/steps.jsonl (step, seconds since training began, mean reward) and prints one JSON line:
trl_version, steps, seconds_per_step (mean over steps after the first), total_seconds, peak_memory_mb,
rewards (per step) and, with --eval-prompts, eval_reward (one sampled completion per prompt, after training).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import argparse
import contextlib
import importlib
import json
import resource
import sys
import time
from pathlib import Path

import torch
import trl
from datasets import Dataset
from transformers import AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer


def read_prompts(path: str) -> list[str]:
    return [json.loads(line)["prompt"] for line in Path(path).read_text().splitlines() if line.strip()]


def load_reward(spec: str):
    """`module:function` with f(prompts: list[str], completions: list[str]) -> list[float], wrapped for TRL; the
    module importable here (`-m` puts the working directory on the path; PYTHONPATH the rest)."""
    module, _, name = spec.partition(":")
    fn = getattr(importlib.import_module(module), name)

    def text(x):  # conversational samples come as [{"role": ..., "content": ...}, ...]
        return x if isinstance(x, str) else x[-1]["content"]

    def reward(prompts, completions, **kwargs):
        return [float(r) for r in fn([text(p) for p in prompts], [text(c) for c in completions])]

    reward.__name__ = name
    return fn, reward


class StepTimer(TrainerCallback):
    """Training time at each step end (held-out evaluations excluded) and TRL's logged mean reward, appended to
    steps.jsonl; with `evaluate`, the held-out reward before training and every `every` steps."""

    def __init__(self, path: Path, evaluate=None, every: int = 0, updates: int = 1, stop_at: float | None = None):
        self.path, self.times, self.rewards, self.evals, self.updates = path, [], [], [], updates
        self.stop_at = stop_at
        self.evaluate, self.every, self.paused = evaluate, every, 0.0
        path.write_text("")

    def _eval(self, step: int, model) -> None:
        t = time.perf_counter()
        with torch.random.fork_rng():  # evaluating must not change the random stream training samples from
            reward = self.evaluate(model)
        model.train()
        self.evals.append({"step": step, "train_s": round(t - self.t0 - self.paused, 3), "eval_reward": reward})
        self.paused += time.perf_counter() - t

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.t0 = time.perf_counter()
        if self.evaluate and self.every:
            self._eval(0, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.updates:  # within a generation batch
            return
        self.times.append(time.perf_counter() - self.t0 - self.paused)
        step = state.global_step // self.updates
        if self.evaluate and self.every and step % self.every == 0:
            self._eval(step, model)
            if self.stop_at is not None and self.evals[-1]["eval_reward"] >= self.stop_at:
                control.should_training_stop = True  # past the benchmark's target: the rest would not count

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "reward" in logs:  # logged at the first update of each generation batch
            self.rewards.append(logs["reward"])
            seconds = time.perf_counter() - self.t0 - self.paused
            with self.path.open("a") as f:
                f.write(json.dumps({"step": -(-state.global_step // self.updates), "seconds": round(seconds, 3),
                                    "reward": logs["reward"], "kl": logs.get("kl")}) + "\n")


@torch.no_grad()
def eval_reward(model, tok, fn, prompts: list[str], max_new: int, seed: int, batch: int = 64) -> float:
    torch.manual_seed(seed)
    model.eval()
    tok.padding_side = "left"
    scores = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i: i + batch]
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                 for p in chunk]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new,
                             pad_token_id=tok.pad_token_id)
        completions = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        scores += [float(r) for r in fn(chunk, completions)]
    return sum(scores) / len(scores)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--reward", required=True, help="module:function(prompts, completions) -> list[float]")
    ap.add_argument("--steps", type=int, default=10, help="generation batches")
    ap.add_argument("--num-generations", type=int, default=4)
    ap.add_argument("--per-step", type=int, default=16, help="completions per optimizer step")
    ap.add_argument("--iterations", type=int, default=1, help="passes over each generation batch (num_iterations)")
    ap.add_argument("--minibatch", type=int, default=0, help="completions per optimizer step (0: --per-step)")
    ap.add_argument("--max-completion-length", type=int, default=24)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    ap.add_argument("--eval-prompts")
    ap.add_argument("--eval-every", type=int, default=0, help="held-out reward before training and every N steps")
    ap.add_argument("--stop-at", type=float, help="stop once a held-out check reaches this reward")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 weights), as TRL's default")
    a = ap.parse_args()
    minibatch = a.minibatch or a.per_step
    updates = a.iterations * (a.per_step // minibatch)  # optimizer steps per generation batch
    if a.per_step % a.num_generations or a.per_step % minibatch:
        ap.error("--per-step must be a multiple of --num-generations and of --minibatch")
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in read_prompts(a.prompts)])
    fn, reward = load_reward(a.reward)
    cfg = GRPOConfig(
        output_dir=str(out), max_steps=a.steps * updates, learning_rate=a.lr, lr_scheduler_type="constant", weight_decay=0.0,
        per_device_train_batch_size=minibatch, gradient_accumulation_steps=1,
        steps_per_generation=a.per_step // minibatch, num_iterations=a.iterations, num_generations=a.num_generations, max_completion_length=a.max_completion_length,
        temperature=1.0, top_p=1.0, top_k=0, beta=a.beta, loss_type="dapo", max_grad_norm=1.0,
        use_vllm=False, use_cpu=True, bf16=a.bf16, fp16=False, gradient_checkpointing=False,
        model_init_kwargs={"dtype": torch.float32}, seed=a.seed, data_seed=a.seed,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0)
    tok = AutoTokenizer.from_pretrained(a.model)
    evaluate = None
    if a.eval_prompts:
        held_out = read_prompts(a.eval_prompts)
        evaluate = lambda model: eval_reward(model, tok, fn, held_out, a.max_completion_length, a.seed)  # noqa: E731
    timer = StepTimer(out / "steps.jsonl", evaluate, a.eval_every, updates, a.stop_at)
    trainer = GRPOTrainer(model=a.model, reward_funcs=reward, args=cfg, train_dataset=dataset, callbacks=[timer])
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its logs; stdout keeps one JSON line
        trainer.train()
    total = time.perf_counter() - t0

    gaps = [b - t for t, b in zip(timer.times, timer.times[1:])]
    result = {"trl_version": trl.__version__, "precision": "bf16 autocast" if a.bf16 else "fp32", "steps": len(timer.times),
              "seconds_per_step": sum(gaps) / len(gaps) if gaps else timer.times[0],
              "total_seconds": total, "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "rewards": timer.rewards, "evals": timer.evals}
    if evaluate is not None:
        result["eval_reward"] = evaluate(trainer.model)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
