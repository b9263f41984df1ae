"""The gold-judge frontier's plot and README tables, from its result JSON alone (gold_report.py)."""

import math
from pathlib import Path

from benchmarks.gold_report import ARMS


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (gao, steps, bon) = plt.subplots(1, 3, figsize=(16, 4.5))
    for arm, c in out["curves"].items():
        pts = [(math.sqrt(max(k, 0)), g) for k, g in zip(c["kl"], c["gold"]) if k is not None and g is not None]
        gao.plot(*zip(*[(0.0, out["sft_gold"])] + pts), marker="o", label=ARMS[arm])
    gao.set_xlabel("sqrt KL(policy || SFT), nats^0.5 per response")
    gao.set_ylabel("gold reward of the policy's samples")
    gao.set_title("Gold reward against sqrt KL (Gao et al.), mean of seeds", fontsize=10)
    gao.legend(fontsize=8)
    if "offline" in out["curves"]:
        c, width = out["curves"]["offline"], out["bin"]
        x = [width * (i + 1) for i in range(len(c["gold"]))]
        steps.plot(x, c["gold"], marker="o", label="gold (single RM)")
        steps.plot(x, c["proxy"], marker="s", label="proxy: reward model (single RM)")
        if "ensemble" in out["curves"]:
            steps.plot(x, out["curves"]["ensemble"]["gold"], marker="o", label="gold (ensemble)")
        twin = steps.twinx()
        twin.plot(x, c["ensemble_std"], color="grey", linestyle="--", label="ensemble std (single RM run)")
        twin.set_ylabel("members' std on the samples")
        for g in out.get("guard", []):
            if g["fired_step"]:
                steps.axvline(g["fired_step"], color="red", alpha=0.4)
        steps.set_xlabel("PPO step (red: the guard fired, per seed)")
        steps.set_title("Proxy and gold reward per step", fontsize=10)
        steps.legend(fontsize=8, loc="upper left")
    for kind, points in ((k, v) for k, v in out.get("best_of_n", {}).items() if k != "ensemble_minus_single"):
        bon.plot([p["kl_bound"] for p in points], [p["gold"] for p in points], marker="o",
                 label=f"best-of-n ({kind}), KL bound")
        bon.plot([p["kl_beirami"] for p in points], [p["gold"] for p in points], marker="x", linestyle=":",
                 label=f"best-of-n ({kind}), Beirami et al.'s KL")
    if "dpo_passes" in out:
        bon.plot([p["kl"]["mean"] for p in out["dpo_passes"]], [p["gold"]["mean"] for p in out["dpo_passes"]],
                 marker="s", label="DPO, pass by pass")
    bon.set_xlabel("KL(policy || SFT) per response, nats")
    bon.set_ylabel("gold reward (held-out openings)")
    bon.set_title("Best-of-n (n = 1..64) and DPO", fontsize=10)
    bon.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def f(x, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def tables(out: dict, source: str) -> str:
    """The README's tables of a result JSON, with the command and commit that made it."""
    s = out["settings"]
    lines = [f"From `{source}` (report by commit {out['commit']}, parts by {', '.join(out.get('part_commits', []))}; "
             "`.venv/bin/python -m benchmarks.gold_frontier`, then "
             f"`.venv/bin/python -m benchmarks.gold_report {source}`): {s['labels']} labels per seed, {s['steps']} PPO steps of 16, "
             f"kl_coef {s['kl']}, {s['members']} members, wall {out['wall_seconds']:,} s.", "",
             "| run (mean of seeds) | gold at SFT | gold peak | gold at the end | KL at the end (nats) |", "|---|---|---|---|---|"]
    for arm, c in out["curves"].items():
        lines.append(f"| {ARMS[arm]} | {f(out['sft_gold'])} | {f(max(c['gold']))} | {f(c['gold'][-1])} | {f(c['kl'][-1], 2)} |")
    lines += ["", "| measure | value |", "|---|---|"]
    over = out.get("over_optimisation", {})
    lines += [f"| single RM: gold drop from peak | {f(over.get('drop'))} ({f(out.get('overopt_drop_se'), 2)} SE); "
              f"proxy {f(over.get('proxy_at_peak'), 2)} -> {f(over.get('proxy_last'), 2)} |",
              f"| ensemble_peak_gain_ratio | {f(out.get('ensemble_peak_gain_ratio'), 2)} (ends higher: "
              f"{out.get('ensemble_ends_higher')}) |",
              f"| guard early (of {len(out.get('guard', []))} seeds) | {out.get('guard_early_seeds')}: "
              + ", ".join(f"fired {g['fired_step']}, gold dropped {g['gold_dropped_step']}" for g in out.get("guard", []))
              + " |", f"| guard false alarms on oracle runs | {out.get('guard_oracle_false_alarms')} |",
              f"| online minus offline gold at equal KL | {f(out.get('online_minus_offline_gold'))} |"]
    for d in out.get("dpo_minus_best_of_n_at_kl", []):
        lines.append(f"| DPO pass {d['pass']} (KL {f(d['kl'], 2)}) minus best-of-n at its KL | {f(d['mean'])} "
                     f"(95%: {d['ci95'] or 'one seed, none'}) |")
    if "active_minus_random_accuracy" in out:
        a = out["active_minus_random_accuracy"]
        lines.append(f"| active minus random choice, accuracy at 400 labels | {f(a['mean'])} (95%: {a['ci95']}) |")
    if "best_of_n" in out:
        mode = next(k for k in out["best_of_n"] if k not in ("single", "ensemble_minus_single"))
        lines += ["", f"| n | gold, single RM (± sampling SE, ± SE over seeds' RMs) | gold, {mode} ensemble | proxy "
                  "(single RM) | KL bound | KL, Beirami et al. |", "|---|---|---|---|---|---|"]
        lines += [f"| {p['n']} | {f(p['gold'])} ± {f(p['gold_se'])} ± {f(p['seed_se'])} | {f(e['gold'])} | "
                  f"{f(p['proxy'], 2)} | {f(p['kl_bound'], 2)} | {f(p['kl_beirami'], 2)} |"
                  for p, e in zip(out["best_of_n"]["single"], out["best_of_n"][mode])]
        last = out["best_of_n"]["ensemble_minus_single"][-1]
        lines.append(f"\nBest-of-{last['n']}, {mode} ensemble minus single RM: {f(last['mean'])} (95% over "
                     f"{last['seeds']} seeds: {last['ci95']}).")
    return "\n".join(lines)
