"""Loading a policy by what the user names: a run that trained one, a policy folder, a model folder or a hub name.

A run says what it is (run.json, through RunDir), and a policy folder says what kind of policy it holds
(policy.json: `lstm` or `causal_lm`); a folder without policy.json is a transformers model folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from pathlib import Path

from minirlhf import RunError
from minirlhf.checkpoint import load_json
from minirlhf.config import setting
from minirlhf.models.causal_lm import CausalLMPolicy
from minirlhf.models.lstm import load_generator
from minirlhf.models.policy import LSTMPolicy, load_value_head
from minirlhf.registry import noun
from minirlhf.rundir import RunDir


@dataclass
class PolicyOptions:
    chat_template: bool | None = None
    """put each prompt to an instruct model as a user turn of its chat template (causal LMs that have one); None: as
    the starting policy was trained (its policy.json), on for a model folder or name"""
    freeze_layers: int | None = setting(None, ge=0)
    """freeze the embeddings (and a tied LM head) and this many lowest transformer layers (causal LMs); the
    reference and a separate critic share them, and their output is computed once per rollout. None: the stage's
    default, recorded in the run's config: RL freezes the lowest third of the blocks (the sweep's winner,
    docs/scaling.md) unless LoRA trains the model; DPO and SFT freeze none"""
    lora_rank: int = setting(0, ge=0)
    """train LoRA adapters of this rank (peft) instead of the weights; the reference is the model with its
    adapters off, so no second copy (causal LMs; 0: off)"""
    lora_alpha: float = setting(16.0, gt=0)
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_rank)"""
    gradient_checkpointing: bool = False
    """keep only each trainable block's input in the update's forward pass and recompute the block in the backward
    pass: activation memory of one block instead of all, for ~1/3 more compute (causal LMs)"""
    train_head: bool = False
    """train the LM head as weights of its own (untied from the input embeddings, which stay frozen with the lower
    blocks), with the upper blocks (causal LMs)"""
    frozen_form: Literal["auto", "fp32", "bf16", "int8"] = "auto"
    """the form the frozen layers' weights (the frozen blocks', a frozen LM head's) run in, when sampling and in
    every training pass alike: auto takes the fastest this machine measured that keeps the next-token
    distributions within 0.01 nats/token of fp32's (models/frozen_form.py); the run's config records the one taken"""

    def as_kwargs(self) -> dict:
        return dict(chat_template=self.chat_template, freeze_layers=self.freeze_layers, lora_rank=self.lora_rank,
                    lora_alpha=self.lora_alpha, gradient_checkpointing=self.gradient_checkpointing,
                    train_head=self.train_head, frozen_form=self.frozen_form)


def policy_folder(spec: str) -> Path | None:
    """The folder holding a saved policy: the one a run trained, or the folder itself; None for a model name."""
    run = RunDir.find(spec)
    if run is not None:
        folder = run.policy()
        if folder is None:
            raise RunError(f"{spec} is {noun(run.stage)} run with no policy to start from; give a "
                           "generator, RL or DPO run (after its first checkpoint), a model folder, or a model name")
        return folder
    path = Path(spec)
    return path if path.is_dir() else None


def saved_options(folder: Path | None) -> dict:
    """What a policy folder's policy.json records: its kind (`lstm` or `causal_lm`) and, for a causal LM, whether it
    was trained on prompts in its chat template. A plain model folder or name: a causal LM with the template on."""
    saved = {"kind": "causal_lm", "chat_template": True}
    if folder is not None and (folder / "policy.json").is_file():
        saved |= load_json(folder / "policy.json")
    return saved


def policy_kind(folder: Path | None) -> str:
    """`lstm` or `causal_lm`, as the folder's policy.json says (a plain model folder or name: `causal_lm`)."""
    return saved_options(folder)["kind"]


def load_policy(spec: str, device, value_head: bool = True, **lm_options):
    """A policy from a generator, RL or DPO run (its last checkpoint), a policy or causal LM folder, or a model name
    (`smollm2` for the offline SmolLM2-135M-Instruct). `lm_options` go to CausalLMPolicy; a chat_template left None
    is the saved policy's own, so a policy trained without its template is read back without it; `frozen_form` (fp32
    unless given) is the form of its frozen layers (`CausalLMPolicy.use_frozen_form`); `freeze_layers` None freezes
    `frozen_fraction` of a causal LM's blocks (none under LoRA)."""
    form = lm_options.pop("frozen_form", "fp32")
    folder = policy_folder(spec)
    saved = saved_options(folder)
    if saved["kind"] == "lstm":
        policy = LSTMPolicy(*load_generator(folder, device), value_head=value_head)
    else:
        if lm_options.get("chat_template") is None:
            lm_options["chat_template"] = saved["chat_template"]
        policy = CausalLMPolicy.load(str(folder) if folder is not None else spec, value_head=value_head, **lm_options)
    if folder is not None:
        load_value_head(policy, folder)
    policy = policy.to(device).eval()
    if isinstance(policy, CausalLMPolicy):
        policy.use_frozen_form(form)
    return policy


def record_frozen(policy, options: PolicyOptions, say) -> None:
    """How many blocks a causal-LM policy froze and the form its frozen layers took, said once and written into the
    run's config in place of the defaults (config.yaml is written after setup), so a resumed run, and a reference
    loaded after this, set up the same policy."""
    if not isinstance(policy, CausalLMPolicy):
        return
    if options.freeze_layers is None:
        n, options.freeze_layers = policy.model.config.num_hidden_layers, policy.freeze_layers
        frozen = f"the embeddings and {policy.freeze_layers}" if policy.freeze_layers else "none"
        say(f"frozen: {frozen} of {n} blocks, this stage's default (--policy_options.freeze_layers sets it)")
    if policy.frozen_linears():
        options.frozen_form = policy.form
        say(f"frozen layers in {policy.form} ({policy.form_why})")


def load_reference(spec: str, device, **lm_options):
    """A policy that never trains, from `spec`: the reference of a run that starts from another policy (the rounds
    of `minirlhf loop` all keep the first round's policy as theirs)."""
    ref = load_policy(spec, device, value_head=False, **lm_options)
    ref.requires_grad_(False)
    return ref.eval()


def restore_policy(model, folder: Path, device, **lm_options) -> None:
    """Load a checkpoint's saved policy (or critic) into `model`, which was set up from the starting policy
    (a LoRA policy's adapters stay adapters)."""
    saved = load_policy(str(folder), device, value_head=model.value_head is not None,
                        **lm_options | {"keep_adapters": True, "frozen_form": "fp32"})
    try:
        model.load_state_dict(saved.state_dict())
    except RuntimeError as e:
        raise RunError(f"{folder} does not fit the policy it should resume ({str(e).splitlines()[0][:120]}); "
                       "resume with the config the run was started with") from e
