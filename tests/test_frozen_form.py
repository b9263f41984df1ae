"""The frozen layers' cheaper forms (precision.frozen_linear, models/frozen_form.py): the arithmetic against plain
linear layers, and a real SmolLM2 policy that samples and trains through the same form."""

import json

import pytest
import torch

from minirlhf import ConfigError
from minirlhf.models.frozen_form import MAX_KL, apply_form, check_logprobs, kl_per_token
from minirlhf.models.load import load_policy
from minirlhf.precision import frozen_linear

ALL_MEASURED = {"mlp": 1.0, "lstm": 1.0, "decode": 1.0}


def test_each_form_computes_the_linear_layer_and_int8_passes_the_fp32_gradient():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 32)
    x = torch.randn(5, 7, 64, requires_grad=True)  # (B, T, in)
    exact = x @ layer.weight.T + layer.bias  # (B, T, out)
    assert frozen_linear(layer, "fp32") == layer.forward
    bf16 = frozen_linear(layer, "bf16")(x)
    assert bf16.dtype == torch.float32 and torch.allclose(bf16, exact, rtol=2e-2, atol=2e-2)
    assert not torch.equal(bf16, exact)  # it did run in bf16
    int8 = frozen_linear(layer, "int8")(x)
    assert int8.shape == exact.shape and (int8 - exact).abs().max() < 0.05 * exact.abs().max()
    grad = torch.randn_like(int8)
    int8.backward(grad)  # straight through the rounding: the gradient of the fp32 layer
    assert torch.allclose(x.grad, grad @ layer.weight, atol=1e-6)
    assert layer.weight.grad is None  # frozen: nothing reaches the weights
    with pytest.raises(ConfigError, match="unknown form"):
        frozen_linear(layer, "fp8")


@pytest.fixture(scope="module")
def bf16_policy():
    return load_policy("smollm2", "cpu", freeze_layers=20, frozen_form="bf16")


def test_a_policy_samples_and_trains_through_the_same_form(bf16_policy):
    """Frozen blocks and the tied LM head in bf16: the update's log-probs are those sampling drew with (nothing
    off-policy), the reference reads the same layers, and the weights a checkpoint saves are the fp32 ones."""
    policy = bf16_policy
    assert policy.form == "bf16" and "KL to fp32" in policy.form_why
    linears = policy.frozen_linears()
    assert policy.head in linears and policy.model.model.layers[19].mlp.down_proj in linears
    assert policy.model.model.layers[20].mlp.down_proj not in linears  # trainable: never in a cheaper form
    assert all(layer.weight.dtype == torch.float32 for layer in linears)
    ref = policy.frozen_copy()
    assert ref.form == "bf16" and ref.model.model.layers[3].mlp.down_proj is policy.model.model.layers[3].mlp.down_proj
    rollout = policy.sample(["hi", "Tell me about cats.", "hi"], 8, torch.Generator().manual_seed(0))
    with torch.no_grad():
        logprobs, _, _ = policy(rollout)
        ref_logprobs, _, _ = ref(rollout)
    assert torch.allclose(logprobs, rollout.logprobs, atol=2e-4) and torch.allclose(ref_logprobs, logprobs, atol=2e-4)
    fp32 = load_policy("smollm2", "cpu", freeze_layers=20)
    assert fp32.form == "fp32"
    with torch.no_grad():
        exact, _, _ = fp32(rollout)
    assert not torch.allclose(exact, logprobs, atol=1e-5)  # the form changed the arithmetic ...
    assert kl_per_token(check_logprobs(fp32.model, fp32.tokenizer),
                        check_logprobs(policy.model, policy.tokenizer)) <= MAX_KL  # ... within the bound
    saved = policy.model.state_dict()["model.layers.5.self_attn.q_proj.weight"]
    assert saved.dtype == torch.float32 and torch.equal(saved, fp32.model.state_dict()["model.layers.5.self_attn.q_proj.weight"])


def test_the_update_trains_the_upper_blocks_through_a_bf16_head(bf16_policy):
    policy = bf16_policy
    rollout = policy.sample(["hi"], 6, torch.Generator().manual_seed(1))
    policy(rollout, entropy=False)[0].sum().backward()
    grad = policy.model.model.layers[25].mlp.down_proj.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    policy.zero_grad(set_to_none=True)


def test_auto_takes_the_fastest_form_that_keeps_the_distributions_and_fp32_where_none_is_faster(monkeypatch):
    """With int8 measured fastest, SmolLM2 still gets bf16: int8's one activation scale per call cannot hold its
    outliers (KL far over the bound); where no form is measured faster, fp32; with no frozen layers, nothing."""
    monkeypatch.setenv("MINIRLHF_DTYPE_PROBE", json.dumps(ALL_MEASURED | {"frozen_bf16": 2.0, "frozen_int8": 4.0}))
    policy = load_policy("smollm2", "cpu", freeze_layers=28, frozen_form="auto")
    assert policy.form == "bf16" and "int8 moved the check text" in policy.form_why, policy.form_why
    apply_form(policy.frozen_linears(), "fp32")
    monkeypatch.setenv("MINIRLHF_DTYPE_PROBE", json.dumps(ALL_MEASURED | {"frozen_bf16": 1.1, "frozen_int8": 0.5}))
    assert policy.use_frozen_form("auto") == "fp32" and "bf16 1.10x" in policy.form_why
    assert load_policy("smollm2", "cpu", frozen_form="auto").frozen_linears() == []  # all of it trains


def test_in_a_bf16_run_weights_cast_once_a_call_sample_exactly_what_autocast_casting_each_step_does(bf16_policy):
    policy, outs = bf16_policy, []
    for once in (False, True):
        policy.cast_once = once
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            outs.append(policy.sample(["hi", "Tell me about cats."], 8, torch.Generator().manual_seed(3)))
    policy.cast_once = True
    assert torch.equal(outs[0].response_ids, outs[1].response_ids) and torch.equal(outs[0].logprobs, outs[1].logprobs)
    assert all("forward" not in m.__dict__ for m in policy._trainable_linears())  # their own forward after the call
    plain = policy.sample(["hi"], 4, torch.Generator().manual_seed(3))  # no autocast: nothing is cast
    assert plain.logprobs.dtype == torch.float32
