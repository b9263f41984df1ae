"""The sampler as it was and with the frozen layers in each form (fp32, bf16, int8), on a benchmark's own shape and
in the precision a run takes here: responses per second, and the KL per token of its next-token distributions from
the fp32 model's on the responses it sampled. `auto` is the form a run takes on this machine
(models/frozen_form.py). Used by benchmarks/sentiment_rlhf.py, in the same sitting as the systems it compares.
"""

import time

import torch

from minirlhf.models.causal_lm import _positions
from minirlhf.models.frozen_form import apply_form, choose_form, kl_rows
from minirlhf.models.load import load_policy
from minirlhf.precision import FORMS, set_precision


@torch.no_grad()
def response_logprobs(policy, rollout) -> torch.Tensor:
    """Next-token log-probs (B, T, V) at the response positions, in one plain pass of the model over prompt + response
    (position ids counted over real tokens, as sampling counts them)."""
    ids, mask = policy._sequence(rollout)  # (B, P+T) each, as the policy's own training pass lays them out
    logits = policy.model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits  # (B, P+T, V)
    P = rollout.prompt_ids.size(1)
    return logits[:, P - 1: -1].float().log_softmax(-1)  # (B, T, V)


def compare_forms(prompts: list[str], freeze_layers: int = 15, group: int = 4, rows: int = 16, tokens: int = 24,
                  repeats: int = 3) -> dict:
    """In the precision a `--dtype auto` run takes here: the sampler as it was (`before`: frozen layers in fp32, every
    weight cast by autocast at each decode step in a bf16 run) and with the frozen layers in each form (and, in a
    bf16 run, the trainable weights cast once a call). Each one's responses per second (the best of `repeats`
    interleaved sampling calls of `rows` responses, `group` per prompt, `tokens` long, after a warm-up call) and
    its per-token KL from the fp32 model's next-token distributions on the responses it sampled; the form `auto`
    takes here and its speed-up over `before`."""
    run = set_precision(torch.device("cpu"), "auto")
    policy = load_policy("smollm2", "cpu", value_head=False, freeze_layers=freeze_layers)  # frozen layers in fp32
    batch = [p for p in prompts[: rows // group] for _ in range(group)]
    linears, variants = policy.frozen_linears(), {"before": ("fp32", False), **{f: (f, True) for f in FORMS}}
    gen, seconds, rollouts, out = torch.Generator().manual_seed(0), {}, {}, {}

    def sample(name: str):
        form, policy.cast_once = variants[name]
        apply_form(linears, form)
        with run.autocast():
            t = time.perf_counter()
            rollouts[name] = policy.sample(batch, tokens, gen)
            seconds.setdefault(name, []).append(time.perf_counter() - t)

    for name in list(variants):
        try:
            sample(name)  # warm-up; a form this machine has no kernel for drops out
        except (RuntimeError, NotImplementedError) as e:
            out[name] = {"error": str(e).splitlines()[0][:200]}
            del variants[name]
    for _ in range(repeats):
        for name in variants:
            sample(name)
    for name in variants:
        form, policy.cast_once = variants[name]
        apply_form(linears, form)
        with run.autocast():
            cheap = response_logprobs(policy, rollouts[name])
        apply_form(linears, "fp32")
        exact = response_logprobs(policy, rollouts[name])
        kl = kl_rows(exact, cheap)[rollouts[name].response_mask.bool()]  # (N,) over the sampled tokens
        out[name] = {"responses_per_s": round(rows / min(seconds[name][1:]), 3),
                     "seconds": [round(x, 3) for x in seconds[name][1:]], "kl_per_token": round(float(kl.mean()), 6),
                     "kl_per_token_max": round(float(kl.max()), 5)}
    chosen, why = choose_form(policy.model, policy.tokenizer, linears, "auto")
    set_precision(torch.device("cpu"), "fp32")
    return {"freeze_layers": freeze_layers, "rows": rows, "tokens": tokens, "precision": f"{run.name} ({run.why})",
            "variants": out, "auto": chosen, "auto_why": why,
            "sampling_speedup": round(out[chosen]["responses_per_s"] / out["before"]["responses_per_s"], 3),
            "sampler_kl_per_token": out[chosen]["kl_per_token"]}
