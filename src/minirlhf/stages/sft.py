"""Supervised fine-tuning (SFT), the first stage of the InstructGPT recipe (Ouyang et al., 2022) and the step the
DPO paper takes before DPO: maximise the likelihood of given responses, the loss on response tokens only.

`minirlhf sft --policy smollm2|MODEL|RUN --data examples.jsonl` reads the forms of data/sft.py, puts each prompt to
an instruct model through its chat template (as RL and DPO do), and saves the policy as a transformers folder (an
LSTM as a generator folder) that every `--policy` accepts. Held-out loss and perplexity before, every `eval_every`
steps and at the end. The lifecycle (checkpoints, --resume, results) is the shared runner's: `SFTJob`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minirlhf import ConfigError, runner
from minirlhf.report import before_after, md_cell, plot_links, section, table, write_report
from minirlhf.config import MicroBatchOptimConfig, SplitConfig, TrainingRunConfig, setting
from minirlhf.data.sft import Example, read_examples, split_examples
from minirlhf.models.load import PolicyOptions, load_policy, record_frozen
from minirlhf.stages.policy_job import PolicyJob
from minirlhf.training import EpochPlan, backward, clipped_step, make_optimizer, shuffled_batches


@dataclass
class SFTTrainConfig(MicroBatchOptimConfig):
    batch_size: int = 8
    """examples per optimizer step"""
    lr: float = 2e-5


@dataclass
class SFTConfig(SplitConfig, TrainingRunConfig):
    policy: str = setting("smollm2", fixed_on_resume=True)
    """the policy to fine-tune: a causal LM folder or hub name, `smollm2`, or a generator, RL, DPO or SFT run"""
    policy_options: PolicyOptions = setting(default_factory=PolicyOptions, fixed_on_resume=True)
    """how a causal LM policy is set up (freeze_layers, LoRA, chat template)"""
    data: str = setting("", fixed_on_resume=True)
    """examples: a .jsonl file or hf:NAME[:split] of {"prompt", "response"}, {"messages"}, {"text"} or preference
    pairs (their chosen side)"""
    max_eval: int | None = 200
    train: SFTTrainConfig = field(default_factory=SFTTrainConfig)
    """the optimiser and the passes over the examples"""
    max_prompt_tokens: int = setting(256, ge=1)
    """tokens per prompt (after any chat template); a longer prompt keeps its end"""
    max_response_tokens: int = setting(256, ge=1)
    """tokens per response, end-of-text included; a longer response is cut"""
    eval_every: int = setting(20, ge=0)
    """log the held-out loss and perplexity every this many steps (0: only before training and at the end)"""
    save_every: int = 100
    samples: int = setting(4, ge=0)
    """held-out prompts the trained policy answers in report.md (0: none)"""


def sft_loss(logprobs: torch.Tensor, mask: torch.Tensor, denominator: torch.Tensor | float | None = None) -> torch.Tensor:
    """Negative log-likelihood of the response tokens: -sum(logprobs * mask) / denominator (default: the number of
    response tokens, a mean per token). logprobs and mask (B, T): the log-probs of the given response tokens under
    the policy, and 1 on them (0 on padding)."""
    total = -(logprobs * mask).sum()
    return total / (mask.sum().clamp(min=1) if denominator is None else denominator)


def load_examples(cfg: SFTConfig) -> tuple[list[Example], list[Example]]:
    if not cfg.data:
        raise ConfigError("sft needs examples: pass --data FILE.jsonl of {\"prompt\", \"response\"}, {\"messages\"} "
                          "or {\"text\"} lines")
    examples = read_examples(cfg.data)
    if cfg.eval_file is not None:
        return examples[: cfg.max_train], read_examples(cfg.eval_file, "--eval_file")[: cfg.max_eval]
    train, held = split_examples(examples, cfg.eval_fraction, cfg.split_seed)
    return train[: cfg.max_train], held[: cfg.max_eval]


class SFTJob(PolicyJob):
    """SFT as a job of the shared runner: one step batch of examples per step, gradients accumulated over its
    micro-batches, the loss a mean over the step's response tokens."""

    stage, name, kept = "sft", "sft", ("before",)
    progress_keys = {"loss": "loss"}

    def __init__(self, cfg: SFTConfig):
        self.cfg, self.base, self.last = cfg, cfg.policy, {}
        self.before = None  # the held-out figures before training (kept by the checkpoint for a resumed run)

    def setup(self, run: runner.Run) -> None:
        cfg, self.run = self.cfg, run
        self.train_set, self.eval_set = load_examples(cfg)
        self.policy = load_policy(cfg.policy, run.device, value_head=False, **cfg.policy_options.as_kwargs())
        record_frozen(self.policy, cfg.policy_options, run.say)
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        if not self.params:
            raise ConfigError("the policy has no trainable parameters; lower policy_options.freeze_layers")
        self.plan = EpochPlan(shuffled_batches(len(self.train_set), cfg.train.batch_size), cfg.train.epochs, cfg.seed)
        self.steps = self.plan.steps
        self.optimizer, self.scheduler = make_optimizer(self.params, cfg.train, self.steps)
        run.say(f"sft: policy {cfg.policy} ({self.policy.kind}), {len(self.train_set)} training and "
                f"{len(self.eval_set)} held-out examples; {self.steps} steps of {cfg.train.batch_size}")

    def _rollouts(self, examples: list[Example]):
        """Teacher-forced rollouts of the examples, micro_batch_size at a time."""
        cfg, k = self.cfg, self.cfg.train.micro_batch_size
        for i in range(0, len(examples), k):
            chunk = examples[i: i + k]
            yield self.policy.teacher_forced([e.prompt for e in chunk], [e.response for e in chunk],
                                             cfg.max_prompt_tokens, cfg.max_response_tokens)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """`eval/loss` (per response token) and `eval/perplexity` on the held-out examples."""
        nll, tokens = 0.0, 0.0
        for rollout in self._rollouts(self.eval_set):
            logprobs = self.policy(rollout, entropy=False)[0]
            nll += sft_loss(logprobs, rollout.response_mask, 1.0).item()
            tokens += rollout.response_mask.sum().item()
        loss = nll / max(tokens, 1)
        return {"eval/loss": loss, "eval/perplexity": math.exp(loss)}

    def begin(self, run: runner.Run) -> dict:
        if self.before is None:
            self.before = self.evaluate()
        return self.before

    def step(self, step: int) -> dict | None:
        cfg, t0 = self.cfg, time.time()
        _, idx, _ = self.plan.at(step)
        batch = [self.train_set[i] for i in idx]
        rollouts = list(self._rollouts(batch))
        tokens = sum(r.response_mask.sum() for r in rollouts).clamp(min=1)  # the whole step's: one mean over it
        self.optimizer.zero_grad(set_to_none=True)
        loss = 0.0
        for rollout in rollouts:
            part = sft_loss(self.policy(rollout, entropy=False)[0], rollout.response_mask, tokens)
            backward(part)
            loss += part.item()
        row = {"loss": loss, "lr": self.scheduler.get_last_lr()[0]}
        row |= {"grad_norm": clipped_step(self.params, self.optimizer, self.scheduler, cfg.train.max_grad_norm),
                "time/step_s": time.time() - t0}
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == self.steps:
            self.last = self.evaluate()
            row |= self.last
        return row if step % cfg.train.log_every == 0 or "eval/loss" in row else None

    def modules(self) -> list:
        return [self.policy]

    def finish(self, run: runner.Run) -> dict:
        run.metrics.plot(run.dir.plot("loss"), ["loss", "eval/loss"], "SFT loss per response token")
        after = self.last or self.evaluate()
        prompts = sorted({e.prompt for e in self.eval_set}, key=len)[: self.cfg.samples]
        gen = torch.Generator(device=run.device).manual_seed(self.cfg.seed)
        answers = self.policy.sample(prompts, self.cfg.max_response_tokens, gen).texts if prompts else []
        return {"examples_train": len(self.train_set), "examples_eval": len(self.eval_set), "steps": self.steps,
                "before": self.before, "after": after,
                "samples": [{"prompt": p, "policy": a} for p, a in zip(prompts, answers)]}

    def report(self, run: runner.Run, results: dict) -> None:
        b, a = results["before"], results["after"]
        write_report(run.dir, f"SFT run `{run.dir}`",
                     f"Policy `{self.cfg.policy}`, data `{self.cfg.data}`: {results['examples_train']} training and "
                     f"{results['examples_eval']} held-out examples.",
                     before_after([("loss per response token", f"{b['eval/loss']:.4f}", f"{a['eval/loss']:.4f}"),
                                   ("perplexity", f"{b['eval/perplexity']:.2f}", f"{a['eval/perplexity']:.2f}")],
                                  "before", "after"),
                     plot_links(run.dir, ["loss"]),
                     section("Samples", table(["prompt", "policy (after)"],
                                              [[md_cell(s["prompt"]), md_cell(s["policy"])] for s in results["samples"]])))
        run.say(f"held-out loss per response token {b['eval/loss']:.3f} -> {a['eval/loss']:.3f}, perplexity "
                f"{b['eval/perplexity']:.1f} -> {a['eval/perplexity']:.1f}")


def train(cfg: SFTConfig, resume: str | Path | None = None, overwrite: bool = False) -> Path | None:
    """Fine-tune the policy on the examples; returns the run directory."""
    return runner.run(SFTJob(cfg), cfg, resume, overwrite)
