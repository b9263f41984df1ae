"""The gold-judge frontier's figures, from its part files alone (gold_frontier.py calls `report`), and the README's
tables from its result JSON: `.venv/bin/python -m benchmarks.gold_report benchmarks/results/gold_frontier.json`.

Curves are per PPO step (the gold judge's mean score of the step's 16 samples, KL per response from the SFT
policy), averaged in bins of `bin` steps, then over seeds; standard errors are over seeds (the seeds differ in
their labels, reward models and sampling), or over a run's steps in a bin where there is one seed.
"""

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}  # t(0.975, dof)
EXTRA = ("more-", "active")  # the flags' variants: not part of the default run's wall time
ARMS = {"offline": "single reward model", "ensemble": "ensemble", "oracle": "oracle (gold judge)",
        "online": "online loop"}


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def se(xs: list[float]) -> float | None:
    if len(xs) < 2:
        return None
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def interval(xs: list[float]) -> dict:
    """Mean and its 95% t-interval over seeds (none for one seed)."""
    s = se(xs)
    return {"mean": round(mean(xs), 4), "ci95": None if s is None else [round(mean(xs) - T95.get(len(xs) - 1, 1.96) * s, 4),
                                                                     round(mean(xs) + T95.get(len(xs) - 1, 1.96) * s, 4)],
            "seeds": len(xs)}


def binned(values: list[float | None], width: int) -> list[float | None]:
    chunks = [values[i: i + width] for i in range(0, len(values), width)]
    return [mean(c) if c and None not in c else None for c in chunks]


def joined(parts: dict, arm: str, seed: str, extend: bool) -> dict:
    """A seed's run of an arm, with its `--more-steps` continuation appended (steps counted on) if `extend`."""
    c = dict(parts[f"{arm}-s{seed}"]["curve"])
    more = parts.get(f"more-{arm}-s{seed}")
    if more and extend:
        n = len(c["gold"])
        c = {k: c[k] + more["curve"][k] for k in ("kl", "gold", "proxy", "ensemble_std")} | {
            "health": c["health"] + [h | {"step": h["step"] + n, "continued": True} for h in more["curve"]["health"]]}
    return c


def arm_curves(parts: dict, arm: str, width: int) -> list[dict]:
    """Each seed's binned curves; continued (`--more-steps`) only when every seed of the arm was."""
    seeds = [name.split("-s")[-1] for name in sorted(parts) if name.startswith(f"{arm}-s")]
    extend = all(f"more-{arm}-s{s}" in parts for s in seeds)
    return [{k: binned(c[k], width) for k in ("kl", "gold", "proxy", "ensemble_std")} | {"health": c["health"],
            "steps": c["gold"]} for c in (joined(parts, arm, s, extend) for s in seeds)]


def continuations(parts: dict, width: int) -> dict:
    """Every `--more-steps` run on its own, binned, whether or not its arm's other seeds were continued."""
    return {name: {k: binned(joined(parts, name[5:].rsplit("-s", 1)[0], name.rsplit("-s", 1)[1], True)[k], width)
                   for k in ("kl", "gold", "proxy", "ensemble_std")} for name in sorted(parts) if name.startswith("more-")}


def across(curves: list[dict], key: str) -> tuple[list, list]:
    """Per bin: mean over seeds and its standard error."""
    columns = list(zip(*(c[key] for c in curves)))
    return [mean(col) if None not in col else None for col in columns], [se(list(col)) if None not in col else None
                                                                          for col in columns]


def step_se(steps: list[float], width: int) -> float:
    """The standard error of a `width`-step mean, from the run's step-to-step spread (its trend included)."""
    diffs = [b - a for a, b in zip(steps, steps[1:])]
    return math.sqrt(sum(d * d for d in diffs) / max(1, len(diffs)) / 2 / width)  # successive differences: no trend


def over_optimisation(single: list[dict], width: int) -> dict:
    gold, gold_se = across(single, "gold")
    proxy, _ = across(single, "proxy")
    peak = max(range(len(gold)), key=lambda i: gold[i])
    drops = [c["gold"][peak] - c["gold"][-1] for c in single]
    spread = se(drops) or math.sqrt(2) * step_se(single[0]["steps"], width)
    return {"peak_bin": peak, "peak_gold": gold[peak], "last_gold": gold[-1], "drop": mean(drops), "drop_se": spread,
            "overopt_drop_se": mean(drops) / spread if spread else None, "proxy_at_peak": proxy[peak],
            "proxy_last": proxy[-1], "proxy_still_rises": proxy[-1] > proxy[peak]}


def guard_timing(curve: dict, width: int) -> dict:
    """The step the over-optimisation guard fired, and the first step after the gold peak where the gold's moving
    average (over `width` steps) fell 1 standard error below that peak."""
    steps = curve["gold"]
    smooth = [mean(steps[max(0, i - width + 1): i + 1]) for i in range(len(steps))]
    start = min(width - 1, len(smooth) - 1)
    peak = max(range(start, len(smooth)), key=lambda i: smooth[i])
    threshold = smooth[peak] - step_se(steps, width)
    dropped = next((i + 1 for i in range(peak, len(smooth)) if smooth[i] < threshold), None)
    fired = next((h["step"] for h in curve["health"] if h["guard"] == "over_optimisation"), None)
    return {"fired_step": fired, "gold_dropped_step": dropped, "peak_step": peak + 1,
            "early": fired is not None and dropped is not None and fired <= dropped}


def at_kl(points: list[tuple[float, float]], kl: float) -> float | None:
    """Gold along (KL, gold) points at `kl`, linear between neighbours; None outside their range."""
    points = sorted(p for p in points if p[0] is not None and p[1] is not None)
    for (k0, g0), (k1, g1) in zip(points, points[1:]):
        if k0 <= kl <= k1:
            return g0 + (g1 - g0) * (kl - k0) / (k1 - k0) if k1 > k0 else max(g0, g1)
    return None


def online_offline(parts: dict, offline: list[dict], online: list[dict]) -> dict:
    """Online's last bin against offline's curve at the same KL, per seed; and both loops' held-out end points."""
    diffs = []
    for off, on in zip(offline, online):
        there = at_kl(list(zip([0.0] + off["kl"], [off["gold"][0]] + off["gold"])), on["kl"][-1])
        diffs.append(None if there is None else on["gold"][-1] - there)
    ends = {arm: [p["rounds"][-1] for n, p in sorted(parts.items()) if n.startswith(f"{arm}-s")]
            for arm in ("offline", "online")}
    heldout = {arm: {"gold": interval([r["gold/reward"] for r in rows]), "kl": interval([r["kl"] for r in rows]),
                     "rm_accuracy": interval([r["rm/accuracy"] for r in rows])} for arm, rows in ends.items()}
    known = [d for d in diffs if d is not None]
    return {"online_minus_offline_gold": round(mean(known), 4) if known else None, "per_seed": diffs,
            "interval": interval(known) if known else None, "heldout_end": heldout}


def best_of_n(parts: dict, mode: str) -> dict:
    seeds = [p for n, p in sorted(parts.items()) if n.startswith("bon-s")]
    out = {}
    for kind in ("single", mode):
        rows = list(zip(*(s[kind]["points"] for s in seeds)))
        out[kind] = [{"n": r[0]["n"], "gold": round(mean([x["gold"] for x in r]), 4),
                      "gold_se": round(r[0]["gold_se"], 4), "seed_se": None if len(r) < 2 else round(se([x["gold"] for x in r]), 4),
                      "proxy": round(mean([x["proxy"] for x in r]), 4), "kl_bound": round(r[0]["kl_bound"], 4),
                      "kl_beirami": round(mean([x["kl_beirami"] for x in r]), 4)} for r in rows]
    pairs = zip(*([zip(s["single"]["points"], s[mode]["points"]) for s in seeds]))  # per n: (single, ensemble) per seed
    out["ensemble_minus_single"] = [{"n": ps[0][0]["n"]} | interval([e["gold"] - g["gold"] for g, e in ps]) for ps in pairs]
    return out


def dpo_against_bon(dpo: list[dict], bon: list[dict]) -> list[dict]:
    """Per DPO pass: its gold minus best-of-n's (single reward model) at the same KL (Beirami's estimate), mean and
    95% interval over DPO seeds; passes beyond best-of-64's KL are left out."""
    curve = [(p["kl_beirami"], p["gold"]) for p in bon]  # n = 1 is the SFT policy itself, at KL 0
    out = []
    for k in range(1, len(dpo[0]["points"])):
        diffs = [d["points"][k]["gold"] - g for d in dpo if (g := at_kl(curve, d["points"][k]["kl"])) is not None]
        if diffs:
            out.append({"pass": k, "kl": round(mean([d["points"][k]["kl"] for d in dpo]), 4)} | interval(diffs))
    return out


def report(parts: dict, args) -> dict:
    settings = json.loads((args.work / "settings.json").read_text())
    width = max(1, settings["steps"] // 6)
    curves = {arm: arm_curves(parts, arm, width) for arm in ARMS}
    first = [c["steps"][0] for arm in ("offline", "ensemble", "oracle", "online") for c in curves[arm]]
    sft_gold = mean(first) if first else None
    out = {"commit": args.commit, "part_commits": sorted({p.get("commit", "unrecorded") for p in parts.values()}),
           "settings": settings, "bin": width, "sft_gold": sft_gold,
           "curves": {arm: {k: across(c, k)[0] for k in ("kl", "gold", "proxy", "ensemble_std")} for arm, c in curves.items() if c},
           "wall_seconds": round(sum(p.get("seconds", 0) for n, p in parts.items() if not n.startswith(EXTRA))),
           "extra_seconds": {n: p.get("seconds") for n, p in parts.items() if n.startswith(EXTRA)}}
    if curves["offline"]:
        over = over_optimisation(curves["offline"], width)
        out["over_optimisation"] = over
        out["overopt_drop_se"] = over["overopt_drop_se"]
        guards = [guard_timing({"gold": c["steps"], "health": c["health"]}, width) for c in curves["offline"]]
        out["guard"] = guards
        out["guard_early_seeds"] = sum(g["early"] for g in guards)
        out["guard_oracle_false_alarms"] = sum(any(h["guard"] == "over_optimisation" for h in c["health"])
                                               for c in curves["oracle"]) if curves["oracle"] else None  # none run
    if curves["offline"] and curves["ensemble"]:
        single, ens = across(curves["offline"], "gold")[0], across(curves["ensemble"], "gold")[0]
        gain = max(single) - sft_gold
        out["ensemble_peak_gain_ratio"] = (max(ens) - max(single)) / gain if gain > 0 else None
        out["ensemble_ends_higher"] = ens[-1] > single[-1]
    if curves["online"]:
        out["online_offline"] = online_offline(parts, curves["offline"], curves["online"])
        out["online_minus_offline_gold"] = out["online_offline"]["online_minus_offline_gold"]
    out["per_seed"] = {arm: [{k: c[k] for k in ("kl", "gold", "proxy", "ensemble_std")} for c in cs]
                       for arm, cs in curves.items() if cs}  # binned, seed by seed
    out["continued"] = continuations(parts, width)
    out["reward_models"] = {n: p for n, p in sorted(parts.items()) if n.startswith("rm-s")}
    if any(n.startswith("bon-s") for n in parts):
        out["best_of_n"] = best_of_n(parts, settings["ensemble_mode"] if "ensemble_mode" in settings else "wco")
    dpo = [p for n, p in sorted(parts.items()) if n.startswith("dpo-s")]
    if dpo:
        out["dpo_passes"] = [{"pass": r[0]["pass"], "gold": interval([x["gold"] for x in r]), "kl": interval([x["kl"] for x in r])}
                             for r in zip(*(d["points"] for d in dpo))]
        if "best_of_n" in out:
            out["dpo_minus_best_of_n_at_kl"] = dpo_against_bon(dpo, out["best_of_n"]["single"])
    if "active" in parts:
        a = parts["active"]
        out["active_minus_random_accuracy"] = interval([x[-1][1] - y[-1][1] for x, y in zip(a["curves"]["ensemble"],
                                                                                              a["curves"]["random"])])
        out["active_label_ratio"] = a["active_label_ratio"]
    out["bars"] = bars(out)
    save(out, args)
    return out


def bars(out: dict) -> dict:
    drop, ratio = out.get("overopt_drop_se"), out.get("ensemble_peak_gain_ratio")
    return {"overopt_drop_se >= 2 with the proxy rising": drop is not None and drop >= 2
            and out["over_optimisation"]["proxy_still_rises"],
            "ensemble_peak_gain_ratio >= 0.25 and ends higher": ratio is not None and ratio >= 0.25
            and out.get("ensemble_ends_higher", False),
            "guard_early_seeds >= 2 of 3, no oracle alarm": out.get("guard_early_seeds", 0) >= 2
            and out.get("guard_oracle_false_alarms", 1) == 0,
            "online_minus_offline_gold > 0": (out.get("online_minus_offline_gold") or 0) > 0,
            "wall_seconds <= 5400": out["wall_seconds"] <= 5400}


def save(out: dict, args) -> None:
    from benchmarks.common import save_result
    from benchmarks.gold_plot import plot

    quick = "quick" in args.work.name
    variant = args.work.name.removeprefix("bench-gold-frontier")  # "" for the default run, "-smollm2", ...
    variant = variant if variant in ("", "-smollm2") else f"-{args.work.name}"
    if not quick:  # (gold_frontier prints the result itself, on stdout)
        save_result(f"gold_frontier{variant}", out, show=False)
    (args.work / "result.json").write_text(json.dumps(out, indent=1))
    plot(out, args.work / "gold_frontier.png" if quick else ROOT / "docs" / f"gold_frontier{variant}.png")


if __name__ == "__main__":
    from benchmarks.gold_plot import tables

    print(tables(json.loads(Path(sys.argv[1]).read_text()), sys.argv[1]))
