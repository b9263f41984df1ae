"""What a checkpoint of an RL run holds, and how a run resumes from it (`minirlhf ppo --resume RUN_DIR`).

RUN_DIR/checkpoint/ is one folder, replaced as a whole (atomic_dir), holding:
- policy/ (and value_model/ for a separate critic): loadable models, safetensors (LoRA: the adapters);
- trainer_state.safetensors: the optimizer's tensors and torch's RNG state;
- state.json: step, algorithm, starting policy, KL coefficient, reward moments, the optimizer's scalars.
The prompts and sampling seeds of step s derive from (seed, s), so the step is the data position, and a
resumed run repeats exactly what the uninterrupted run did (CPU; tested with SIGKILL).
"""

from __future__ import annotations

from pathlib import Path

import torch

from minirlhf import UserError
from minirlhf.checkpoint import (atomic_dir, load_json, load_optimizer_state, load_weights, optimizer_state,
                                 save_json, save_weights)
from minirlhf.models.policy import load_policy
from minirlhf.rewards import RunningMoments


def samples_so_far(run_dir: Path, cfg, last_step: int) -> str:
    """samples.md's tables up to `last_step` (all that a resumed run keeps)."""
    text = f"# Sample responses during {cfg.algorithm} training\n"
    path = run_dir / "samples.md"
    if last_step > 0 and path.is_file():
        head, *sections = path.read_text(encoding="utf-8").split("\n## step ")
        text = head + "".join(f"\n## step {s}" for s in sections if int(s.split("\n", 1)[0]) <= last_step)
    return text


def save_checkpoint(run_dir: Path, cfg, step: int, models, optimizer, kl_ctl, reward, train_s: float = 0.0) -> None:
    """One folder, replaced as a whole: the policy (and critic) as loadable models, the optimizer and RNG
    state as safetensors, the rest as JSON. A crash while writing leaves the previous checkpoint intact."""
    tensors, optimizer_meta = optimizer_state(optimizer)
    with atomic_dir(run_dir / "checkpoint") as tmp:
        models.policy.save(tmp / "policy")
        if models.value_model is not None:
            models.value_model.save(tmp / "value_model")
        save_weights({**{f"optimizer.{k}": v for k, v in tensors.items()}, "rng.torch": torch.get_rng_state()},
                     tmp / "trainer_state.safetensors")
        save_json({"algorithm": cfg.algorithm, "step": step, "policy_from": cfg.policy, "kl_coef": kl_ctl.value,
                   "reward_moments": reward.moments.state() if reward.moments else None,
                   "train_s": train_s, "optimizer": optimizer_meta}, tmp / "state.json")


def restore(run_dir: Path, cfg, models, optimizer, kl_ctl, reward, device) -> tuple[int, float]:
    """Load RUN_DIR/checkpoint into freshly set-up models and optimizer; returns the step it was taken at
    and the training seconds spent until then.
    The reference stays the starting policy: it is never saved, always rebuilt from `cfg.policy`."""
    folder = run_dir / "checkpoint"
    previous = run_dir / ".checkpoint.old"  # a crash between atomic_dir's two renames leaves only this
    if not folder.exists() and (previous / "state.json").is_file():
        previous.rename(folder)
    state = load_json(folder / "state.json")
    if state.get("algorithm") != cfg.algorithm or state.get("policy_from") != cfg.policy:
        raise UserError(f"{folder} holds a {state.get('algorithm')} run of {state.get('policy_from')!r}, not "
                        f"{cfg.algorithm} of {cfg.policy!r}; resume it with its own command")
    tensors = load_weights(folder / "trainer_state.safetensors")
    options = cfg.policy_options.as_kwargs() | {"keep_adapters": True}  # a LoRA checkpoint resumes as adapters
    for model, name in ((models.policy, "policy"), (models.value_model, "value_model")):
        if model is not None:
            saved = load_policy(str(folder / name), device, value_head=model.value_head is not None, **options)
            try:
                model.load_state_dict(saved.state_dict())
            except RuntimeError as e:
                raise UserError(f"{folder / name} does not fit {cfg.policy!r} ({str(e).splitlines()[0][:120]})") from None
    try:
        load_optimizer_state(optimizer, {k[len("optimizer."):]: v for k, v in tensors.items()
                                         if k.startswith("optimizer.")}, state["optimizer"], folder)
        torch.set_rng_state(tensors["rng.torch"])
        kl_ctl.value, step = float(state["kl_coef"]), int(state["step"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{folder} is incomplete ({e!r} missing or malformed); resume from an intact run") from None
    if reward.moments is not None and state.get("reward_moments"):
        reward.moments = RunningMoments(**state["reward_moments"])
    return step, float(state.get("train_s", 0.0))
