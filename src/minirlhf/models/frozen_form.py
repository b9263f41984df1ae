"""The form a causal-LM policy's frozen weights run in (`--policy_options.frozen_form`): fp32, bf16 or int8.

The frozen blocks and a frozen (tied) LM head never train, so their linear layers may keep a cheaper copy of their
weights (`precision.frozen_linear`). The form holds everywhere those layers run: while sampling, in the frozen
blocks' output the update starts from (kept from sampling), and in the LM head of every training pass; so the
log-probs that train the policy are those of the model that sampled, and the reference, which shares the frozen
layers, reads them in the same form. What a checkpoint saves stays the fp32 weights. Under bf16 autocast (`--dtype`)
bf16 is autocast's own arithmetic, so there the form changes nothing but the speed; and the trainable layers too
sample from bf16 copies made once per sampling call (`cast_once`) rather than cast again at every decode step.

`auto` measures: it takes the form the precision probe (`precision.measured`, once a machine) found fastest on a
decode step, at least FORM_MARGIN times fp32's, provided the model's next-token distributions on a check text stay
within MAX_KL nats per token of fp32's; else fp32. On SmolLM2 int8 fails that check (its activations have
outliers that one scale per call cannot hold; benchmarks/results/sentiment_rlhf.json), so a fast int8 kernel never
costs the policy its accuracy.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from minirlhf import distributed
from minirlhf.precision import FORM_MARGIN, FORMS, frozen_linear, measured

MAX_KL = 0.01
"""the most a cheaper form may move the next-token distribution, in nats per token (KL from fp32's)"""
CHECK_TEXT = ("The film opens slowly, but by the second hour I could not look away: the acting is careful, the "
              "music spare, and the ending earns every tear it asks for.")


def apply_form(linears: list[nn.Linear], form: str) -> None:
    """Each layer's forward in `form` (fp32: its own again). An instance attribute, so the module tree, its state
    dict and every copy that shares the layer are unchanged."""
    for layer in linears:
        layer.__dict__.pop("forward", None)
        if form != "fp32":
            layer.forward = frozen_linear(layer, form)


@torch.no_grad()
def check_logprobs(model, tokenizer) -> torch.Tensor:
    """Next-token log-probs (T, V) of the model on CHECK_TEXT."""
    device = next(model.parameters()).device
    ids = torch.tensor([tokenizer(CHECK_TEXT)["input_ids"]], device=device)  # (1, T)
    return model(input_ids=ids).logits[0].float().log_softmax(-1)


def kl_rows(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) in nats at each position, for log-probs (..., V) -> (...)."""
    return (logp.exp() * (logp - logq)).sum(-1)


def kl_per_token(logp: torch.Tensor, logq: torch.Tensor) -> float:
    """Mean over positions of KL(p || q) in nats, for log-probs (T, V)."""
    return float(kl_rows(logp, logq).mean())


def candidates(requested: str, device: torch.device) -> tuple[list[str], str]:
    """The forms to try in order, and why: as asked, or under `auto` those the probe measured at least FORM_MARGIN
    times fp32's speed, fastest first."""
    if requested != "auto":
        return [requested], f"--policy_options.frozen_form {requested}"
    if distributed.world_size() > 1:
        return [], "auto: fp32 under torchrun (not measured there)"
    speeds = {form: measured(device).get(f"frozen_{form}") or 0.0 for form in FORMS[1:]}
    quick = sorted((f for f, s in speeds.items() if s >= FORM_MARGIN), key=lambda f: -speeds[f])
    said = ", ".join(f"{f} {s:.2f}x" for f, s in speeds.items())
    return quick, f"auto: the probe's decode step ran {said} as fast as fp32 here"


def choose_form(model, tokenizer, linears: list[nn.Linear], requested: str) -> tuple[str, str]:
    """Put `linears` (the frozen ones) in the form `requested` (or, for `auto`, the measured winner that keeps the
    check text's distributions within MAX_KL of fp32's); the form taken and why, with that KL."""
    if not linears:
        return "fp32", "no frozen layers"
    device = linears[0].weight.device
    tried, why = candidates(requested, device)
    if not tried:
        return "fp32", why
    exact = check_logprobs(model, tokenizer)
    for form in tried:
        apply_form(linears, form)
        kl = kl_per_token(exact, check_logprobs(model, tokenizer))
        if kl <= MAX_KL or requested != "auto":
            return form, f"{why}; KL to fp32 {kl:.2g} nats/token on a check text"
        why += f"; {form} moved the check text's next-token distributions {kl:.2g} nats/token (over {MAX_KL})"
    apply_form(linears, "fp32")
    return "fp32", why


@contextmanager
def cast_once(linears: list[nn.Linear], device: torch.device):
    """Within the block, under bf16 autocast, `linears` (trainable, not updated meanwhile: a sampling call) run on
    bf16 copies of their weights made once, instead of autocast casting every weight again at every decode step;
    the arithmetic is autocast's own. Elsewhere (fp32 runs, torchrun's sharded weights) nothing changes."""
    on = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == torch.bfloat16 \
        and distributed.world_size() == 1
    if on:
        apply_form(linears, "bf16")
    try:
        yield
    finally:
        if on:
            apply_form(linears, "fp32")
