"""LoRA for causal-LM policies (through peft): adapters on the trainable blocks, and the reference as the same
model with its adapters switched off, so no second copy of the weights."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch.nn as nn

from minirlhf import ModelError
from minirlhf.checkpoint import load_json
from minirlhf.models.policy import Rollout
from minirlhf.models.pretrained import load_causal_lm

if TYPE_CHECKING:
    from minirlhf.models.causal_lm import CausalLMPolicy


def load_adapters(folder: Path, keep: bool):
    """The base model with a LoRA run's adapters: trainable (keep) or merged into its weights."""
    try:
        from peft import PeftModel
    except ImportError as e:
        raise ModelError(f"{folder} holds LoRA adapters, which need the peft package; run `pip install peft`") from e
    base = load_json(folder / "adapter_config.json").get("base_model_name_or_path")
    if not base:
        raise ModelError(f"{folder}/adapter_config.json names no base model; re-run the LoRA training")
    model, tokenizer = load_causal_lm(base)
    model = PeftModel.from_pretrained(model, str(folder), is_trainable=keep)
    return (model if keep else model.merge_and_unload()), tokenizer


def with_lora(model, blocks: nn.ModuleList, rank: int, alpha: float, freeze_layers: int):
    """LoRA adapters (peft) on every linear layer of the trainable blocks; the base weights freeze."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ModelError("LoRA needs the peft package; run `pip install peft` or set policy_options.lora_rank=0") from e
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in blocks[0].named_modules() if isinstance(m, nn.Linear)})
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=linear,
                                            layers_to_transform=list(range(freeze_layers, len(blocks)))))


class AdaptersOff(nn.Module):
    """The reference of a LoRA policy: the policy's own model with its adapters switched off."""

    kind = "causal_lm"

    def __init__(self, policy: CausalLMPolicy):
        super().__init__()
        object.__setattr__(self, "policy", policy)  # not a submodule: these weights are the policy's, not ours

    def as_text(self, prompt: str, response: str) -> str:
        return self.policy.as_text(prompt, response)

    def sample(self, *args, **kwargs) -> Rollout:
        with self.policy.model.disable_adapter():
            return self.policy.sample(*args, **kwargs)

    def forward(self, rollout: Rollout, entropy: bool = True):
        with self.policy.model.disable_adapter():
            logprobs, _, ent = self.policy(rollout, entropy)
        return logprobs, None, ent
