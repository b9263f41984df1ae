"""The tables of docs/trl-comparison.md, from benchmarks/results/sentiment_rlhf.json (benchmarks/render.py)."""

from minirlhf.report import table

NAMES = {
    "trl_grpo": "TRL `GRPOTrainer`, 1 update a batch (its default)",
    "trl_grpo_4_updates": "TRL `GRPOTrainer`, 4 updates a batch (`num_iterations=2`, 2 minibatches)",
    "minirlhf_grpo_frozen15_4_updates_32_responses": "minirlhf GRPO, 15 of 30 blocks frozen, 32 responses a step",
}


def name(system: str) -> str:
    if system in NAMES:
        return NAMES[system]
    if system.startswith("minirlhf_grpo_frozen"):
        n = system.removeprefix("minirlhf_grpo_frozen").split("_")[0]
        return f"minirlhf GRPO, {n} of 30 blocks frozen" if n != "0" else "minirlhf GRPO, full model (none frozen)"
    return f"`{system}`"


def _reached(evals: list[dict], target: float) -> str:
    hit = next((e for e in evals if e["eval_reward"] >= target), None)
    if hit is None:
        return f"not by step {evals[-1]['step']} ({evals[-1]['train_s']:.0f} s, best {max(e['eval_reward'] for e in evals):.2f})"
    return f"{hit['train_s']:.1f} (step {hit['step']})"


def _spread(values: list[float], spec: str = ".1f") -> str:
    lo, hi = min(values), max(values)
    return format(lo, spec) if format(lo, spec) == format(hi, spec) else f"{lo:{spec}}–{hi:{spec}}"


def systems_table(r: dict) -> str:
    """One row per system: seconds per step (and sampling's share, minirlhf), training seconds to the target per seed,
    peak memory; the best minirlhf system in bold."""
    rows = []
    for system, runs in r["systems"].items():
        if not isinstance(runs, list):
            rows.append([name(system), "not run", runs.get("skipped", ""), "", ""])
            continue
        ok = [x for x in runs if "evals" in x]
        if not ok:
            rows.append([name(system), "failed", runs[0].get("error", ""), "", ""])
            continue
        sampling = _spread([x["sample_seconds_per_step"] for x in ok]) if "sample_seconds_per_step" in ok[0] else ""
        label = f"**{name(system)}**" if system == r.get("best_minirlhf_system") else name(system)
        rows.append([label, _spread([x["seconds_per_step"] for x in ok]), sampling,
                     " / ".join(_reached(x["evals"], r["target_reward"]) for x in ok),
                     _spread([x["peak_memory_mb"] / 1024 for x in ok]) + " GB"])
    return "\n".join(table(["system", "s/step", "sampling s/step", f"training s to {r['target_reward']:.2f}, "
                            f"seeds {' / '.join(map(str, r['seeds']))}", "peak memory"], rows))


def sampler_table(r: dict) -> str:
    """The sampler as it was and with the frozen layers in each form: responses per second and KL from fp32."""
    s, rows = r["sampler"], []
    labels = {"before": "as before (frozen layers fp32, weights cast at every step)", "fp32": "frozen layers fp32",
              "bf16": "frozen layers bf16", "int8": "frozen layers int8 (dynamic)"}
    for variant, v in s["variants"].items():
        label = labels.get(variant, variant) + (" — **auto's choice**" if variant == s["auto"] else "")
        if "error" in v:
            rows.append([label, "no kernel here", v["error"], ""])
            continue
        rows.append([label, f"{v['responses_per_s']:.2f}", f"{v['kl_per_token']:.4f}", f"{v['kl_per_token_max']:.3f}"])
    return "\n".join(table(["sampler", "responses/s (best of 3)", "KL/token from fp32, mean", "max"], rows))


def precision_text(r: dict) -> str:
    """What each side ran in, and why: minirlhf's own words (each run's lines, its first seed's), TRL's two
    measured speeds."""
    lines = []
    for system, runs in r["systems"].items():
        said = runs[0].get("precision", "") if system.startswith("minirlhf") and isinstance(runs, list) and runs else ""
        if said:
            lines.append(f"- {name(system)}: {said}.")
    trl = r["trl_precision"]
    speeds = ", ".join(f"{k} {v:.1f} s/step" for k, v in trl.get("seconds_per_step", {}).items())
    return "\n".join(lines or ["- minirlhf: not recorded"]) + (
        f"\n- TRL: **{trl.get('taken', 'fp32')}**, the faster of its two precisions here over 3 steps of its default "
        f"recipe ({speeds or 'not measured'}).")


def bars_text(r: dict) -> str:
    return "\n".join(f"- {name}: {'met' if ok else '**not met**'}" for name, ok in r.get("bar", {}).items()) \
        or "- no bar was judged: a system did not finish (see the JSON)"
